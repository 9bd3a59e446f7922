"""Continuous batching: 16 concurrent generate calls against one, side by side in one run.

    .venv/bin/python benchmarks/bench_continuous_batching.py

A local cluster of 2 worker processes with the bundled adder; 16 held-out problems, 8 new
tokens each. Measured: one call alone (median of 5), then 16 threads calling generate at once.
Without batching the 16 calls would take about 16 x one call; the issue asks for well under.
"""

from __future__ import annotations

import random
import statistics
import sys
import threading
import time

import torch
from distributed import Client

import neuro_dask as nd
from neuro_dask.client.cluster import local_cluster
from neuro_dask.demo.addition import ASSET_DIR, sample_problems


def main() -> int:
    with (
        local_cluster(2, processes=True, worker_args=["--neuro-no-benchmark"], dashboard_address=None) as cluster,
        Client(cluster) as client,
    ):
        client.wait_for_workers(2)
        with nd.load(ASSET_DIR, client=client) as model:
            ids = model.tokenizer.encode_batch([p.prompt for p in sample_problems(16, random.Random(0), held_out=True)])
            alone = [model.generate([row], max_new_tokens=8) for row in ids]  # also the reference
            times = []
            for _ in range(5):
                start = time.perf_counter()
                model.generate([ids[0]], max_new_tokens=8)
                times.append(time.perf_counter() - start)
            one = statistics.median(times)
            out: list = [None] * 16
            before = (model.batcher.batches, model.batcher.requests)

            def call(k: int) -> None:
                out[k] = model.generate([ids[k]], max_new_tokens=8)

            threads = [threading.Thread(target=call, args=(k,)) for k in range(16)]
            start = time.perf_counter()
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            together = time.perf_counter() - start
            batches = model.batcher.batches - before[0]
    identical = all(torch.equal(out[k], alone[k]) for k in range(16))
    print(f"command: python {' '.join(sys.argv)}")
    print(f"one generate call (8 tokens): {1000 * one:.1f} ms")
    print(f"16 concurrent calls: {1000 * together:.1f} ms in {batches} batches; outputs identical: {identical}")
    print(f"ratio: {together / one:.1f} x one call (16 x without batching)")
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())
