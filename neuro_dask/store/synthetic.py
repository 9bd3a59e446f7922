"""Random Mixtral-layout checkpoints of any size, written one tensor at a time.

For benchmarks and memory tests that need a checkpoint too large to build in memory (or simply
larger than the tiny test models), without transformers.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from neuro_dask.store.safetensors_io import StreamingWriter


def mixtral_config(
    hidden: int,
    intermediate: int,
    layers: int,
    experts: int,
    vocab: int = 4096,
    heads: int = 8,
    kv_heads: int = 2,
    top_k: int = 2,
    max_positions: int = 4096,
) -> dict:
    return dict(
        model_type="mixtral",
        architectures=["MixtralForCausalLM"],
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        num_local_experts=experts,
        num_experts_per_tok=top_k,
        max_position_embeddings=max_positions,
        rms_norm_eps=1e-5,
        rope_theta=1e6,
        hidden_act="silu",
        tie_word_embeddings=False,
        eos_token_id=2,
        bos_token_id=1,
    )


def _tensor_specs(c: dict) -> list[tuple[str, tuple[int, ...]]]:
    d, i, e = c["hidden_size"], c["intermediate_size"], c["num_local_experts"]
    kv = c["num_key_value_heads"] * d // c["num_attention_heads"]
    specs = [
        ("model.embed_tokens.weight", (c["vocab_size"], d)),
        ("model.norm.weight", (d,)),
        ("lm_head.weight", (c["vocab_size"], d)),
    ]
    for layer in range(c["num_hidden_layers"]):
        p = f"model.layers.{layer}"
        specs += [
            (f"{p}.input_layernorm.weight", (d,)),
            (f"{p}.post_attention_layernorm.weight", (d,)),
            (f"{p}.self_attn.q_proj.weight", (d, d)),
            (f"{p}.self_attn.k_proj.weight", (kv, d)),
            (f"{p}.self_attn.v_proj.weight", (kv, d)),
            (f"{p}.self_attn.o_proj.weight", (d, d)),
            (f"{p}.block_sparse_moe.gate.weight", (e, d)),
        ]
        for x in range(e):
            q = f"{p}.block_sparse_moe.experts.{x}"
            specs += [(f"{q}.w1.weight", (i, d)), (f"{q}.w3.weight", (i, d)), (f"{q}.w2.weight", (d, i))]
    return specs


def write_random_mixtral(root: str | Path, config: dict, files: int = 1, seed: int = 0) -> tuple[int, int]:
    """Write config.json and `files` safetensors files (+ index when > 1); returns (bytes, largest tensor bytes).

    Norm weights are ones and matrices N(0, 1/sqrt(fan_in)), so activations stay in a sane range.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    specs = _tensor_specs(config)
    per_file = math.ceil(len(specs) / files)
    parts = {
        (f"model-{n + 1:05d}-of-{files:05d}.safetensors" if files > 1 else "model.safetensors"): specs[
            n * per_file : (n + 1) * per_file
        ]
        for n in range(files)
    }
    g = torch.Generator().manual_seed(seed)

    def make(shape):
        if len(shape) == 1:
            return torch.ones(shape)
        return torch.randn(shape, generator=g) / math.sqrt(shape[-1])

    total = 0
    for name, part in parts.items():
        writer = StreamingWriter(root / name, [(n, torch.float32, s) for n, s in part])
        writer.write(make(s) for _, s in part)
        total += writer.bytes
    if files > 1:
        weight_map = {n: f for f, part in parts.items() for n, _ in part}
        (root / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (root / "config.json").write_text(json.dumps(config))
    return total, max(4 * math.prod(s) for _, s in specs)
