"""Speculative decoding over a simulated WAN: tokens per verification pass and ms per token,
against plain decoding, side by side in one run.

    python benchmarks/bench_speculative.py            # round trips 0, 5, 20, 50 ms
    python benchmarks/bench_speculative.py --quick    # fewer repeats

The bundled adder (4 MoE layers) on a local cluster of 2 workers (threads, direct transport),
with the round trip of every expert call set by neuro.client.simulated-latency (jitter 10%).
For each round trip the configurations run interleaved, round by round, so that drift in the
machine's load hits each alike; each figure is the median over repeats, [min-max] beside it.
ms/token is decoding's: from the first token (the prompt's prefill, which speculation does not
change) to the last, per token after the first; tokens/pass likewise counts those tokens per
pass over the layers that made them (plain decoding: 1).

Drafts: `plain` (no draft: one token per pass), `prompt-lookup`, `draft-model` (the bundled
adder-draft, trained by `neuro-dask train-demo --draft`), `self` (the adder's own trunk with
local copies of its experts). Workloads:
- `answers`: one problem per generation ("123+456="), up to 8 new tokens; each answer ends with
  an EOS after 2-5 tokens, so at most one pass after the prefill is left to save.
- `copy`: "507+0=", "0+839=", ...: the answer repeats a number of the prompt (the adder's
  version of "repeat or edit a given passage"), where prompt lookup finds its drafts.
- `continuation`: the answers' prompts with the EOS ignored, 32 new tokens: what the adder
  writes after its answer repeats itself, and a long generation shows the steady state of each
  draft.

Every speculative output is checked token for token against plain decoding before it is timed.
Writes benchmarks/results/speculative.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
from pathlib import Path

import dask
import torch
from distributed import Client

import neuro_dask as nd
from neuro_dask.client.cluster import local_cluster

ROOT = Path(__file__).resolve().parents[1]
ADDER = ROOT / "neuro_dask" / "assets" / "adder"
DRAFT = ROOT / "neuro_dask" / "assets" / "adder-draft"
PROMPTS = ["123+456=", "908+97=", "55+945=", "701+299=", "3+4="]
# Adding zero copies a number of the prompt: the adder's "repeat a given passage" task.
COPY_PROMPTS = ["507+0=", "0+839=", "921+0=", "0+264=", "748+0="]
KINDS = ("plain", "prompt-lookup", "draft-model", "self")


def _spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def _options(kind: str, draft) -> dict:
    return {"speculative": None} if kind == "plain" else {"speculative": kind, "draft_model": draft}


def _check(model, ids, max_new: int, kind: str, draft) -> torch.Tensor:
    return model.generate(ids, max_new_tokens=max_new, **_options(kind, draft))


def _run(model, ids, max_new: int, kind: str, draft) -> tuple[float, int, int]:
    """(decode seconds after the first token, tokens after the first, passes) of one generation.
    The first token comes from the prompt's prefill, which speculation does not change."""
    before = model.speculation.snapshot()
    first = None
    steps = 0
    for _ in model.stream(ids, max_new_tokens=max_new, **_options(kind, draft)):
        steps += 1
        if first is None:
            first = time.perf_counter()
    seconds = time.perf_counter() - first
    after = model.speculation.snapshot()
    passes = after["passes"] - before["passes"] if kind != "plain" else steps - 1
    return seconds, steps - 1, passes


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="fewer repeats")
    p.add_argument("--rtts", type=float, nargs="+", default=[0, 5, 20, 50], help="simulated round trips, ms")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "speculative.json"))
    args = p.parse_args(argv)
    repeats = 2 if args.quick else 4
    torch.set_num_threads(1)
    draft = nd.load(DRAFT) if DRAFT.exists() else None
    kinds = [k for k in KINDS if k != "draft-model" or draft is not None]
    workloads = {"answers": (PROMPTS, 8, True), "copy": (COPY_PROMPTS, 8, True), "continuation": (PROMPTS, 32, False)}
    result: dict = {
        "setup": {
            "model": "bundled adder (mixtral layout, 4 layers, 4 experts, top-2, hidden 64)",
            "draft_model": "bundled adder-draft (2 layers, hidden 32)" if draft else None,
            "workers": 2,
            "transport": "direct",
            "repeats": repeats,
            "prompts": PROMPTS,
            "copy_prompts": COPY_PROMPTS,
            "torch_threads": 1,
            "load_before": os.getloadavg(),
        },
        "rtt_ms": {},
    }
    with (
        local_cluster(
            n_workers=2, processes=False, replicas=2, worker_args=["--neuro-no-benchmark"], dashboard_address=None
        ) as cluster,
        Client(cluster) as client,
    ):
        client.wait_for_workers(2)
        for rtt in args.rtts:
            spec = {"delay": rtt / 1000, "jitter": rtt / 10_000} if rtt else None
            with dask.config.set({"neuro.client.simulated-latency": spec, "neuro.client.seed": 0}):
                model = nd.load(ADDER, client=client, transport="direct")
            row: dict = {}
            for name, (prompts, max_new, eos) in workloads.items():
                if not eos:
                    model.generation = dataclasses.replace(model.generation, eos_token_ids=())
                times = {k: [] for k in kinds}
                per_pass = {k: [] for k in kinds}
                for prompt in prompts:  # warm-up, and the exactness check
                    ids = torch.tensor([model.tokenizer.encode(prompt)])
                    plain = _check(model, ids, max_new, "plain", draft)
                    for kind in kinds[1:]:
                        got = _check(model, ids, max_new, kind, draft)
                        if not torch.equal(got, plain):
                            raise SystemExit(f"{kind} at {rtt} ms generated other tokens than plain decoding")
                for _ in range(repeats):
                    for kind in kinds:  # interleaved
                        seconds, tokens, passes = 0.0, 0, 0
                        for prompt in prompts:
                            ids = torch.tensor([model.tokenizer.encode(prompt)])
                            s, n, k = _run(model, ids, max_new, kind, draft)
                            seconds, tokens, passes = seconds + s, tokens + n, passes + k
                        times[kind].append(1000 * seconds / tokens)
                        per_pass[kind].append(tokens / max(passes, 1))
                plain_ms = statistics.median(times["plain"])
                row[name] = {
                    kind: {
                        "ms_per_token": _spread(times[kind]),
                        "tokens_per_pass": _spread(per_pass[kind]),
                        "vs_plain": statistics.median(times[kind]) / plain_ms,
                    }
                    for kind in kinds
                }
                if not eos:
                    model.generation = dataclasses.replace(model.generation, eos_token_ids=model.config.eos_token_id)
            model.close()
            result["rtt_ms"][str(rtt)] = row
            _print(rtt, row)
    result["setup"]["load_after"] = os.getloadavg()
    result["targets"] = _targets(result)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result["targets"], indent=2))
    print(f"wrote {args.out}")
    return 0


def _print(rtt: float, row: dict) -> None:
    print(f"\nround trip {rtt:g} ms")
    print(f"  {'workload':<13} {'draft':<14} {'ms/token':>16} {'tokens/pass':>12} {'vs plain':>9}")
    for name, kinds in row.items():
        for kind, r in kinds.items():
            ms = r["ms_per_token"]
            print(
                f"  {name:<13} {kind:<14} {ms['median']:7.1f} [{ms['min']:.0f}-{ms['max']:.0f}]"
                f" {r['tokens_per_pass']['median']:12.2f} {r['vs_plain']:9.2f}"
            )
    sys.stdout.flush()


def _targets(result: dict) -> dict:
    """docs/performance.md's targets at a 20 ms round trip, as measured here."""
    at = result["rtt_ms"].get("20.0") or result["rtt_ms"].get("20")
    if not at:
        return {}
    out = {}
    answers = at["answers"]
    if "draft-model" in answers:
        d = answers["draft-model"]
        out["draft_model_tokens_per_pass_ge_3"] = d["tokens_per_pass"]["median"] >= 3
        out["draft_model_vs_plain_le_0.4"] = d["vs_plain"] <= 0.4
    out["prompt_lookup_copy_tokens_per_pass_ge_2"] = at["copy"]["prompt-lookup"]["tokens_per_pass"]["median"] >= 2
    out["never_slower_than_plain"] = all(
        r["vs_plain"] <= 1.05 for w in at.values() for k, r in w.items() if k != "plain"
    )
    return out


if __name__ == "__main__":
    raise SystemExit(main())
