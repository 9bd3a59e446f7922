"""Volunteers at home, for real: separate hosts and NAT home routers built with network namespaces
and iptables (tests/home_nat_lab.py), every neuro_dask piece a real process.

A scheduler and a relay on the public side; two home routers with volunteers behind them
(`neuro-dask worker --relay`); a data scientist behind a third. Shown, over plain TCP with the
scheduler's own relay and over mutual TLS with role certificates and a standalone relay that
holds no key:
- the volunteers register and serve, and a generation's tokens equal the local run's over both
  transports;
- no connection into any home is ever opened: the routers' counted DROP rules for new inbound
  connections stay at 0, their NAT translated the homes' own outbound connections, and nothing
  in a home listens beyond 127.0.0.1;
- a home router that resets every connection through it: its volunteers rejoin through the
  relay, and the next generation's tokens are the same.
"""

from __future__ import annotations

import json
import os
import sys
import textwrap

import pytest
from home_nat_lab import PUBLIC, HomeLab, unavailable
from polling import poll_until
from process_helpers import NEURO_DASK

import neuro_dask as nd
from neuro_dask.demo.addition import ASSET_DIR

WHY = unavailable()
pytestmark = [pytest.mark.slow, pytest.mark.timeout(900), pytest.mark.skipif(bool(WHY), reason=WHY or "")]

PROMPTS = ["12+345=", "999+1=", "7+8="]
SCHEDULER = f"{PUBLIC}:8786"
RELAY = f"{PUBLIC}:8788"
VOLUNTEERS = (("h1", "worker-1"), ("h1", "worker-2"), ("h2", "worker-3"))

DATA_SCIENTIST = textwrap.dedent(
    """
    import json, sys
    from distributed import Client
    import neuro_dask as nd
    address, certs, asset, n = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    transports, prompts = sys.argv[5].split(","), sys.argv[6:]
    security = None
    if certs:
        from neuro_dask.security.tls import security_for
        security = security_for("client", certs)
    out = {}
    with Client(address, security=security, timeout=60) as client:
        client.wait_for_workers(n, timeout=120)
        for transport in transports:
            with nd.load(asset, client=client, transport=transport) as model:
                out[transport] = model.generate_text(prompts, max_new_tokens=6)
                out[transport + "_routes"] = sorted({w for ws in model.executor.routes.routes.values() for w in ws})
    from neuro_dask.relay import comm
    out["paths"] = dict(comm.STATS)
    out["path_of"] = {a: p["path"] for a, p in comm.paths().items()}
    print("RESULT " + json.dumps(out), flush=True)
    """
)


def _wait_for(lab, proc, text: str, what: str, count: int = 1, timeout: float = 180) -> None:
    def seen():
        if proc.poll() is not None:
            raise AssertionError(f"{what}: the process exited:\n{lab.log(proc)[-3000:]}")
        return lab.log(proc).count(text) >= count

    poll_until(seen, timeout, what, interval=0.2)


def _transports(certs: str) -> tuple[str, ...]:
    """Both transports on the open network; on the hardened TLS one, direct only (hardened mode
    refuses the futures transport's task graphs: they are pickles)."""
    return ("direct",) if certs else ("direct", "futures")


def _generate(lab, certs: str, where: str = "h3") -> dict:
    """The data scientist's generation over each transport. On the open network its client
    reaches the volunteers by hole punching; on the TLS one it keeps to the relay."""
    result = lab.run(
        where,
        sys.executable,
        "-c",
        DATA_SCIENTIST,
        f"{'tls' if certs else 'tcp'}://{SCHEDULER}",
        certs,
        str(ASSET_DIR),
        str(len(VOLUNTEERS)),
        ",".join(_transports(certs)),
        *PROMPTS,
        timeout=400,
        env=_no_punching(certs),
    )
    lines = [line for line in result.stdout.splitlines() if line.startswith("RESULT ")]
    assert result.returncode == 0 and lines, result.stdout[-3000:] + result.stderr[-3000:]
    return json.loads(lines[-1][len("RESULT ") :])


def _home_of(lab, workers: list, address: str) -> str:
    """Which home a relayed volunteer's address belongs to, by the address in its log."""
    vid = address.rsplit("/", 1)[1]
    homes = {home for (home, _), proc in zip(VOLUNTEERS, workers, strict=True) if vid in lab.log(proc)}
    assert len(homes) == 1, (address, homes)
    return homes.pop()


def _no_punching(tls_dir: str) -> dict[str, str]:
    """The TLS network keeps every connection on the relay (the open one punches holes)."""
    return {"DASK_NEURO__CLIENT__RELAY_PUNCH": "False", "DASK_NEURO__WORKER__RELAY_PUNCH": "False"} if tls_dir else {}


def _start_network(lab, tls_dir: str) -> list:
    scheme = "tls" if tls_dir else "tcp"
    env = dict(os.environ, **_no_punching(tls_dir))
    tls = ["--tls", tls_dir] if tls_dir else ["--no-hardened"]  # the open network takes both transports
    host, port = SCHEDULER.split(":")
    if tls_dir:  # a relay of its own, holding no certificate or key
        relay = lab.start("public", *NEURO_DASK, "relay", "--listen", RELAY)
        _wait_for(lab, relay, "join with", "the relay's banner")
        where = tls
    else:  # the scheduler's own relay
        where = [*tls, "--relay", RELAY]
    scheduler = lab.start(
        "public",
        *NEURO_DASK,
        "scheduler",
        "--host",
        host,
        "--port",
        port,
        *where,
        "--dashboard-address",
        "127.0.0.1:0",
        env=env,
    )
    _wait_for(lab, scheduler, "volunteers join with", "the scheduler's banner")
    workers = []
    for home, name in VOLUNTEERS:
        workers.append(
            lab.start(
                home,
                *NEURO_DASK,
                "worker",
                f"{scheme}://{SCHEDULER}",
                "--relay",
                RELAY,
                "--name",
                name,
                *tls,
                "--memory-budget",
                "512MiB",
                "--no-idle-only",
                "--no-dashboard",
                "--neuro-no-benchmark",
                env=env,
            )
        )
    for w in workers:
        _wait_for(lab, w, "connected to", "a volunteer's connection line")
    if tls_dir:  # on a hardened TLS network only the operator publishes
        published = lab.run(
            "public", *NEURO_DASK, "publish", str(ASSET_DIR), "--scheduler", f"tls://{SCHEDULER}", "--tls", tls_dir
        )
        assert published.returncode == 0, published.stdout + published.stderr
    return workers


def _assert_nothing_dialled_in(lab, punched: bool) -> None:
    for i in (1, 2, 3):
        origins = lab.connection_origins(f"r{i}")
        assert origins and all(o.startswith(f"192.168.{i}.") for o in origins), (i, origins)
        assert lab.nat_translations(f"r{i}") > 0, f"home {i} sent nothing out"
        if not punched:  # a hole punch's first packet may arrive before the other side's and be dropped
            assert lab.inbound_attempts(f"r{i}") == 0, f"a connection into home {i} was attempted"
    for home in ("h1", "h2"):
        assert lab.listening(home) <= {"127.0.0.1", "[::1]"}, lab.listening(home)


@pytest.mark.parametrize("tls", [False, True], ids=["tcp-scheduler-relay", "mutual-tls-standalone-relay"])
def test_volunteers_at_home_serve_through_the_relay_and_nothing_dials_in(tmp_path, tls):
    expected = nd.load(ASSET_DIR).generate_text(PROMPTS, max_new_tokens=6)
    certs = ""
    if tls:
        from cluster_helpers import make_certs

        certs = str(make_certs(tmp_path / "certs", workers=len(VOLUNTEERS)))
        for name in os.listdir(certs):  # the certificates' folder, readable by every process here
            os.chmod(os.path.join(certs, name), 0o600)
    with HomeLab(tmp_path) as lab:
        workers = _start_network(lab, certs)
        first = _generate(lab, certs)
        assert all(first[t] == expected for t in _transports(certs))
        assert first["direct_routes"] and all(w.startswith(f"relay://{RELAY}/") for w in first["direct_routes"])
        if tls:  # through the relay
            assert first["paths"]["punched"] == 0 and first["paths"]["relayed"] >= 1
        else:  # straight to the volunteers, through both NATs
            assert first["paths"]["punched"] >= 2 and first["paths"]["punch_failed"] == 0, first["paths"]
            assert set(first["path_of"].values()) == {"punched"}, first["path_of"]
            # a data scientist on home 1's own LAN reaches home 1's volunteers over that LAN
            # (its router does not loop traffic for its public address back in), home 2's punched
            at_home = _generate(lab, certs, where="h1b")
            assert all(at_home[t] == expected for t in _transports(certs))
            homes = {_home_of(lab, workers, w): path for w, path in at_home["path_of"].items()}
            assert homes == {"h1": "lan", "h2": "punched"}, at_home["path_of"]
        _assert_nothing_dialled_in(lab, punched=not tls)

        # home 1's router resets every connection through it, then comes back
        lab.drop_all_connections("r1")
        h1 = [w for (home, _), w in zip(VOLUNTEERS, workers, strict=True) if home == "h1"]
        for w in h1:  # each lost its scheduler: the nanny starts it again, and it waits for the network
            _wait_for(lab, w, "restarting this worker", "a volunteer noticing its router dropped it")
        lab.restore("r1")
        for w in h1:
            _wait_for(lab, w, "connected to", "a volunteer back through the relay", count=2)
        again = _generate(lab, certs)
        assert all(again[t] == expected for t in _transports(certs))
        _assert_nothing_dialled_in(lab, punched=not tls)
