"""The cost of trust: decode ms/token and expert compute per token, policy off vs on.

    .venv/bin/python benchmarks/bench_trust_cost.py [--quick]

One local cluster of 3 worker processes (worker 0 operator-trusted), honest workers, a random
Mixtral (hidden 512, expert 1408, 4 layers, 8 experts, top-2), greedy decode of batch 4, measured
side by side in one run:
  off     neuro.client.trust = false: one replica per expert call, nothing checked
  steady  trust on, after warm-up generations have established every worker: adaptive
          replication at its spot-check floor (5%)
  full    trust on with spot-check 1.0: every call replicated, 2-replica quorum
Compute per token = expert evaluations per routed (token, expert) pair (replicas sent / units).
Target: steady state costs <= 15% more compute than off.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import dask
import torch
from distributed import Client

import neuro_dask as nd
from neuro_dask.client.cluster import local_cluster
from neuro_dask.store.synthetic import mixtral_config, write_random_mixtral

HERE = Path(__file__).resolve().parent


def measure(model, ids, tokens: int, rounds: int) -> float:
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        model.generate(ids, max_new_tokens=tokens)
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times) / tokens


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    rounds, tokens, warmups = (3, 8, 10) if args.quick else (5, 16, 25)
    ids = torch.randint(3, 4096, (4, 8), generator=torch.Generator().manual_seed(1))
    r: dict = {}
    with tempfile.TemporaryDirectory() as tmp, dask.config.set({"neuro.scheduler.trusted": ["0"]}):
        tmp = Path(tmp)
        write_random_mixtral(tmp / "hf", mixtral_config(hidden=512, intermediate=1408, layers=4, experts=8))
        nd.shard_checkpoint(tmp / "hf", tmp / "nd")
        reference = nd.load(tmp / "nd").generate(ids, max_new_tokens=tokens)
        with (
            local_cluster(3, worker_args=["--neuro-no-benchmark"], dashboard_address=None) as cluster,
            Client(cluster) as client,
        ):
            client.wait_for_workers(3)
            modes = {
                "off": {"neuro.client.trust": False},
                "steady": {"neuro.client.trust": True, "neuro.client.seed": 0},
                "full": {"neuro.client.trust": True, "neuro.client.seed": 0, "neuro.client.spot-check": 1.0},
            }
            models = {}
            for name, cfg in modes.items():
                with dask.config.set(cfg):
                    models[name] = nd.load(tmp / "nd", client=client)
            for _ in range(warmups):  # build every worker's record (steady state needs established workers)
                models["full"].generate(ids, max_new_tokens=tokens)
            for name, model in models.items():
                runner = model.executor.trusted
                before = (runner.replicas_sent, runner.units) if runner else (0, 0)
                out = model.generate(ids, max_new_tokens=tokens)
                if not torch.equal(out, reference):
                    raise SystemExit(f"{name}: output differs from local; not timing it")
                r[f"{name}_ms_per_token"] = measure(model, ids, tokens, rounds)
                r[f"{name}_compute_per_token"] = (
                    (runner.replicas_sent - before[0]) / max(runner.units - before[1], 1) if runner else 1.0
                )
            standing = client.sync(client.scheduler.neuro_status)["workers"]
            r["established_workers"] = sum(w["trust_established"] for w in standing.values())
            for model in models.values():
                model.close()
    for name in ("steady", "full"):
        r[f"{name}_compute_vs_off"] = r[f"{name}_compute_per_token"] / r["off_compute_per_token"]
        r[f"{name}_time_vs_off"] = r[f"{name}_ms_per_token"] / r["off_ms_per_token"]
    print(f"command: {' '.join([Path(sys.executable).name, *sys.argv])}")
    for name in ("off", "steady", "full"):
        extra = (
            ""
            if name == "off"
            else (f"  compute {r[f'{name}_compute_vs_off']:.2f} x off, time {r[f'{name}_time_vs_off']:.2f} x off")
        )
        print(
            f"{name:7s} {r[f'{name}_ms_per_token']:7.2f} ms/token   {r[f'{name}_compute_per_token']:.3f} "
            f"expert evaluations per routed pair{extra}"
        )
    print(f"established workers at the end: {r['established_workers']} of 3")
    out = HERE / "results"
    out.mkdir(exist_ok=True)
    (out / "trust_cost.json").write_text(json.dumps(r, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
