"""Volunteers vanish mid-generation: `kill -9` one of 4 worker processes at random times (mean
2 s, each once the last kill has healed) during a 200-token generation while replacements join;
the output must not change.

Real processes (`dask scheduler --preload neuro_scheduler`, `dask worker --preload neuro_worker`),
trust on with one operator-trusted worker, three replicas of every expert.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections import Counter

import dask
import pytest
import torch
from distributed import Client
from polling import poll_until
from process_helpers import free_port
from tiny_models import padded_batch

import neuro_dask as nd

pytestmark = pytest.mark.slow  # ~40-60 s: replacements are real processes that import torch

TOKENS = 200
MEAN_GAP = 2.0  # seconds between kills, exponentially distributed


def test_killing_workers_mid_generation_changes_nothing(processes, sharded, tmp_path):
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    dask_cli = [sys.executable, "-m", "dask"]
    processes(
        *dask_cli,
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
        "3",
    )
    names = iter(f"w{i}" for i in range(100))
    workers: dict[str, subprocess.Popen] = {}

    def join() -> None:
        name = next(names)
        workers[name] = processes(
            *dask_cli,
            "worker",
            address,
            "--nthreads",
            "1",
            "--name",
            name,
            "--no-nanny",
            "--preload",
            "neuro_worker",
            "--neuro-no-benchmark",
        )

    for _ in range(4):
        join()
    ids, mask = padded_batch((5, 9, 13, 7), seed=11)
    expected = nd.load(sharded("mixtral")).generate(ids, mask, max_new_tokens=TOKENS)

    killed: list[str] = []
    failures: list[BaseException] = []
    done = threading.Event()

    def healed(client) -> bool:
        """The last kill is repaired: the scheduler sees only live workers, four of them, and every
        expert is back at its three replicas. On a busy machine a replacement takes many seconds to
        import torch; killing faster than that would test an empty network, not churn."""
        if done.is_set():
            return True
        status = nd.network_status(client)
        live = {n for n, p in workers.items() if p.poll() is None}
        names = {w["name"] for w in status.workers.values()}
        replicas = Counter(tuple(e) for w in status.workers.values() for e in w["serving"])
        experts = sum(m["experts"] for m in status.models.values())
        return names <= live and len(names) >= 4 and len(replicas) == experts > 0 and min(replicas.values()) >= 3

    def churn(client) -> None:
        rng = random.Random(7)
        try:
            while not done.wait(rng.expovariate(1 / MEAN_GAP)):  # the fault schedule, not a poll
                poll_until(lambda: healed(client), 180, "the network to heal after the last kill", interval=0.2)
                if done.is_set():
                    return
                live = [n for n, p in workers.items() if p.poll() is None]
                victim = rng.choice(live)
                os.killpg(workers[victim].pid, signal.SIGKILL)
                killed.append(victim)
                join()  # a replacement volunteer joins under a new name
        except BaseException as e:  # noqa: BLE001 - re-raised in the test's thread
            failures.append(e)

    trust = {
        "neuro.scheduler.trusted": ["w0"],
        "neuro.client.trust": True,
        "neuro.client.seed": 0,
        "neuro.client.routes-refresh": 0.5,
    }
    with dask.config.set(trust), Client(address, timeout=60) as client:
        client.wait_for_workers(4, timeout=120)
        with nd.load(sharded("mixtral"), client=client) as model:
            killer = threading.Thread(target=churn, args=(client,), daemon=True)
            started = time.monotonic()
            killer.start()
            try:
                out = model.generate(ids, mask, max_new_tokens=TOKENS)
            finally:
                done.set()
                killer.join()
            seconds = time.monotonic() - started
    if failures:
        raise failures[0]
    print(f"{TOKENS} tokens in {seconds:.1f} s with {len(killed)} workers killed: {killed}")
    assert len(killed) >= 2, f"the generation took {seconds:.1f} s: too short for the churn to bite"
    assert torch.equal(out, expected)
