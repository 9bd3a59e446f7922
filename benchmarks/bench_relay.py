"""What the relay costs a layer call: direct, hole-punched, same-LAN and relayed paths side by side.

    sudo python benchmarks/bench_relay.py            # home routers' links at 5 and 20 ms round trip
    python benchmarks/bench_relay.py --loopback      # no root: loopback forwarders, direct vs relayed only

One Dask RPC stands for a decode step's expert call of one MoE layer: a 1 x 4096 float32 row out
(16 KiB) and the same back. Each figure is the median of `--calls` calls on a warm connection
(Dask pools them); `connect` is opening a new connection. Paths run interleaved, round by round.
Writes benchmarks/results/relay.json.

**The home lab (default, as root):** real NAT routers in network namespaces (tests/home_nat_lab.py),
each home router's Internet link, and the far relay's, a real delayed link (tests/tap_link.py:
this kernel has no netem). A volunteer in home 1 serves four ways at once, and a data scientist
in home 3 calls it each way:
- `direct`: to a port home 1's router forwards to the volunteer (what a volunteer with an open
  port gets): caller -> r3 link -> r1 link -> volunteer.
- `punched`: the same two links, through both NATs by hole punching (no port opened).
- `relayed near`: through a relay on the homes' way (at the exchange where their links meet).
- `relayed far`: through a relay across its own link (the scheduler's host, off the way): two
  more link crossings.
- `lan`: a second machine in home 1 calls the volunteer over their LAN (the relay introduced
  them; the router is never crossed).
And what the client itself picks when left alone (`neuro.client.relay-punch`, the default): it
measures the relayed and the punched path on its first connection and keeps the faster.

**Loopback (`--loopback`, no root):** a user-space TCP forwarder with the delay on each link;
`direct` and `relayed` only (hole punching needs NAT routers that drop stray packets).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import textwrap
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE.parent / "tests"))  # the home lab

PAYLOAD = bytes(4096 * 4)


class DelayLink:
    """A TCP forwarder on 127.0.0.1 that holds each chunk for `rtt / 2` in each direction."""

    def __init__(self, target: tuple[str, int], rtt: float):
        self.target = target
        self.delay = rtt / 2
        self.server: asyncio.AbstractServer | None = None

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return self.server.sockets[0].getsockname()[1]

    async def _handle(self, reader, writer):
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
            await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer), return_exceptions=True)
        except (OSError, asyncio.CancelledError):  # the benchmark is over: its loop ends
            writer.close()

    async def _pipe(self, reader, writer):
        queue: asyncio.Queue = asyncio.Queue()

        async def deliver():
            while (item := await queue.get()) is not None:
                deadline, chunk = item
                wait = deadline - time.perf_counter()
                if wait > 0:
                    await asyncio.sleep(wait)
                writer.write(chunk)
                await writer.drain()
            writer.close()

        sender = asyncio.create_task(deliver())
        try:
            while chunk := await reader.read(1 << 16):
                queue.put_nowait((time.perf_counter() + self.delay, chunk))
        finally:
            queue.put_nowait(None)
            await sender

    def close(self):
        if self.server is not None:
            self.server.close()


async def _echo(data=None):
    return data


async def measure(rtt: float, calls: int, rounds: int) -> dict:
    from distributed.comm import connect
    from distributed.core import Server, rpc

    import neuro_dask.relay.comm  # noqa: F401 - relay:// for this process
    from neuro_dask.relay.server import Relay

    relay = await Relay(ping=5.0).start()
    direct_server = Server({"echo": _echo})
    await direct_server.listen("tcp://127.0.0.1:0")
    # the volunteer's own connections to the relay cross its link
    volunteer_link = DelayLink(("127.0.0.1", relay.port), rtt)
    volunteer_port = await volunteer_link.start()
    relayed_server = Server({"echo": _echo})
    await relayed_server.listen(f"relay://127.0.0.1:{volunteer_port}")
    vid = relayed_server.listener.vid
    # the caller's links: to the volunteer directly, and to the relay
    direct_link = DelayLink(("127.0.0.1", direct_server.port), rtt)
    caller_link = DelayLink(("127.0.0.1", relay.port), rtt)
    paths = {
        "direct": f"tcp://127.0.0.1:{await direct_link.start()}",
        "relayed": f"relay://127.0.0.1:{await caller_link.start()}/{vid}",
    }
    per_call = {p: [] for p in paths}
    per_connect = {p: [] for p in paths}
    try:
        for _ in range(rounds):
            for path, address in paths.items():
                started = time.perf_counter()
                comm = await connect(address)
                per_connect[path].append((time.perf_counter() - started) * 1e3)
                await comm.close()
                r = rpc(address)
                await r.echo(data=PAYLOAD)  # warm: a pooled connection
                for _ in range(calls):
                    started = time.perf_counter()
                    assert await r.echo(data=PAYLOAD) == PAYLOAD
                    per_call[path].append((time.perf_counter() - started) * 1e3)
                await r.close_rpc()
    finally:
        for link in (volunteer_link, direct_link, caller_link):
            link.close()
        await relayed_server.close()
        await direct_server.close()
        await relay.stop()
    return {
        path: {
            "call_ms": statistics.median(per_call[path]),
            "call_ms_range": [min(per_call[path]), max(per_call[path])],
            "connect_ms": statistics.median(per_connect[path]),
        }
        for path in paths
    }


# ---- the home lab -------------------------------------------------------------------------------

VOLUNTEER = textwrap.dedent(
    """
    import asyncio, json, sys
    from distributed.core import Server
    import neuro_dask.relay.comm  # noqa: F401

    async def echo(data=None):
        return data

    async def main():
        servers = {}
        for name, address in json.loads(sys.argv[1]).items():
            servers[name] = Server({"echo": echo})
            await servers[name].listen(address)
        print("ADDRESSES " + json.dumps({n: s.address for n, s in servers.items()}), flush=True)
        await asyncio.Event().wait()

    asyncio.run(main())
    """
)

CALLER = textwrap.dedent(
    """
    import asyncio, json, statistics, sys, time
    from distributed.comm import connect
    from neuro_dask.relay import comm as relay_comm

    SIZES = {"8 KiB": bytes(4096 * 2), "16 KiB": bytes(4096 * 4)}  # a 4096-wide row, bf16 and float32
    paths, calls, rounds = json.loads(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])

    async def open_path(kind, address):
        # Dask's own connect, along the path named (the client's path memory set to it)
        if kind != "direct":
            host, port, vid = relay_comm.split_location(address[len("relay://"):])
            relay_comm.PATHS[(host, port, vid)] = relay_comm.PathChoice(kind, time.monotonic() + 3600)
        before = dict(relay_comm.STATS)
        c = await connect(address)
        if kind != "direct":
            assert relay_comm.STATS[kind] == before[kind] + 1, f"not {kind}: {relay_comm.STATS}"
        return c

    async def call(c, payload):
        await c.write({"op": "echo", "data": payload, "reply": True})
        assert await c.read() == payload

    async def main():
        per_call = {k: {size: [] for size in SIZES} for k in paths}
        per_connect = {k: [] for k in paths}
        for _ in range(rounds):
            for kind, address in paths.items():
                started = time.perf_counter()
                c = await open_path(kind.split()[0], address)
                per_connect[kind].append((time.perf_counter() - started) * 1e3)
                for _ in range(calls):
                    for size, payload in SIZES.items():  # the sizes interleaved too
                        await call(c, payload)  # unmeasured: the other size's call before it is not
                        started = time.perf_counter()
                        await call(c, payload)
                        per_call[kind][size].append((time.perf_counter() - started) * 1e3)
                await c.close()
        out = {k: {"call_ms": {size: statistics.median(v) for size, v in by_size.items()},
                   "call_ms_range": {size: [min(v), max(v)] for size, v in by_size.items()},
                   "connect_ms": statistics.median(per_connect[k])} for k, by_size in per_call.items()}
        # what the client picks left alone: both paths measured on its first connection
        relay_comm.PATHS.clear()
        auto = next(a for k, a in paths.items() if k == "relayed far")
        c = await connect(auto)
        await c.close()
        out["chosen"] = relay_comm.paths()[auto]
        print("RESULT " + json.dumps(out), flush=True)

    asyncio.run(main())
    """
)


def lab_measure(folder: Path, rtt_ms: float, calls: int, rounds: int) -> dict:
    from home_nat_lab import FAR, PUBLIC, HomeLab
    from process_helpers import NEURO_DASK

    port = 9100
    with HomeLab(folder, rtt_ms=rtt_ms, far_rtt_ms=rtt_ms) as lab:
        near = lab.start("public", *NEURO_DASK, "relay", "--listen", f"{PUBLIC}:8788")
        far = lab.start("far", *NEURO_DASK, "relay", "--listen", f"{FAR}:8788")
        for proc in (near, far):
            _wait(lambda proc=proc: "join with" in lab.log(proc), proc, lab, "a relay's banner")
        # home 1's router forwards one port to the volunteer: the `direct` column's open port
        lab.ip(
            "r1",
            "iptables",
            "-t",
            "nat",
            "-A",
            "PREROUTING",
            "-i",
            "wan",
            "-p",
            "tcp",
            "--dport",
            str(port),
            "-j",
            "DNAT",
            "--to-destination",
            f"192.168.1.2:{port}",
        )
        lab.ip("r1", "iptables", "-I", "FORWARD", "1", "-i", "wan", "-p", "tcp", "--dport", str(port), "-j", "ACCEPT")
        listen = {"direct": f"tcp://0.0.0.0:{port}", "near": f"relay://{PUBLIC}:8788", "far": f"relay://{FAR}:8788"}
        volunteer = lab.start("h1", sys.executable, "-c", VOLUNTEER, json.dumps(listen))
        _wait(lambda: "ADDRESSES " in lab.log(volunteer), volunteer, lab, "the volunteer's addresses")
        line = next(x for x in lab.log(volunteer).splitlines() if x.startswith("ADDRESSES "))
        addresses = json.loads(line[len("ADDRESSES ") :])
        paths = {
            "direct": f"tcp://10.99.0.11:{port}",
            "punched": addresses["far"],
            "relayed near": addresses["near"],
            "relayed far": addresses["far"],
        }
        row = _call(lab, "h3", paths, calls, rounds)
        lan = _call(lab, "h1b", {"lan": addresses["far"], "relayed far": addresses["far"]}, calls, rounds)
        row["lan"] = lan["lan"]
        row["chosen from home 1's LAN"] = lan["chosen"]
        return row


def _call(lab, where: str, paths: dict, calls: int, rounds: int) -> dict:
    result = lab.run(where, sys.executable, "-c", CALLER, json.dumps(paths), str(calls), str(rounds), timeout=600)
    lines = [x for x in result.stdout.splitlines() if x.startswith("RESULT ")]
    if result.returncode != 0 or not lines:
        raise RuntimeError(f"the caller in {where} failed:\n{result.stdout[-3000:]}{result.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT ") :])


def _wait(done, proc, lab, what: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        if proc.poll() is not None:
            raise RuntimeError(f"{what}: the process exited:\n{lab.log(proc)[-3000:]}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what}: not within {timeout} s:\n{lab.log(proc)[-3000:]}")
        time.sleep(0.1)


def _load() -> str:
    one, _, _ = os.getloadavg()
    return f"{one:.1f}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rtts", default=None, help="link round trips in ms (lab: 5,20; loopback: 0,5,20)")
    p.add_argument("--calls", type=int, default=50)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--loopback", action="store_true", help="loopback forwarders instead of the home lab")
    args = p.parse_args(argv)
    if args.quick:
        args.calls, args.rounds = 10, 2
    print(f"command: {' '.join([Path(sys.executable).name, *sys.argv])}")
    if not args.loopback:
        from home_nat_lab import unavailable

        why = unavailable()
        if why:
            print(f"no home lab here ({why}): run as root, or --loopback")
            return 2
        return lab_main(args)
    results = {}
    print(f"{'link rtt':>8s} {'path':>8s} {'call ms':>9s} {'[min-max]':>17s} {'connect ms':>11s}")
    for rtt_ms in (float(x) for x in (args.rtts or "0,5,20").split(",")):
        row = asyncio.run(measure(rtt_ms / 1e3, args.calls, args.rounds))
        results[str(rtt_ms)] = row
        for path, r in row.items():
            print(
                f"{rtt_ms:8.0f} {path:>8s} {r['call_ms']:9.2f} {_span(r['call_ms_range']):>17s} {r['connect_ms']:11.2f}"
            )
        extra = row["relayed"]["call_ms"] - row["direct"]["call_ms"]
        print(f"{'':8s} relay adds {extra:.2f} ms per call (one more link: {rtt_ms:.0f} ms of it)")
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "relay-loopback.json").write_text(json.dumps(results, indent=2))
    return 0


def lab_main(args) -> int:
    import tempfile

    results = {"load_before": _load()}
    print("Each home router's Internet link, and the far relay's, has the round trip in the first column;")
    print("a call is one echo RPC of a 4096-wide row: 8 KiB (bf16), 16 KiB (float32). Medians, [min-max].")
    print(f"{'link rtt':>8s} {'path':>13s} {'8 KiB call ms':>24s} {'16 KiB call ms':>24s} {'connect ms':>11s}")
    for rtt_ms in (float(x) for x in (args.rtts or "5,20").split(",")):
        with tempfile.TemporaryDirectory() as folder:
            row = lab_measure(Path(folder), rtt_ms, args.calls, args.rounds)
        results[str(rtt_ms)] = row
        for path in ("direct", "punched", "lan", "relayed near", "relayed far"):
            r = row[path]
            cells = [f"{r['call_ms'][k]:7.2f} {_span(r['call_ms_range'][k]):>16s}" for k in ("8 KiB", "16 KiB")]
            print(f"{rtt_ms:8.0f} {path:>13s} {cells[0]:>24s} {cells[1]:>24s} {r['connect_ms']:11.2f}")
        ms = {path: row[path]["call_ms"]["8 KiB"] for path in ("direct", "punched", "relayed near", "relayed far")}
        print(
            f"{'':8s} 8 KiB: punched - direct {ms['punched'] - ms['direct']:+.2f} ms; "
            f"relay on the way {ms['relayed near'] - ms['punched']:+.2f} ms; "
            f"relay off the way {ms['relayed far'] - ms['punched']:+.2f} ms"
        )
        for where, home in (("chosen", "home 3"), ("chosen from home 1's LAN", "home 1")):
            c = row[where]
            print(f"{'':8s} left alone, a client in {home} keeps {c['path']} (round trips measured, ms: {c['rtt_ms']})")
    results["load_after"] = _load()
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "relay.json").write_text(json.dumps(results, indent=2))
    print(f"load (1 min) before {results['load_before']}, after {results['load_after']}")
    return 0


def _span(lo_hi: list[float]) -> str:
    return f"[{lo_hi[0]:.2f}-{lo_hi[1]:.2f}]"


if __name__ == "__main__":
    sys.exit(main())
