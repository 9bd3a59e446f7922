"""Decode speed under simulated WAN round trips, latency-aware routing on vs off, and the
per-layer cost decomposition for projections.

    .venv/bin/python benchmarks/bench_latency.py [--quick] [--rtts 1 5 20 50]

An in-process cluster of 4 workers (loopback TCP, both plugins), every expert on every worker,
the client in this process; trust off, direct transport. Model: Mixtral's shape at an eighth of
its width (hidden 512, expert intermediate 1792, 4 layers, 8 experts, top-2, random weights),
float32, CPU. Simulated latency (neuro.client.simulated-latency, jitter 10% of the delay) per
call, for each RTT R:
  uniform      every worker R away                     (the cost of the WAN itself)
  uniform-spread  the same with packing off (a layer's experts on as many workers as it can)
  mixed-off    half the workers R away, half 1 ms; latency-aware routing off (today's plan)
  mixed-on     the same; latency-aware routing on
Decode ms/token, batch 1, greedy, one sequence: (time of n+1 new tokens - time of 1) / n, so
the prompt's prefill is left out; medians of interleaved repeats; every configuration must
generate exactly the local model's tokens before it is timed.
Decomposition (no simulated latency): client compute per layer (local decode minus its expert
time, per layer), worker compute per call (one expert, one row, measured in this process),
transport overhead per call (direct call of one expert minus worker compute).
Writes benchmarks/results/latency.json.
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
from timing import median_ms  # benchmarks/timing.py

import neuro_dask as nd
from neuro_dask.client.cluster import local_cluster
from neuro_dask.store.synthetic import mixtral_config, write_random_mixtral
from neuro_dask.trust.latency import LatencyPolicy

HERE = Path(__file__).resolve().parent
HIDDEN, INTERMEDIATE, LAYERS, EXPERTS, VOCAB = 512, 1792, 4, 8, 4096


def decode_ms(model, ids, n: int) -> float:
    start = time.perf_counter()
    model.generate(ids, max_new_tokens=1)
    one = time.perf_counter() - start
    start = time.perf_counter()
    model.generate(ids, max_new_tokens=n + 1)
    return 1000 * (time.perf_counter() - start - one) / n


class Timed:
    """Wraps an executor's run_layer to add up the time spent in expert calls."""

    def __init__(self, executor):
        self.inner, self.seconds, self.layers = executor.run_layer, 0.0, 0
        executor.run_layer = self

    def __call__(self, layer, groups):
        start = time.perf_counter()
        try:
            return self.inner(layer, groups)
        finally:
            self.seconds += time.perf_counter() - start
            self.layers += 1


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="fewer tokens and repeats")
    p.add_argument("--rtts", type=float, nargs="+", default=[1, 5, 20, 50], help="simulated RTTs in ms")
    p.add_argument("--near-ms", type=float, default=1.0, help="RTT of the close half in the mixed runs")
    p.add_argument("--workers", type=int, default=4)
    args = p.parse_args(argv)
    n, repeats = (6, 3) if args.quick else (12, 5)
    torch.manual_seed(0)
    torch.set_num_threads(1)
    out: dict = {
        "rtt_ms": {},
        "setup": {
            "model": f"mixtral hidden {HIDDEN}, expert {INTERMEDIATE}, {LAYERS} layers, {EXPERTS} experts, top-2",
            "workers": args.workers,
            "replicas": args.workers,
            "transport": "direct",
            "trust": False,
            "new_tokens": n,
            "repeats": repeats,
            "near_ms": args.near_ms,
            "jitter": "10% of the delay",
            "torch": torch.__version__,
            "torch_threads": 1,
        },
    }
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_random_mixtral(
            tmp / "hf",
            mixtral_config(hidden=HIDDEN, intermediate=INTERMEDIATE, layers=LAYERS, experts=EXPERTS, vocab=VOCAB),
        )
        nd.shard_checkpoint(tmp / "hf", tmp / "nd")
        ids = torch.randint(3, VOCAB, (1, 8), generator=torch.Generator().manual_seed(1))
        local = nd.load(tmp / "nd")
        reference = local.generate(ids, max_new_tokens=n + 1)

        # Decomposition, part 1: the local model's expert time vs the rest.
        timed = Timed(local.executor)
        local_ms = statistics.median(decode_ms(local, ids, n) for _ in range(repeats))
        spent = []
        for tokens in (1, n + 1):  # the difference is decode alone, without the prompt's prefill
            timed.seconds, timed.layers = 0.0, 0
            local.generate(ids, max_new_tokens=tokens)
            spent.append((timed.seconds, timed.layers))
        expert_layer_ms = 1000 * (spent[1][0] - spent[0][0]) / (spent[1][1] - spent[0][1])
        one = {5: torch.randn(1, HIDDEN)}
        worker_call_ms = median_ms(lambda: timed.inner(0, one), 50)  # one expert, one row: the worker's compute
        with (
            local_cluster(
                n_workers=args.workers,
                processes=False,
                replicas=args.workers,
                worker_args=["--neuro-no-benchmark"],
                dashboard_address=None,
            ) as cluster,
            Client(cluster) as client,
        ):
            client.wait_for_workers(args.workers)
            workers = sorted(client.scheduler_info()["workers"])
            far, near = workers[: len(workers) // 2], workers[len(workers) // 2 :]

            def load(spec, aware=True, pack=True):
                with dask.config.set(
                    {
                        "neuro.client.simulated-latency": spec,
                        "neuro.client.seed": 0,
                        "neuro.client.latency-aware": aware,
                    }
                ):
                    model = nd.load(tmp / "nd", client=client, transport="direct")
                model.executor.transport.latency.policy = LatencyPolicy(pack=pack)
                if not torch.equal(model.generate(ids, max_new_tokens=n + 1), reference):
                    raise SystemExit(f"{spec} aware={aware} pack={pack} generated different tokens; not timing it")
                return model

            # Decomposition, part 2: one direct call of one expert, no simulated latency.
            plain = load(None)
            plain.executor.run_layer(0, one)
            direct_call_ms = median_ms(lambda: plain.executor.run_layer(0, one), 100)
            plain.close()

            for rtt in args.rtts:
                r = rtt / 1000
                uniform = {"delay": r, "jitter": r / 10}
                mixed = {
                    "delay": r,
                    "jitter": r / 10,
                    "workers": {w: {"delay": args.near_ms / 1000, "jitter": args.near_ms / 10_000} for w in near},
                }
                models = {
                    "uniform": load(uniform),
                    "uniform-spread": load(uniform, pack=False),
                    "mixed-off": load(mixed, aware=False),
                    "mixed-on": load(mixed),
                }
                times: dict[str, list[float]] = {k: [] for k in models}
                layer_ms: dict[str, list[float]] = {k: [] for k in models}
                for _ in range(repeats):  # interleaved, so drift hits every configuration alike
                    for name, model in models.items():
                        model.executor.layer_seconds.clear()
                        times[name].append(decode_ms(model, ids, n))
                        layer_ms[name].append(1000 * statistics.median(model.executor.layer_seconds))
                row = {"one_expert_call_ms": median_ms(lambda m=models["uniform"]: m.executor.run_layer(0, one), 30)}
                for name, model in models.items():
                    book = model.executor.transport.latency
                    row[name] = {
                        "ms_per_token": statistics.median(times[name]),
                        "layer_ms_p50": statistics.median(layer_ms[name]),
                        "calls_to_far": sum(book.samples.get(w, 0) for w in far) if name.startswith("mixed") else None,
                        "calls": sum(book.samples.values()),
                        "explored": book.explored,
                    }
                    model.close()
                row["uniform_layer_minus_rtt_ms"] = row["uniform"]["layer_ms_p50"] - rtt
                row["mixed_on_vs_off"] = row["mixed-on"]["ms_per_token"] / row["mixed-off"]["ms_per_token"]
                row["pack_vs_spread"] = row["uniform"]["ms_per_token"] / row["uniform-spread"]["ms_per_token"]
                out["rtt_ms"][str(rtt)] = row

    client_layer_ms = (local_ms - expert_layer_ms * LAYERS) / LAYERS
    out["local_ms_per_token"] = local_ms
    out["decomposition"] = {
        "client_compute_per_layer_ms": client_layer_ms,
        "client_compute_note": "local decode minus its expert time, divided by layers (includes the LM head's share)",
        "local_expert_time_per_layer_ms": expert_layer_ms,
        "worker_compute_per_call_ms": worker_call_ms,
        "worker_compute_note": "one expert of hidden 512 x 1792, one row, float32, 1 thread, this CPU",
        "direct_call_ms": direct_call_ms,
        "transport_overhead_per_call_ms": direct_call_ms - worker_call_ms,
        "model": "ms/token ~= layers x (client compute per layer + RTT + transport overhead + worker compute)",
    }
    print(f"command: {' '.join([Path(sys.executable).name, *sys.argv])}")
    d = out["decomposition"]
    print(
        f"local decode {local_ms:.2f} ms/token; per layer: client {d['client_compute_per_layer_ms']:.2f} ms, "
        f"worker compute per call {worker_call_ms:.2f} ms, direct call {direct_call_ms:.2f} ms "
        f"(transport overhead {d['transport_overhead_per_call_ms']:.2f} ms)"
    )
    print(
        f"{'RTT ms':>7} {'uniform':>9} {'unif-spread':>11} {'mixed-off':>10} {'mixed-on':>9} {'on/off':>7} "
        f"{'far calls off/on':>17}   ms/token"
    )
    for rtt, row in out["rtt_ms"].items():
        print(
            f"{rtt:>7} {row['uniform']['ms_per_token']:9.1f} {row['uniform-spread']['ms_per_token']:11.1f} "
            f"{row['mixed-off']['ms_per_token']:10.1f} {row['mixed-on']['ms_per_token']:9.1f} "
            f"{row['mixed_on_vs_off']:7.2f} "
            f"{row['mixed-off']['calls_to_far']:>8}/{row['mixed-off']['calls']}"
            f" {row['mixed-on']['calls_to_far']}/{row['mixed-on']['calls']}"
        )
    results = HERE / "results"
    results.mkdir(exist_ok=True)
    (results / "latency.json").write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
