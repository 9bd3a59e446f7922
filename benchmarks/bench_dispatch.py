"""What a network hop costs per MoE layer, and decode speed distributed vs local.

    .venv/bin/python benchmarks/bench_dispatch.py [--quick]

One process tree, measured side by side: a local cluster of 2 worker processes (both plugins,
loopback TCP), the client in this process. The model has Mixtral's expert shape at a quarter
width (hidden 1024, expert intermediate 3584, 4 layers, 8 experts, top-2, random weights).

Per-layer round trip, one decode token routed to one expert (so no parallelism flatters the
distributed side; with top-2 the two experts of a token may run on two workers at once):
  local    LocalExpertExecutor.run_layer (the expert math alone)
  direct   DistributedExecutor over the worker comm handler
  futures  DistributedExecutor over pinned Dask futures
  actor    a bare Dask actor method call that does nothing (the floor for a client->worker hop)
overhead = distributed - local; target: direct overhead <= 1.5 x actor.
Decode ms/token (greedy, batch 1): distributed (both transports) vs local; target direct <= 2 x local.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch
from distributed import Client
from timing import median_ms  # benchmarks/timing.py

import neuro_dask as nd
from neuro_dask.client.cluster import local_cluster
from neuro_dask.store.synthetic import mixtral_config, write_random_mixtral

HERE = Path(__file__).resolve().parent


class Pinger:
    def ping(self):
        return None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smaller repeat counts")
    p.add_argument("--new-tokens", type=int, default=16)
    args = p.parse_args(argv)
    repeats = 20 if args.quick else 100
    torch.manual_seed(0)
    results: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        config = mixtral_config(hidden=1024, intermediate=3584, layers=4, experts=8, vocab=4096)
        write_random_mixtral(tmp / "hf", config)
        nd.shard_checkpoint(tmp / "hf", tmp / "nd")
        local = nd.load(tmp / "nd")
        rows = {5: torch.randn(1, 1024)}
        with (
            local_cluster(
                n_workers=2, processes=True, worker_args=["--neuro-no-benchmark"], dashboard_address=None
            ) as cluster,
            Client(cluster) as client,
        ):
            client.wait_for_workers(2)
            direct = nd.load(tmp / "nd", client=client, transport="direct")
            futures = nd.load(tmp / "nd", client=client, transport="futures")
            worker = sorted(cluster.scheduler_info["workers"])[0]
            actor = client.submit(Pinger, actor=True, workers=[worker]).result()

            for name, model in (("local", local), ("direct", direct), ("futures", futures)):
                model.executor.run_layer(0, rows)  # warm-up: connections, caches
                results[f"layer_{name}_ms"] = median_ms(lambda m=model: m.executor.run_layer(0, rows), repeats)
            actor.ping().result()
            results["actor_call_ms"] = median_ms(lambda: actor.ping().result(), repeats)

            ids = torch.randint(3, 4096, (1, 8), generator=torch.Generator().manual_seed(1))
            n = args.new_tokens
            reference = local.generate(ids, max_new_tokens=n)
            for name, model in (("local", local), ("direct", direct), ("futures", futures)):
                out = model.generate(ids, max_new_tokens=n)
                if not torch.equal(out, reference):
                    raise SystemExit(f"{name} generated different tokens; not timing it")
                results[f"decode_{name}_ms_per_token"] = (
                    median_ms(lambda m=model: m.generate(ids, max_new_tokens=n), max(3, repeats // 20)) / n
                )
            direct.close()
            futures.close()

    r = results
    r["direct_overhead_ms"] = r["layer_direct_ms"] - r["layer_local_ms"]
    r["futures_overhead_ms"] = r["layer_futures_ms"] - r["layer_local_ms"]
    r["direct_overhead_vs_actor"] = r["direct_overhead_ms"] / r["actor_call_ms"]
    r["futures_overhead_vs_actor"] = r["futures_overhead_ms"] / r["actor_call_ms"]
    r["decode_direct_vs_local"] = r["decode_direct_ms_per_token"] / r["decode_local_ms_per_token"]
    r["decode_futures_vs_local"] = r["decode_futures_ms_per_token"] / r["decode_local_ms_per_token"]
    r["setup"] = {
        "model": "mixtral hidden 1024, expert 3584, 4 layers, 8 experts, top-2",
        "workers": 2,
        "repeats": repeats,
        "new_tokens": args.new_tokens,
        "torch": torch.__version__,
    }
    print(f"command: {' '.join([Path(sys.executable).name, *sys.argv])}")
    print(
        f"per layer   local {r['layer_local_ms']:.2f} ms   direct {r['layer_direct_ms']:.2f} ms   "
        f"futures {r['layer_futures_ms']:.2f} ms   bare actor call {r['actor_call_ms']:.2f} ms"
    )
    print(
        f"overhead    direct {r['direct_overhead_ms']:.2f} ms = {r['direct_overhead_vs_actor']:.2f} x actor   "
        f"futures {r['futures_overhead_ms']:.2f} ms = {r['futures_overhead_vs_actor']:.2f} x actor"
    )
    print(
        f"decode      local {r['decode_local_ms_per_token']:.1f} ms/tok   direct "
        f"{r['decode_direct_ms_per_token']:.1f} ms/tok ({r['decode_direct_vs_local']:.2f} x)   futures "
        f"{r['decode_futures_ms_per_token']:.1f} ms/tok ({r['decode_futures_vs_local']:.2f} x)"
    )
    out = HERE / "results"
    out.mkdir(exist_ok=True)
    (out / "dispatch.json").write_text(json.dumps(r, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
