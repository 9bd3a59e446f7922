"""The volunteer path for real: `dask scheduler --preload neuro_scheduler`, two
`dask worker --preload neuro_worker` processes (one through `neuro-dask worker`), and a client."""

from __future__ import annotations

import sys

import torch
from distributed import Client
from process_helpers import free_port
from tiny_models import padded_batch

import neuro_dask as nd


def test_cli_scheduler_two_workers_and_a_client_generate_like_local(processes, sharded, tmp_path):
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
    )
    processes(*dask_cli, "worker", address, "--nthreads", "1", "--preload", "neuro_worker", "--neuro-no-benchmark")
    # --no-idle-only: the test itself keeps the machine busy, which an idle-only volunteer yields to
    # (tests/integration/test_idle_pause.py covers that).
    processes(
        sys.executable,
        "-m",
        "neuro_dask.cli.main",
        "worker",
        address,
        "--memory-budget",
        "512MiB",
        "--owner",
        "volunteer-b",
        "--no-dashboard",
        "--no-idle-only",
    )
    ids, mask = padded_batch((5, 9, 13), seed=6)
    expected = nd.load(sharded("qwen2_moe")).generate(ids, mask, max_new_tokens=24)
    with Client(address, timeout=60) as client:
        client.wait_for_workers(2, timeout=120)
        with nd.load(sharded("qwen2_moe"), client=client) as model:
            assert torch.equal(model.generate(ids, mask, max_new_tokens=24), expected)
            status = client.sync(client.scheduler.neuro_status)
    owners = sorted(w["owner"] for w in status["workers"].values())
    assert owners == ["", "volunteer-b"]
    assert all(w["serving"] for w in status["workers"].values())
    assert any(w["memory_budget"] == 512 * 2**20 for w in status["workers"].values())
