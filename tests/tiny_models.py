"""Tiny random MoE checkpoints written by transformers itself: the golden oracle's models.

Each variant is a few layers, 4 to 8 experts, top-2, grouped-query attention, seeded, and
exercises one architecture's quirks (shared expert, q/k norms, dense layers, stacked experts...).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

COMMON = dict(
    vocab_size=128,
    hidden_size=64,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    num_experts_per_tok=2,
    max_position_embeddings=256,
    initializer_range=0.1,
)

VARIANTS: dict[str, tuple[str, dict]] = {
    "mixtral": ("MixtralConfig", dict(num_local_experts=8, intermediate_size=96)),
    "qwen2_moe": (
        "Qwen2MoeConfig",
        dict(
            num_experts=6,
            moe_intermediate_size=48,
            intermediate_size=80,
            shared_expert_intermediate_size=72,
            mlp_only_layers=[1],
        ),
    ),
    "qwen3_moe": (
        "Qwen3MoeConfig",
        dict(num_experts=4, moe_intermediate_size=48, head_dim=32, norm_topk_prob=True, tie_word_embeddings=True),
    ),
    "olmoe": ("OlmoeConfig", dict(num_experts=8, intermediate_size=48, clip_qkv=4.0, eos_token_id=2, pad_token_id=1)),
    # transformers 5 keeps experts stacked in memory; a state_dict saved from it keeps that layout.
    "mixtral_stacked": ("MixtralConfig", dict(num_local_experts=4, intermediate_size=96)),
    "mixtral_sliding": ("MixtralConfig", dict(num_local_experts=4, intermediate_size=96, sliding_window=6)),
}
ARCHITECTURES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe")


def build_hf_model(variant: str, seed: int = 0):
    import transformers

    cls_name, extra = VARIANTS[variant]
    config = getattr(transformers, cls_name)(**{**COMMON, **extra})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    return model.eval()


def write_checkpoint(variant: str, root: Path, seed: int = 0) -> Path:
    """save_pretrained (per-expert tensors), or the raw stacked state_dict for *_stacked."""
    model = build_hf_model(variant, seed)
    root.mkdir(parents=True, exist_ok=True)
    if variant.endswith("_stacked"):
        from safetensors.torch import save_file

        model.config.save_pretrained(root)
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(root / "model.safetensors"), metadata={"format": "pt"})
    else:
        model.save_pretrained(root, safe_serialization=True)
    return root


def padded_batch(lengths=(5, 9, 13), vocab: int = 128, seed: int = 0):
    """Left-padded ids and mask for prompts of the given lengths (ids avoid 0..2, the specials)."""
    from neuro_dask.testing.tiny_transformers import padded_prompts

    return padded_prompts(vocab, tuple(lengths), seed)


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())
