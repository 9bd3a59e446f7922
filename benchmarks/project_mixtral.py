"""Projected ms/token for Mixtral-8x7B-shaped layers against the round-trip time to the workers,
from costs measured on this machine.

    .venv/bin/python benchmarks/project_mixtral.py [--context 512] [--repeats 7]

Measured here (random weights at Mixtral-8x7B's shapes: hidden 4096, 32 query / 8 KV heads,
8 experts of intermediate 14336, vocabulary 32000; float32, batch 1, decode with `--context`
tokens in the KV cache):
  client_layer  one decoder layer's client side: norms, attention over the cache, router
                (a model with 3 layers minus the same model with 1, halved; experts answered at once)
  client_head   embedding, final norm and LM head, once per token (the 1-layer model minus one layer)
  expert        one expert FFN on one row (what one worker computes per call at batch 1)
  overhead      the direct transport's per-call overhead, from benchmarks/results/dispatch.json
                (1.0 ms on loopback when that file is absent)
Assumed (stated, not measured): 32 MoE layers; top-2 experts of a layer on two different workers,
called in parallel; one row of hidden states each way per call (4096 x 4 bytes, or x 2 with
`neuro.client.wire-dtype: bfloat16`) over a `--mbit` uplink; a GPU worker computes an expert call
in `--gpu-expert-ms` and a GPU client a layer in `--gpu-client-layer-ms` (and the head in 2 ms).
Projection per token:
  client_head + 32 x (client_layer + overhead + rtt + transfer + expert)
Printed beside Petals' published single-batch figures (README: about 1 s per step for BLOOM-176B
over the Internet; up to 6 steps/s for Llama 2 70B). Results: benchmarks/results/projection.json.

With speculative decoding (docs/performance.md), one pass verifies `--drafts` tokens and yields
the tokens per pass that benchmarks/bench_speculative.py measured at a 20 ms round trip (read
from benchmarks/results/speculative.json; each draft kind and workload), for the GPU column
with a bfloat16 wire: a pass costs what a plain step costs plus, per layer, the extra rows'
transfer, and the drafting (`--draft-ms` per drafted token, assumed: a small draft model on the
client's GPU). ms/token = pass / tokens per pass.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from timing import median_ms  # benchmarks/timing.py

from neuro_dask.model.config import MoEConfig
from neuro_dask.model.model import MoEModel
from neuro_dask.model.moe import ExpertWeights, run_expert
from neuro_dask.model.trunk import Trunk
from neuro_dask.store.synthetic import mixtral_config

HERE = Path(__file__).resolve().parent
LAYERS = 32
RTTS_MS = (1, 5, 20, 50)


class InstantExperts:
    """Answers every expert call with zeros at once: isolates the client's own work."""

    def run_layer(self, layer, groups):
        return {e: torch.zeros_like(x) for e, x in groups.items()}


def client_ms_per_token(layers: int, context: int, repeats: int) -> float:
    cfg = MoEConfig.from_hf(
        mixtral_config(hidden=4096, intermediate=14336, layers=layers, experts=8, vocab=32000, heads=32, kv_heads=8)
    )
    torch.manual_seed(0)
    with torch.no_grad():
        trunk = Trunk(cfg).eval()
    model = MoEModel(cfg, trunk, InstantExperts())
    ids = torch.randint(3, 32000, (1, context))
    new = 8

    def run():
        model.generate(ids, max_new_tokens=new)

    prefill = median_ms(lambda: model.generate(ids, max_new_tokens=1), repeats)
    return (median_ms(run, repeats) - prefill) / (new - 1)


def expert_ms(repeats: int) -> float:
    torch.manual_seed(0)
    w = ExpertWeights(torch.randn(14336, 4096) / 64, torch.randn(14336, 4096) / 64, torch.randn(4096, 14336) / 120)
    x = torch.randn(1, 4096)
    with torch.inference_mode():
        return median_ms(lambda: run_expert(x, w), repeats)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--context", type=int, default=512)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--mbit", type=float, default=100.0, help="assumed uplink, Mbit/s")
    p.add_argument("--gpu-expert-ms", type=float, default=0.5, help="assumed GPU time of one expert call")
    p.add_argument("--gpu-client-layer-ms", type=float, default=1.0, help="assumed GPU time of one client layer")
    p.add_argument("--drafts", type=int, default=4, help="speculative: draft tokens verified per pass")
    p.add_argument("--draft-ms", type=float, default=2.0, help="speculative: assumed ms to draft one token")
    args = p.parse_args(argv)
    one = client_ms_per_token(1, args.context, args.repeats)
    three = client_ms_per_token(3, args.context, args.repeats)
    layer = max((three - one) / 2, 0.0)
    head = max(one - layer, 0.0)
    expert = expert_ms(args.repeats)
    dispatch = HERE / "results" / "dispatch.json"
    overhead = json.loads(dispatch.read_text())["direct_overhead_ms"] if dispatch.exists() else 1.0
    rows = []
    for wire, itemsize in (("float32", 4), ("bfloat16", 2)):
        transfer = 4096 * itemsize * 8 / (args.mbit * 1e6) * 1000 * 2  # request and answer, ms
        for rtt in RTTS_MS:
            per_layer_cpu = layer + overhead + rtt + transfer + expert
            per_layer_gpu = layer + overhead + rtt + transfer + args.gpu_expert_ms
            per_layer_all_gpu = args.gpu_client_layer_ms + overhead + rtt + transfer + args.gpu_expert_ms
            rows.append(
                {
                    "wire": wire,
                    "rtt_ms": rtt,
                    "transfer_ms": transfer,
                    "cpu_workers_ms_per_token": head + LAYERS * per_layer_cpu,
                    "gpu_workers_ms_per_token": head + LAYERS * per_layer_gpu,
                    "gpu_client_and_workers_ms_per_token": 2.0 + LAYERS * per_layer_all_gpu,
                }
            )
    speculative = speculative_projection(rows, args.drafts, args.draft_ms, head_ms=2.0)
    result = {
        "speculative": speculative,
        "measured": {
            "client_layer_ms": layer,
            "client_head_ms": head,
            "expert_ms": expert,
            "overhead_ms": overhead,
            "context": args.context,
        },
        "assumed": {
            "layers": LAYERS,
            "mbit": args.mbit,
            "gpu_expert_ms": args.gpu_expert_ms,
            "gpu_client_layer_ms": args.gpu_client_layer_ms,
            "gpu_client_head_ms": 2.0,
        },
        "projection": rows,
        "petals_published": {"BLOOM-176B": "about 1 s per step", "Llama 2 70B": "up to 6 steps/s (~167 ms/token)"},
    }
    print(f"command: {' '.join([Path(sys.executable).name, *sys.argv])}")
    print(
        f"measured: client layer {layer:.2f} ms, client head {head:.2f} ms, expert (CPU, 1 row) {expert:.2f} ms, "
        f"transport overhead {overhead:.2f} ms"
    )
    print(
        f"{'wire':9s} {'rtt ms':>6s} {'this CPU, CPU workers':>22s} {'this CPU, GPU workers':>22s} "
        f"{'GPU client and workers':>23s}  (ms/token)"
    )
    for r in rows:
        print(
            f"{r['wire']:9s} {r['rtt_ms']:6d} {r['cpu_workers_ms_per_token']:22.0f} "
            f"{r['gpu_workers_ms_per_token']:22.0f} "
            f"{r['gpu_client_and_workers_ms_per_token']:23.0f}"
        )
    if speculative:
        print(f"speculative ({args.drafts} drafts per pass; GPU client and workers, bfloat16 wire; ms/token):")
        for s in speculative:
            cells = "  ".join(
                f"{rtt} ms: {ms:5.0f}{'*' if rtt in s['plain_wins'] else ' '}" for rtt, ms in s["ms_per_token"].items()
            )
            print(f"  {s['kind']:<28s} {s['tokens_per_pass']:4.2f} tokens/pass   {cells}")
        print("  * drafting does not pay there: the controller decodes plainly")
    print("Petals (published, single batch): BLOOM-176B about 1000 ms/token; Llama 2 70B about 167 ms/token")
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "projection.json").write_text(json.dumps(result, indent=2))
    return 0


def speculative_projection(rows: list[dict], drafts: int, draft_ms: float, head_ms: float) -> list[dict]:
    """ms/token of the GPU column (bfloat16 wire) when each pass verifies `drafts` tokens and yields
    the tokens per pass measured by bench_speculative.py at 20 ms, per draft kind and workload."""
    measured = HERE / "results" / "speculative.json"
    if not measured.exists():
        return []
    at = json.loads(measured.read_text())["rtt_ms"]
    at20 = at.get("20.0") or at.get("20") or {}
    gpu = {r["rtt_ms"]: r for r in rows if r["wire"] == "bfloat16"}
    out = [{"kind": "plain", "tokens_per_pass": 1.0, "ms_per_token": {}}]
    for workload, kinds in at20.items():
        for kind, r in kinds.items():
            if kind != "plain":
                out.append({"kind": f"{kind} ({workload})", "tokens_per_pass": r["tokens_per_pass"]["median"]})
    # Not measured here: DeepSeek-V3's report (5.4.3) gives 85-90% acceptance of its MTP layer's
    # one draft per pass (`speculative="mtp"`), so 1.875 tokens per pass at the midpoint.
    out.append({"kind": "mtp (DeepSeek-V3, published)", "tokens_per_pass": 1.875, "drafts": 1})
    for s in out:
        s["ms_per_token"] = {}
        k = 0 if s["kind"] == "plain" else s.get("drafts", drafts)
        s["plain_wins"] = []
        for rtt, r in gpu.items():
            step = r["gpu_client_and_workers_ms_per_token"]
            extra_transfer = LAYERS * r["transfer_ms"] * k
            ms = (step + extra_transfer + draft_ms * k) / s["tokens_per_pass"]
            if ms > step:  # the controller drafts nothing where drafting does not pay
                s["plain_wins"].append(rtt)
                ms = step
            s["ms_per_token"][rtt] = ms
    return out


if __name__ == "__main__":
    sys.exit(main())
