"""Volunteers that open no port, with the real commands: `neuro-dask scheduler --relay`,
`neuro-dask worker --relay`, and `neuro-dask relay` on its own (loopback; the NAT itself is
tests/slow/test_home_nat.py's).

Shown: the scheduler's banner gives the flag; workers and their nannies register at the relay
and listen on no TCP port of their own; a generation over them equals the local run; the
standalone relay tells its volunteers when to come back when it stops, and they do.
"""

from __future__ import annotations

import os
import re
import signal

import psutil
import pytest
from process_helpers import NEURO_DASK, Processes, free_port

import neuro_dask as nd
from neuro_dask.demo.addition import ASSET_DIR

pytestmark = pytest.mark.timeout(600)
PROMPTS = ["12+345=", "999+1="]


def _worker(processes, address, relay, i):
    return processes(
        *NEURO_DASK,
        "worker",
        address,
        "--relay",
        relay,
        "--memory-budget",
        "512MiB",
        "--name",
        f"home-{i}",
        "--no-idle-only",
        "--no-dashboard",
        "--neuro-no-benchmark",
    )


def _listening_hosts(proc) -> set[str]:
    """The addresses this process tree listens on (TCP)."""
    tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    hosts = set()
    for p in tree:
        try:
            hosts |= {c.laddr.ip for c in p.net_connections("tcp") if c.status == psutil.CONN_LISTEN}
        except psutil.NoSuchProcess:
            pass
    return hosts


def test_volunteers_behind_the_schedulers_relay_serve_a_generation(tmp_path):
    port, relay_port = free_port(), free_port()
    address, relay = f"tcp://127.0.0.1:{port}", f"127.0.0.1:{relay_port}"
    expected = nd.load(ASSET_DIR).generate_text(PROMPTS, max_new_tokens=6)
    with Processes(tmp_path) as processes:
        scheduler = processes(
            *NEURO_DASK,
            "scheduler",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--relay",
            relay,
            "--dashboard-address",
            "127.0.0.1:0",
        )
        banner = processes.wait_for(
            lambda: (log := processes.log(scheduler)) and "behind a NAT" in log and log, 120, "the relay line"
        )
        assert f"--relay {relay}" in banner
        workers = [_worker(processes, address, relay, i) for i in range(2)]
        for w in workers:
            processes.wait_for(lambda w=w: "connected to" in processes.log(w), 120, "a worker's connection line")
        from distributed import Client

        with Client(address) as client:
            info = client.scheduler_info()["workers"]
            assert len(info) == 2 and all(a.startswith(f"relay://{relay}/") for a in info)
            # the nanny listens on this machine only (relay/worker.py): nothing outside reaches it either
            assert all(str(w.get("nanny", "")).startswith("tcp://127.0.0.1:") for w in info.values())
            with nd.load(ASSET_DIR, client=client) as model:
                assert model.generate_text(PROMPTS, max_new_tokens=6) == expected
        for w in workers:  # a volunteer listens on no port outside its own machine (its dashboard is off)
            assert _listening_hosts(w) <= {"127.0.0.1"}, processes.log(w)[-2000:]


def test_a_standalone_relay_sends_its_volunteers_away_and_they_come_back(tmp_path):
    port, relay_port = free_port(), free_port()
    address, relay = f"tcp://127.0.0.1:{port}", f"127.0.0.1:{relay_port}"
    with Processes(tmp_path) as processes:
        processes(*NEURO_DASK, "scheduler", "--host", "127.0.0.1", "--port", str(port), "--dashboard-address", ":0")
        (tmp_path / "first").mkdir()
        first_relay = Processes(tmp_path / "first")  # apart: it is meant to exit
        first = first_relay(*NEURO_DASK, "relay", "--listen", relay, "--comeback-spread", "2")
        processes.wait_for(lambda: "join with" in first_relay.log(first), 60, "the relay's banner")
        worker = _worker(processes, address, relay, 0)
        processes.wait_for(lambda: "connected to" in processes.log(worker), 120, "the worker's connection line")
        from distributed import Client

        with Client(address) as client:
            (before,) = client.scheduler_info()["workers"]
            assert "volunteer" in first_relay.log(first) and "connected from" in first_relay.log(first)
            os.killpg(first.pid, signal.SIGINT)
            first.wait(60)
            assert re.search(r"1 volunteer\(s\) told when to come back \(within 2 s\)", first_relay.log(first))
            second = processes(*NEURO_DASK, "relay", "--listen", relay)
            processes.wait_for(lambda: "join with" in processes.log(second), 60, "the second relay's banner")
            processes.wait_for(lambda: "connected from" in processes.log(second), 60, "the volunteer back at the relay")
            assert client.scheduler_info()["workers"].keys() == {before}  # the same address
            with nd.load(ASSET_DIR, client=client) as model:  # served through the new relay
                assert model.generate_text(PROMPTS, max_new_tokens=6) == nd.load(ASSET_DIR).generate_text(
                    PROMPTS, max_new_tokens=6
                )
