"""Throughput of many concurrent sequences, with and without pipelined micro-batches and a
simulated network round trip, and against the same model run locally.

    .venv/bin/python benchmarks/bench_pipelining.py [--hidden 1024 --intermediate 3584 --layers 8]
                                                     [--sequences 64 --new-tokens 16 --rtt 0.02 --rounds 2]

One process tree, side by side: a local cluster of 2 worker processes on loopback (direct
transport), the client in this process, the same random Mixtral-shaped model everywhere
(default: the distributed-experts benchmark's quarter-width Mixtral, with 8 MoE layers). All
`--sequences` prompts go in one `generate` call (continuous batching merges concurrent callers
into exactly that). The round trip is injected on the workers: every expert answer is held
`--rtt` seconds without blocking the worker (the drill's straggle mode with probability 1), the
way a WAN path delays it. Measured, in tokens/s (sequences x new tokens / wall time, median of
`--rounds`):
  local                       experts in this process
  distributed                 micro-batches 1, 2, 4, no injected round trip
  distributed + rtt           micro-batches 1, 2, 4, with it
Every configuration must generate the local tokens, or it is not timed.
Results: benchmarks/results/pipelining.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from distributed import Client

import neuro_dask as nd
from neuro_dask.client.cluster import local_cluster
from neuro_dask.store.synthetic import mixtral_config, write_random_mixtral

HERE = Path(__file__).resolve().parent
LANES = (1, 2, 4)


def tokens_per_second(model, ids, new_tokens: int, rounds: int, reference) -> float:
    out = model.generate(ids, max_new_tokens=new_tokens)  # warm-up, and the correctness gate
    if not torch.equal(out, reference):
        raise SystemExit("a configuration generated different tokens; not timing it")
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        model.generate(ids, max_new_tokens=new_tokens)
        times.append(time.perf_counter() - started)
    return ids.shape[0] * new_tokens / statistics.median(times)


def distributed_run(path, ids, args, reference, rtt: float) -> dict[str, float]:
    worker_args = ["--neuro-no-benchmark"]
    if rtt:
        worker_args += ["--neuro-adversary", json.dumps({"mode": "straggle", "probability": 1.0, "delay": rtt})]
    out = {}
    with (
        local_cluster(n_workers=2, processes=True, worker_args=worker_args, dashboard_address=None) as cluster,
        Client(cluster) as client,
    ):
        client.wait_for_workers(2)
        with nd.load(path, client=client, transport="direct") as model:
            for lanes in LANES:
                model.micro_batches = lanes
                out[f"lanes_{lanes}"] = tokens_per_second(model, ids, args.new_tokens, args.rounds, reference)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--intermediate", type=int, default=3584)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--sequences", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--rtt", type=float, default=0.02, help="injected seconds per expert call")
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args(argv)
    torch.manual_seed(0)
    ids = torch.randint(3, 4096, (args.sequences, 8), generator=torch.Generator().manual_seed(1))
    results: dict = {"setup": {**vars(args), "torch": torch.__version__, "workers": 2, "transport": "direct"}}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        config = mixtral_config(hidden=args.hidden, intermediate=args.intermediate, layers=args.layers, experts=8)
        write_random_mixtral(tmp / "hf", config)
        nd.shard_checkpoint(tmp / "hf", tmp / "nd")
        local = nd.load(tmp / "nd")
        reference = local.generate(ids, max_new_tokens=args.new_tokens)
        results["local"] = tokens_per_second(local, ids, args.new_tokens, args.rounds, reference)
        results["distributed"] = distributed_run(tmp / "nd", ids, args, reference, 0.0)
        results["distributed_rtt"] = distributed_run(tmp / "nd", ids, args, reference, args.rtt)
    r = results
    print(f"command: {' '.join([Path(sys.executable).name, *sys.argv])}")
    print(
        f"model: mixtral hidden {args.hidden}, expert {args.intermediate}, {args.layers} layers, 8 experts, top-2; "
        f"{args.sequences} sequences x {args.new_tokens} new tokens"
    )
    print(f"{'run':34s} {'tokens/s':>9s} {'x local':>8s} {'x 1 lane':>9s}")
    print(f"{'local':34s} {r['local']:9.1f} {1.0:8.2f}")
    for key, label in (
        ("distributed", "distributed"),
        ("distributed_rtt", f"distributed + {args.rtt * 1000:.0f} ms rtt"),
    ):
        for lanes in LANES:
            v = r[key][f"lanes_{lanes}"]
            print(f"{label + f', {lanes} lane(s)':34s} {v:9.1f} {v / r['local']:8.2f} {v / r[key]['lanes_1']:9.2f}")
    out = HERE / "results"
    out.mkdir(exist_ok=True)
    (out / "pipelining.json").write_text(json.dumps(r, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
