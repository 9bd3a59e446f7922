"""Volunteers vanish mid-generation: `kill -9` one of 4 worker processes at random times (mean
2 s) during a 200-token generation while replacements join; the output must not change.

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

import dask
import pytest
import torch
from distributed import Client
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
    processes(*dask_cli, "scheduler", "--host", "127.0.0.1", "--port", str(port), "--dashboard-address", ":0",
              "--preload", "neuro_scheduler", "--neuro-replicas", "3")
    names = iter(f"w{i}" for i in range(100))
    workers: dict[str, subprocess.Popen] = {}

    def join() -> None:
        name = next(names)
        workers[name] = processes(*dask_cli, "worker", address, "--nthreads", "1", "--name", name,
                                  "--no-nanny", "--preload", "neuro_worker", "--neuro-no-benchmark")

    for _ in range(4):
        join()
    ids, mask = padded_batch((5, 9, 13, 7), seed=11)
    expected = nd.load(sharded("mixtral")).generate(ids, mask, max_new_tokens=TOKENS)

    killed: list[str] = []
    done = threading.Event()

    def churn() -> None:
        rng = random.Random(7)
        while not done.wait(rng.expovariate(1 / MEAN_GAP)):  # the fault schedule, not a poll
            live = [n for n, p in workers.items() if p.poll() is None]
            victim = rng.choice(live)
            os.killpg(workers[victim].pid, signal.SIGKILL)
            killed.append(victim)
            join()  # a replacement volunteer joins under a new name

    trust = {"neuro.scheduler.trusted": ["w0"], "neuro.client.trust": True, "neuro.client.seed": 0,
             "neuro.client.routes-refresh": 0.5}
    with dask.config.set(trust), Client(address, timeout=60) as client:
        client.wait_for_workers(4, timeout=120)
        with nd.load(sharded("mixtral"), client=client) as model:
            killer = threading.Thread(target=churn, daemon=True)
            started = time.monotonic()
            killer.start()
            try:
                out = model.generate(ids, mask, max_new_tokens=TOKENS)
            finally:
                done.set()
                killer.join()
            seconds = time.monotonic() - started
    print(f"{TOKENS} tokens in {seconds:.1f} s with {len(killed)} workers killed: {killed}")
    assert len(killed) >= 2, f"the generation took {seconds:.1f} s: too short for the churn to bite"
    assert torch.equal(out, expected)
