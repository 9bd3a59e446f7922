"""What the relay costs a layer call: direct vs relayed, side by side in one run, over delayed links.

    python benchmarks/bench_relay.py            # link round trips 0, 5, 20 ms
    python benchmarks/bench_relay.py --quick

Every link gets a user-space delaying forwarder (this kernel has no netem): each chunk is held
for half the link's round trip in each direction, in order. One Dask RPC stands for a decode
step's expert call of one MoE layer: a 1 x 4096 float32 row out (16 KiB) and the same back.

Paths (a volunteer behind a NAT cannot be dialled, so `direct` is what a volunteer with an open
port gets, or a hole-punched pair; hole punching is not built yet):
- `direct`: caller -> [link] -> volunteer.
- `relayed`: caller -> [link] -> relay -> [link] -> volunteer's own connection to the relay: two
  links where direct has one (the relay near the scheduler, not on the way).
Each figure is the median of `--calls` calls on a warm connection (Dask pools them), and
`connect` is opening a new connection (the relay asks the volunteer to dial back: one more
round trip on the volunteer's link). Paths run interleaved, round by round.
Writes benchmarks/results/relay.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rtts", default="0,5,20", help="link round trips in ms")
    p.add_argument("--calls", type=int, default=50)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    if args.quick:
        args.calls, args.rounds = 10, 2
    results = {}
    print(f"command: {' '.join([Path(sys.executable).name, *sys.argv])}")
    print(f"{'link rtt':>8s} {'path':>8s} {'call ms':>9s} {'[min-max]':>17s} {'connect ms':>11s}")
    for rtt_ms in (float(x) for x in args.rtts.split(",")):
        row = asyncio.run(measure(rtt_ms / 1e3, args.calls, args.rounds))
        results[str(rtt_ms)] = row
        for path, r in row.items():
            lo, hi = r["call_ms_range"]
            print(f"{rtt_ms:8.0f} {path:>8s} {r['call_ms']:9.2f} {f'[{lo:.2f}-{hi:.2f}]':>17s} {r['connect_ms']:11.2f}")
        extra = row["relayed"]["call_ms"] - row["direct"]["call_ms"]
        print(f"{'':8s} relay adds {extra:.2f} ms per call (one more link: {rtt_ms:.0f} ms of it)")
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "relay.json").write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
