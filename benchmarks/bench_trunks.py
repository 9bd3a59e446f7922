"""The hand-written trunk against the transformers trunk, on the same weights, local and distributed.

    .venv/bin/python benchmarks/bench_trunks.py [--quick] [--rounds N] [--families mixtral,olmoe]

For each family the hand-written trunk implements (mixtral, qwen2_moe, qwen3_moe, olmoe) ONE random
checkpoint is written by transformers (`AutoModelForCausalLM.from_config` + `save_pretrained`) and
sharded twice: `layout="neuro"` (neuro_dask's own trunk, model/trunk.py) and `layout="transformers"`
(the checkpoint's transformers model as the client's trunk, model/hf_trunk.py). Default size:
hidden 512, 8 layers, 8 experts of intermediate 1024, top-2, GQA 8/2, vocabulary 32,000 (the size
of bench_decode_vs_transformers.py; qwen2_moe adds its shared expert of 1024, qwen3_moe head_dim 64).
`--quick`: hidden 128, 2 layers, intermediate 256, vocabulary 2048, 2 rounds.

Before timing, both stores must generate identical greedy tokens (batch 1 and batch 8, and a
left-padded batch of 3), locally and, on the cluster, identical to the local ones; a family whose
tokens differ is reported and not timed. EOS is switched off on both models (GenerationDefaults
without eos ids) so that every run generates exactly `--new-tokens` tokens.

Measured per family, per setting, interleaved (3 rounds, --rounds; the order alternates every round;
medians):
  prefill    model.forward on 4 x 128 tokens (full logits, no cache): tokens/s
  decode b1  model.generate, 1 prompt of 16 tokens, 32 new tokens: wall time / 32 = ms per token
             (the 16-token prefill included, as in bench_decode_vs_transformers.py)
  decode b8  the same with 8 prompts of 16 tokens: wall time / 32 = ms per step (8 tokens a step)
Settings:
  local      nd.load(path): every expert in this process
  direct     nd.load(path, client=client) on an in-process cluster of 2 workers (neuro_worker preload,
             processes=False, --neuro-no-benchmark, replicas 1 and hot-extra-replicas 0: each expert
             lives on exactly one worker, placed once), calls by the direct transport
ratio = transformers-trunk time / hand-written-trunk time (> 1: the transformers trunk is slower): the
median over the rounds of that quotient within a round (the two runs of a round are back to back, so
a burst of load from other processes mostly hits both); the ratio of the medians is in the JSON too.
Both stores' experts are the same weights, run by the same SwiGLU runner (the transformers layout's
plain SwiGLU experts become ExpertWeights, runtime/hf_experts.py), so the ratio compares client trunks.

Load times (client side):
  trunk      ShardStore(path) (the trunk's sha256 checked) + assemble_model with no experts: what a
             client of a cluster does itself; interleaved, median of the rounds
  local      nd.load(path): trunk + every expert in-process (sha256-verified); interleaved, median
  direct     nd.load(path, client=client), first load of that store on a fresh cluster: publish, the
             workers fetch and load the experts, the trunk; measured once (the two stores alternate
             who goes first from one family to the next)

Everything runs in this process (the cluster's workers too), float32, CPU; machine noise hits both
sides alike, but on a shared 2-core machine absolute figures move by 2x from run to run: read
the ratios. About 5 minutes on the idle 2-core development machine (12 under heavy load from other
processes); --quick about 40 s. Results: benchmarks/results/trunks.json (`setup.quick` says which
size wrote it).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe")
LAYOUTS = ("neuro", "transformers")  # hand-written trunk, transformers trunk


@dataclasses.dataclass(frozen=True)
class Size:
    hidden: int
    layers: int
    experts: int
    top_k: int
    inter: int
    heads: int
    kv_heads: int
    vocab: int

    def describe(self) -> str:
        return (
            f"hidden {self.hidden}, {self.layers} layers, {self.experts} experts of intermediate {self.inter}, "
            f"top-{self.top_k}, GQA {self.heads}/{self.kv_heads}, vocabulary {self.vocab}"
        )


FULL = Size(hidden=512, layers=8, experts=8, top_k=2, inter=1024, heads=8, kv_heads=2, vocab=32000)
QUICK = Size(hidden=128, layers=2, experts=8, top_k=2, inter=256, heads=8, kv_heads=2, vocab=2048)


def family_config(family: str, s: Size):
    from transformers import AutoConfig

    common = dict(
        vocab_size=s.vocab,
        hidden_size=s.hidden,
        num_hidden_layers=s.layers,
        num_attention_heads=s.heads,
        num_key_value_heads=s.kv_heads,
        num_experts_per_tok=s.top_k,
        max_position_embeddings=4096,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    extra = {
        "mixtral": dict(num_local_experts=s.experts, intermediate_size=s.inter),
        "qwen2_moe": dict(
            num_experts=s.experts,
            moe_intermediate_size=s.inter,
            intermediate_size=s.inter,
            shared_expert_intermediate_size=s.inter,
        ),
        "qwen3_moe": dict(
            num_experts=s.experts,
            moe_intermediate_size=s.inter,
            intermediate_size=s.inter,
            head_dim=s.hidden // s.heads,
        ),
        "olmoe": dict(num_experts=s.experts, intermediate_size=s.inter),
    }[family]
    return AutoConfig.for_model(family, **common, **extra)


def write_family(family: str, s: Size, root: Path) -> dict[str, Path]:
    """One transformers checkpoint, sharded with both layouts; returns {layout: store}."""
    from transformers import AutoModelForCausalLM

    import neuro_dask as nd

    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(family_config(family, s)).eval()
    hf.save_pretrained(root / "hf")
    del hf
    stores = {}
    for layout in LAYOUTS:
        nd.shard_checkpoint(root / "hf", root / layout, layout=layout)
        stores[layout] = root / layout
    return stores


def no_eos(model):
    """Every run generates exactly max_new_tokens: EOS off (pad and bos as they were)."""
    model.generation = dataclasses.replace(model.generation, eos_token_ids=())
    return model


class NoExperts:
    """An executor that is never called: assemble_model needs one to build a client."""

    def run_layer(self, layer, groups):  # pragma: no cover - never called
        raise RuntimeError("not used")


def client_trunk_load(path: Path):
    from neuro_dask.client.assembly import assemble_model
    from neuro_dask.store.shard_store import ShardStore

    return assemble_model(ShardStore(path, verify=True), NoExperts(), torch.float32)


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def interleave(fns: dict[str, callable], rounds: int) -> dict[str, list[float]]:
    """Round r runs the layouts in order, reversed on odd rounds (no side is always second)."""
    names = list(fns)
    out: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        for n in names if r % 2 == 0 else names[::-1]:
            out[n].append(timed(fns[n]))
    return out


def prompts(vocab: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    prefill = torch.randint(3, vocab, (4, 128), generator=g)
    b1 = torch.randint(3, vocab, (1, 16), generator=g)
    b8 = torch.randint(3, vocab, (8, 16), generator=g)
    lengths = (5, 9, 16)
    padded = torch.zeros(len(lengths), max(lengths), dtype=torch.long)
    mask = torch.zeros_like(padded)
    for i, n in enumerate(lengths):
        padded[i, -n:] = torch.randint(3, vocab, (n,), generator=g)
        mask[i, -n:] = 1
    return prefill, b1, b8, (padded, mask)


def first_difference(a: torch.Tensor, b: torch.Tensor) -> str:
    if a.shape != b.shape:
        return f"shapes {list(a.shape)} vs {list(b.shape)}"
    diff = (a != b).nonzero()
    row, col = diff[0].tolist()
    return f"row {row}, position {col}: {a[row, col].item()} vs {b[row, col].item()}"


def outputs(model, ids, padded, n: int) -> dict[str, torch.Tensor]:
    return {
        "batch 1": model.generate(ids[0], max_new_tokens=n),
        "batch 8": model.generate(ids[1], max_new_tokens=n),
        "padded batch 3": model.generate(padded[0], padded[1], max_new_tokens=n),
    }


def compare(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], what: str) -> list[str]:
    return [f"{what}, {k}: {first_difference(a[k], b[k])}" for k in a if not torch.equal(a[k], b[k])]


def measure(models: dict, prefill_ids, b1, b8, n: int, rounds: int) -> dict:
    """Interleaved timings of both layouts' models; per-measure medians."""

    def prefill(m):
        return lambda: m.forward(prefill_ids)

    def gen(m, ids):
        return lambda: m.generate(ids, max_new_tokens=n)

    for m in models.values():  # warm-up: allocator, thread pools, connections
        m.forward(prefill_ids[:1, :16])
        m.generate(b1, max_new_tokens=2)
    res = {}
    for name, make in (("prefill", prefill), ("decode_b1", lambda m: gen(m, b1)), ("decode_b8", lambda m: gen(m, b8))):
        times = interleave({layout: make(m) for layout, m in models.items()}, rounds)
        med = {layout: statistics.median(t) for layout, t in times.items()}
        if name == "prefill":
            value = {layout: prefill_ids.numel() / t for layout, t in med.items()}  # tokens/s
        else:
            value = {layout: 1000 * t / n for layout, t in med.items()}  # ms per token (per step at batch 8)
        paired = [b / a for a, b in zip(times["neuro"], times["transformers"])]
        res[name] = {
            "value": value,
            "unit": "tokens/s" if name == "prefill" else ("ms/token" if name == "decode_b1" else "ms/step (8 tokens)"),
            "seconds": times,
            "time_ratio": statistics.median(paired),
            "round_ratios": paired,
            "ratio_of_medians": med["transformers"] / med["neuro"],
        }
    return res


@contextlib.contextmanager
def cluster(tmp: Path, workers: int = 2):
    import dask
    from distributed import Client

    from neuro_dask.client.cluster import local_cluster

    # hot-extra-replicas 0: a fixed placement, so that both trunks meet the same one (hot replicas
    # would re-plan while measuring).
    with dask.config.set(
        {
            "neuro.worker.cache-dir": str(tmp / "cache"),
            "neuro.client.transport": "direct",
            "neuro.scheduler.hot-extra-replicas": 0,
        }
    ):
        with (
            local_cluster(
                n_workers=workers,
                processes=False,
                replicas=1,
                worker_args=["--neuro-no-benchmark"],
                dashboard_address=None,
                memory_limit=0,
            ) as c,
            Client(c) as client,
        ):
            client.wait_for_workers(workers, timeout=60)
            yield client


def run_family(family: str, s: Size, tmp: Path, n: int, rounds: int, index: int, log) -> dict:
    import neuro_dask as nd

    started = time.perf_counter()
    out: dict = {"family": family, "load_average_at_start": os.getloadavg()}
    stores = write_family(family, s, tmp)
    log(f"{family}: checkpoint written and sharded twice ({time.perf_counter() - started:.1f} s)")
    prefill_ids, b1, b8, padded = prompts(s.vocab)

    # ---- load times, client side ----
    out["load_s"] = {}
    t = interleave({layout: (lambda p=p: client_trunk_load(p)) for layout, p in stores.items()}, rounds)
    out["load_s"]["client_trunk"] = {layout: statistics.median(v) for layout, v in t.items()}
    t = interleave({layout: (lambda p=p: nd.load(p)) for layout, p in stores.items()}, rounds)
    out["load_s"]["local"] = {layout: statistics.median(v) for layout, v in t.items()}
    gc.collect()

    # ---- local ----
    local = {layout: no_eos(nd.load(p)) for layout, p in stores.items()}
    ref = {layout: outputs(m, (b1, b8), padded, n) for layout, m in local.items()}
    problems = compare(ref["neuro"], ref["transformers"], "local hand-written vs transformers trunk")
    out["identical_tokens"] = {"local": not problems}
    if problems:
        out["problems"] = problems
        log(f"{family}: tokens differ locally, not timed: {problems}")
        return out
    out["local"] = measure(local, prefill_ids, b1, b8, n, rounds)
    log(f"{family}: local timed ({time.perf_counter() - started:.1f} s)")
    del local
    gc.collect()

    # ---- direct, in-process cluster of 2 workers ----
    with cluster(tmp) as client:
        order = list(LAYOUTS) if index % 2 == 0 else list(LAYOUTS)[::-1]
        remote, load = {}, {}
        for layout in order:
            start = time.perf_counter()
            remote[layout] = no_eos(nd.load(stores[layout], client=client))
            load[layout] = time.perf_counter() - start
        out["load_s"]["direct_first_load"] = load
        out["load_s"]["direct_order"] = order
        remote = {layout: remote[layout] for layout in LAYOUTS}
        got = {layout: outputs(m, (b1, b8), padded, n) for layout, m in remote.items()}
        problems = [p for layout in LAYOUTS for p in compare(ref[layout], got[layout], f"{layout}: local vs direct")]
        out["identical_tokens"]["direct"] = not problems
        if problems:
            out["problems"] = problems
            log(f"{family}: direct tokens differ from local, not timed: {problems}")
        else:
            routes = remote["neuro"].executor.routes.routes
            out["direct_workers"] = len({w for ws in routes.values() for w in ws})
            out["direct"] = measure(remote, prefill_ids, b1, b8, n, rounds)
        for m in remote.values():
            m.close()
    out["seconds"] = time.perf_counter() - started
    out["load_average_at_end"] = os.getloadavg()
    log(f"{family}: done ({out['seconds']:.1f} s, load average {os.getloadavg()[0]:.1f})")
    return out


def fmt_pair(d: dict, spec: str) -> str:
    return f"{format(d['neuro'], spec)} / {format(d['transformers'], spec)}"


def table(results: list[dict]) -> str:
    lines = [
        "| family | setting | prefill 4x128, tok/s (hw / tf) | time ratio | decode b1, ms/token (hw / tf) | "
        "time ratio | decode b8, ms/step (hw / tf) | time ratio |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in results:
        for setting in ("local", "direct"):
            m = r.get(setting)
            if m is None:
                lines.append(f"| {r['family']} | {setting} | not timed: tokens differ | | | | | |")
                continue
            lines.append(
                f"| {r['family']} | {setting} | {fmt_pair(m['prefill']['value'], ',.0f')} | "
                f"{m['prefill']['time_ratio']:.2f} | {fmt_pair(m['decode_b1']['value'], '.1f')} | "
                f"{m['decode_b1']['time_ratio']:.2f} | {fmt_pair(m['decode_b8']['value'], '.1f')} | "
                f"{m['decode_b8']['time_ratio']:.2f} |"
            )
    lines += [
        "",
        "| family | client trunk load, s (hw / tf) | nd.load local, s (hw / tf) | "
        "nd.load on the cluster, first, s (hw / tf) | tokens identical (local, direct) |",
        "| --- | --- | --- | --- | --- |",
    ]
    for r in results:
        ld = r["load_s"]
        direct = fmt_pair(ld["direct_first_load"], ".2f") if "direct_first_load" in ld else "-"
        ident = r["identical_tokens"]
        lines.append(
            f"| {r['family']} | {fmt_pair(ld['client_trunk'], '.2f')} | {fmt_pair(ld['local'], '.2f')} | "
            f"{direct} | {ident.get('local')}, {ident.get('direct')} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small model, 2 rounds (a smoke run)")
    p.add_argument("--rounds", type=int, default=None, help="interleaved rounds per measure (default 3; quick 2)")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--families", default=",".join(FAMILIES))
    args = p.parse_args(argv)
    size = QUICK if args.quick else FULL
    rounds = args.rounds or (2 if args.quick else 3)
    families = [f for f in args.families.split(",") if f]
    unknown = set(families) - set(FAMILIES)
    if unknown:
        p.error(f"unknown families {sorted(unknown)}; choose from {', '.join(FAMILIES)}")
    began = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - began:6.1f} s] {msg}", flush=True)

    results = []
    for i, family in enumerate(families):
        with tempfile.TemporaryDirectory(prefix=f"bench-trunks-{family}-") as tmp:
            results.append(run_family(family, size, Path(tmp), args.new_tokens, rounds, i, log))
        gc.collect()
    total = time.perf_counter() - began
    import transformers

    res = {
        "families": results,
        "total_seconds": total,
        "setup": {
            "quick": args.quick,
            "model": size.describe(),
            "dtype": "float32",
            "rounds": rounds,
            "new_tokens": args.new_tokens,
            "prefill": "4 x 128 tokens, model.forward",
            "decode": "1 x 16 and 8 x 16 prompts, greedy",
            "ratio": "transformers-trunk time / hand-written-trunk time, median of the per-round ratios",
            "cluster": "in-process, 2 workers, replicas 1, hot-extra-replicas 0, direct transport",
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "threads": torch.get_num_threads(),
            "cpus": os.cpu_count(),
            "load_average_at_end": os.getloadavg(),
            "machine": platform.machine(),
            "python": platform.python_version(),
        },
    }
    print(f"command: {' '.join([Path(sys.executable).name, *sys.argv])}")
    print(
        f"model: {size.describe()}; float32; {rounds} interleaved rounds, medians; "
        f"ratio = transformers trunk / hand-written trunk (time)"
    )
    print(table(results))
    print(
        f"total run time {total:.0f} s; 1-minute load average at the end {os.getloadavg()[0]:.1f} on "
        f"{os.cpu_count()} CPUs"
    )
    out = HERE / "results"
    out.mkdir(exist_ok=True)
    (out / "trunks.json").write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
