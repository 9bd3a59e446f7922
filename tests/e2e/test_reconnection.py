"""Reconnection for real: a volunteer's worker killed and restarted under the same name, and a
scheduler killed and restarted on the same port, with `dask worker` processes (nannies) and a
client (docs/distributed.md, "Reconnection and restarts")."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time

import torch
from distributed import Client
from process_helpers import free_port
from tiny_models import padded_batch

import neuro_dask as nd
from neuro_dask.errors import NeuroDaskError

DASK = (sys.executable, "-m", "dask")


def start_scheduler(processes, port, reputation_file):
    env = {**os.environ, "DASK_NEURO__SCHEDULER__REPUTATION_FILE": str(reputation_file)}
    proc = processes(
        *DASK,
        "scheduler",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--dashboard-address",
        ":0",
        "--preload",
        "neuro_scheduler",
        "--neuro-replicas",
        "2",
        env=env,
    )
    processes.wait_for_port("127.0.0.1", port)
    return proc


def start_worker(processes, address, name, cache_dir):
    # `--neuro-cache-dir`: the same folder across restarts (Processes gives each process its own).
    return processes(
        *DASK,
        "worker",
        address,
        "--nthreads",
        "1",
        "--name",
        name,
        "--no-dashboard",
        "--preload",
        "neuro_worker",
        "--neuro-no-benchmark",
        "--neuro-cache-dir",
        str(cache_dir),
    )


def kill(proc) -> None:
    """SIGKILL the process and its children (the nanny's worker): no goodbye to anyone."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(20)


def status(client):
    return client.sync(client.scheduler.neuro_status)


def serving_by_name(client, name, experts):
    """The address of the worker called `name` once it serves `experts` experts, else None."""
    try:
        workers = status(client)["workers"]
    except Exception:  # the scheduler is restarting
        return None
    return next((a for a, w in workers.items() if w["name"] == name and len(w["serving"]) == experts), None)


def test_a_killed_worker_restarted_under_its_name_serves_from_its_cache_and_keeps_its_reputation(
    processes, sharded, tmp_path
):
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    processes.check_alive = lambda: None  # one worker is killed on purpose
    start_scheduler(processes, port, tmp_path / "reputation.json")
    start_worker(processes, address, "vol-b", tmp_path / "cache-b")
    victim = start_worker(processes, address, "vol-a", tmp_path / "cache-a")
    ids, mask = padded_batch((5, 9), seed=3)
    model_path = sharded("qwen2_moe")
    expected = nd.load(model_path).generate(ids, mask, max_new_tokens=12)
    with Client(address, timeout=60) as client:
        client.wait_for_workers(2, timeout=120)
        with nd.load(model_path, client=client) as model:
            experts = len(next(iter(status(client)["workers"].values()))["serving"])
            first = processes.wait_for(lambda: serving_by_name(client, "vol-a", experts), 120, "vol-a serving")
            assert client.sync(client.rpc(first).neuro_status)["bytes_fetched"] > 0  # its first start downloads
            client.sync(client.scheduler.neuro_trust, worker="vol-a", trusted=True)
            before = status(client)["workers"][first]

            kill(victim)
            processes.wait_for(lambda: first not in status(client)["workers"], 30, "the scheduler to drop vol-a")
            restarted = time.monotonic()
            start_worker(processes, address, "vol-a", tmp_path / "cache-a")
            again = processes.wait_for(lambda: serving_by_name(client, "vol-a", experts), 60, "vol-a serving again")
            seconds = time.monotonic() - restarted
            print(f"vol-a restarted and serving {experts} experts again in {seconds:.1f} s")

            mine = client.sync(client.rpc(again).neuro_status)
            assert mine["bytes_fetched"] == 0 and mine["files_fetched"] == 0  # nothing downloaded again
            assert mine["bytes_cached"] > 0
            after = status(client)["workers"][again]
            assert after["trust_trusted"] and before["trust_trusted"]
            for key in ("trust_established", "trust_consecutive_valid", "trust_owner", "trust_routable"):
                assert after[key] == before[key], key
            assert torch.equal(model.generate(ids, mask, max_new_tokens=12), expected)


def test_a_scheduler_restart_brings_workers_back_and_a_generation_in_flight_ends_clearly(processes, sharded, tmp_path):
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    reputation = tmp_path / "reputation.json"
    processes.check_alive = lambda: None  # the scheduler is killed on purpose
    scheduler = start_scheduler(processes, port, reputation)
    for name in ("vol-a", "vol-b"):
        start_worker(processes, address, name, tmp_path / f"cache-{name}")
    ids, mask = padded_batch((5, 9), seed=4)
    model_path = sharded("qwen2_moe")
    tokens = 240
    local = nd.load(model_path)
    expected = local.generate(ids, mask, max_new_tokens=tokens)
    expected_short = local.generate(ids, mask, max_new_tokens=24)
    outcome: dict = {}
    with Client(address, timeout=60) as client:
        client.wait_for_workers(2, timeout=120)
        with nd.load(model_path, client=client) as model:
            experts = len(next(iter(status(client)["workers"].values()))["serving"])
            for name in ("vol-a", "vol-b"):
                processes.wait_for(lambda n=name: serving_by_name(client, n, experts), 120, f"{name} serving")
            client.sync(client.scheduler.neuro_trust, worker="vol-a", trusted=True)  # saved to the file

            def generate():
                try:
                    outcome["output"] = model.generate(ids, mask, max_new_tokens=tokens)
                except Exception as exc:  # noqa: BLE001 - the test asserts what it was
                    outcome["error"] = exc

            calls_before = len(model.executor.layer_seconds)
            thread = threading.Thread(target=generate, daemon=True)
            thread.start()
            processes.wait_for(lambda: len(model.executor.layer_seconds) > calls_before + 20, 60, "the generation")
            kill(scheduler)
            assert thread.is_alive(), "the generation ended before the scheduler was killed: make it longer"
            restarted = time.monotonic()
            start_scheduler(processes, port, reputation)

            # Workers come back by themselves (their nannies restart them), under their names.
            def both_back():
                try:
                    workers = status(client)["workers"]
                except Exception:
                    return False
                return sorted(w["name"] for w in workers.values()) == ["vol-a", "vol-b"]

            processes.wait_for(both_back, 60, "both workers to re-register")
            print(f"workers re-registered {time.monotonic() - restarted:.1f} s after the scheduler restarted")
            thread.join(120)
            assert not thread.is_alive(), "the generation hangs after a scheduler restart"
            if "error" in outcome:
                assert isinstance(outcome["error"], NeuroDaskError), repr(outcome["error"])
                print(f"the generation in flight failed clearly: {outcome['error']}")
            else:
                assert torch.equal(outcome["output"], expected)
                print("the generation in flight finished after the restart, identical to local")

            assert next(w for w in status(client)["workers"].values() if w["name"] == "vol-a")["trust_trusted"]
            # The client reconnected: publish again on the new scheduler and generate like local.
            with nd.load(model_path, client=client) as again:
                for name in ("vol-a", "vol-b"):
                    processes.wait_for(lambda n=name: serving_by_name(client, n, experts), 60, f"{name} serving")
                print(f"serving again {time.monotonic() - restarted:.1f} s after the scheduler restarted")
                fetched = [client.sync(client.rpc(a).neuro_status)["bytes_fetched"] for a in status(client)["workers"]]
                assert fetched == [0, 0]  # restarted worker processes re-load from their caches
                assert torch.equal(again.generate(ids, mask, max_new_tokens=24), expected_short)


def test_a_scheduler_that_shuts_down_tells_each_volunteer_when_to_come_back(processes, sharded, tmp_path):
    """BOINC's next_rpc_delay: a scheduler stopped (Ctrl-C, an upgrade) first tells each worker
    a delay, spread over the volunteers at neuro.scheduler.comeback-rate a second; each worker's
    nanny starts a fresh one that waits for the scheduler, then for its own delay, then joins."""
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    processes.check_alive = lambda: None  # the scheduler is stopped on purpose
    names = ("vol-a", "vol-b", "vol-c")
    rate = 1.0  # a second apart on average (the default, 20 a second, is too quick to see here)
    os.environ["DASK_NEURO__SCHEDULER__COMEBACK_RATE"] = str(rate)
    try:
        scheduler = start_scheduler(processes, port, tmp_path / "reputation.json")
    finally:
        del os.environ["DASK_NEURO__SCHEDULER__COMEBACK_RATE"]
    workers = {name: start_worker(processes, address, name, tmp_path / f"cache-{name}") for name in names}
    with Client(address, timeout=60) as client:
        client.wait_for_workers(len(names), timeout=120)
        # A nanny still starting when its scheduler closes fails to start (distributed's own
        # registration comm): stop only once every nanny has finished starting.
        processes.wait_for(
            lambda: client.run_on_scheduler(lambda dask_scheduler: not dask_scheduler._starting_nannies),
            60,
            "every nanny to finish starting",
        )
    scheduler.send_signal(signal.SIGINT)
    assert scheduler.wait(60) is not None
    assert "told 3 volunteer(s) to come back within 3.0 s" in processes.log(scheduler)
    start_scheduler(processes, port, tmp_path / "reputation.json")
    told = {}

    def all_told():
        for name, proc in workers.items():
            for line in processes.log(proc).splitlines():
                if "is back: joining in" in line:
                    told[name] = float(line.split("joining in ")[1].split(" s")[0])
        return len(told) == len(names)

    processes.wait_for(all_told, 120, "each volunteer to say when it joins")
    assert all(0 <= d <= len(names) / rate for d in told.values()) and len(set(told.values())) == len(names), told
    with Client(address, timeout=60) as client:
        client.wait_for_workers(len(names), timeout=120)
        assert sorted(str(w["name"]) for w in client.scheduler_info()["workers"].values()) == list(names)
