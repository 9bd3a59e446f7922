"""Decode ms/token and prefill tokens/s: nd.load against transformers on the same weights.

    .venv/bin/python benchmarks/bench_decode_vs_transformers.py [--quick]

The model is a random Mixtral (hidden 512, 8 layers, 8 experts, top-2, GQA 8/2) written by
transformers and sharded by neuro_dask. Both run in this process, float32, on the CPU, greedy,
interleaved A/B/A/B so that machine noise hits both alike; the ratio is neuro_dask / transformers
(<= 1.0 means neuro_dask is no slower). Results also go to benchmarks/results/ as JSON.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


def build(tmp: Path):
    import transformers

    import neuro_dask as nd

    config = transformers.MixtralConfig(
        vocab_size=32000,
        hidden_size=512,
        intermediate_size=1024,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=2,
        num_local_experts=8,
        num_experts_per_tok=2,
        max_position_embeddings=4096,
    )
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()
    hf.save_pretrained(tmp / "hf")
    nd.shard_checkpoint(tmp / "hf", tmp / "nd")
    return hf, nd.load(tmp / "nd")


def timed(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def interleave(a, b, rounds: int) -> tuple[list[float], list[float]]:
    ta, tb = [], []
    for _ in range(rounds):
        ta += timed(a, 1)
        tb += timed(b, 1)
    return ta, tb


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="fewer rounds (for a smoke run)")
    p.add_argument("--new-tokens", type=int, default=32)
    args = p.parse_args(argv)
    rounds = 2 if args.quick else 5
    with tempfile.TemporaryDirectory() as tmp:
        hf, model = build(Path(tmp))
        g = torch.Generator().manual_seed(1)
        prefill_ids = torch.randint(3, 32000, (4, 128), generator=g)
        decode_ids = torch.randint(3, 32000, (1, 16), generator=g)
        n = args.new_tokens

        # Same outputs first: a benchmark of two different computations would mean nothing.
        with torch.no_grad():
            ref = hf.generate(decode_ids, max_new_tokens=n, do_sample=False)
        mine = model.generate(decode_ids, max_new_tokens=n)
        if not torch.equal(mine, ref):
            raise SystemExit("neuro_dask and transformers generated different tokens; not timing them")
        n = ref.shape[1] - decode_ids.shape[1]  # per-token times divide by what was really generated

        def hf_prefill():
            with torch.no_grad():
                hf(input_ids=prefill_ids)

        def nd_prefill():
            model.forward(prefill_ids)

        def hf_decode():
            with torch.no_grad():
                hf.generate(decode_ids, max_new_tokens=n, do_sample=False)

        def nd_decode():
            model.generate(decode_ids, max_new_tokens=n)

        nd_prefill(), hf_prefill(), nd_decode(), hf_decode()  # warm-up
        t_nd_p, t_hf_p = interleave(nd_prefill, hf_prefill, rounds)
        t_nd_d, t_hf_d = interleave(nd_decode, hf_decode, rounds)

    tokens = prefill_ids.numel()
    res = {
        "prefill_tokens_per_s": {
            "neuro_dask": tokens / statistics.median(t_nd_p),
            "transformers": tokens / statistics.median(t_hf_p),
        },
        "decode_ms_per_token": {
            "neuro_dask": 1000 * statistics.median(t_nd_d) / n,
            "transformers": 1000 * statistics.median(t_hf_d) / n,
        },
    }
    res["prefill_time_ratio"] = statistics.median(t_nd_p) / statistics.median(t_hf_p)
    res["decode_time_ratio"] = statistics.median(t_nd_d) / statistics.median(t_hf_d)
    res["setup"] = {
        "model": "mixtral hidden 512, 8 layers, 8 experts, top-2",
        "prefill": "4 x 128 tokens",
        "decode": f"1 x 16 prompt, {n} new tokens, greedy",
        "rounds": rounds,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "python": platform.python_version(),
    }
    print(f"command: {' '.join([Path(sys.executable).name, *sys.argv])}")
    print(
        f"prefill  neuro_dask {res['prefill_tokens_per_s']['neuro_dask']:8.0f} tok/s   "
        f"transformers {res['prefill_tokens_per_s']['transformers']:8.0f} tok/s   "
        f"time ratio {res['prefill_time_ratio']:.3f}"
    )
    print(
        f"decode   neuro_dask {res['decode_ms_per_token']['neuro_dask']:8.2f} ms/tok  "
        f"transformers {res['decode_ms_per_token']['transformers']:8.2f} ms/tok  "
        f"time ratio {res['decode_time_ratio']:.3f}"
    )
    out = HERE / "results"
    out.mkdir(exist_ok=True)
    (out / "decode_vs_transformers.json").write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
