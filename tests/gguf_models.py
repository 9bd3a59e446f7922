"""Tiny GGUF MoE files written with gguf.GGUFWriter from the tiny transformers models of tiny_models.py.

The tensors and metadata follow llama.cpp's convert_hf_to_gguf.py: Mixtral becomes arch "llama"
with expert_count, its Q and K rows permuted (`LlamaModel.permute`), experts stacked per layer
(ffn_gate_exps [E, I, D] ...); qwen2_moe becomes "qwen2moe" with shared-expert tensors (*_shexp).
`qtype` quantizes every matrix but the router (llama.cpp keeps norms, biases and ffn_gate_inp
in F32 too) and those whose rows are not whole quantization blocks, which stay F32.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from tiny_models import build_hf_model

from neuro_dask.store.gguf_reader import permute_qk

GGUF_ARCH = {"mixtral": "llama", "qwen2_moe": "qwen2moe"}


def _stack(experts, names, layer: int, e: int, leaf: str) -> torch.Tensor:
    return torch.stack([experts[f"model.layers.{layer}.mlp.experts.{i}.{leaf}"] for i in range(e)])


def gguf_tensors(variant: str, seed: int = 0) -> tuple[object, dict[str, torch.Tensor]]:
    """(HF config, GGUF name -> float32 tensor in GGUF (llama.cpp) layout) for a tiny variant."""
    model = build_hf_model(variant, seed)
    cfg = model.config
    state = {k: v.detach().float().contiguous() for k, v in model.state_dict().items()}
    out: dict[str, torch.Tensor] = {
        "token_embd.weight": state["model.embed_tokens.weight"],
        "output_norm.weight": state["model.norm.weight"],
    }
    if not cfg.tie_word_embeddings:
        out["output.weight"] = state["lm_head.weight"]
    permute = GGUF_ARCH[variant] == "llama"
    for n in range(cfg.num_hidden_layers):
        p, b = f"model.layers.{n}.", f"blk.{n}."
        q, k = state[p + "self_attn.q_proj.weight"], state[p + "self_attn.k_proj.weight"]
        if permute:
            q = permute_qk(q, cfg.num_attention_heads)
            k = permute_qk(k, cfg.num_key_value_heads)
        out.update(
            {
                b + "attn_norm.weight": state[p + "input_layernorm.weight"],
                b + "ffn_norm.weight": state[p + "post_attention_layernorm.weight"],
                b + "attn_q.weight": q,
                b + "attn_k.weight": k,
                b + "attn_v.weight": state[p + "self_attn.v_proj.weight"],
                b + "attn_output.weight": state[p + "self_attn.o_proj.weight"],
            }
        )
        for leaf in ("q", "k", "v"):
            if p + f"self_attn.{leaf}_proj.bias" in state:
                out[b + f"attn_{leaf}.bias"] = state[p + f"self_attn.{leaf}_proj.bias"]
        if p + "mlp.gate.weight" not in state:  # a dense (mlp_only) layer
            for leaf in ("gate", "up", "down"):
                out[b + f"ffn_{leaf}.weight"] = state[p + f"mlp.{leaf}_proj.weight"]
            continue
        out[b + "ffn_gate_inp.weight"] = state[p + "mlp.gate.weight"]
        gate_up = state[p + "mlp.experts.gate_up_proj"]  # transformers 5: [E, 2I, D], gate rows first
        half = gate_up.shape[1] // 2
        out[b + "ffn_gate_exps.weight"] = gate_up[:, :half].contiguous()
        out[b + "ffn_up_exps.weight"] = gate_up[:, half:].contiguous()
        out[b + "ffn_down_exps.weight"] = state[p + "mlp.experts.down_proj"]
        if p + "mlp.shared_expert.gate_proj.weight" in state:
            for leaf in ("gate", "up", "down"):
                out[b + f"ffn_{leaf}_shexp.weight"] = state[p + f"mlp.shared_expert.{leaf}_proj.weight"]
            out[b + "ffn_gate_inp_shexp.weight"] = state[p + "mlp.shared_expert_gate.weight"].reshape(-1)
    return cfg, out


def write_gguf(
    variant: str,
    path: Path,
    qtype: str = "F32",
    seed: int = 0,
    arch: str | None = None,
    drop: tuple[str, ...] = (),
    metadata: bool = True,
) -> Path:
    """Write the tiny `variant` as a GGUF file; `arch`, `drop` and `metadata` make broken files for tests."""
    import gguf

    cfg, tensors = gguf_tensors(variant, seed)
    arch = arch or GGUF_ARCH[variant]
    quant = gguf.GGMLQuantizationType[qtype]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(f"tiny-{variant}")
    if metadata:
        w.add_block_count(cfg.num_hidden_layers)
        w.add_context_length(cfg.max_position_embeddings)
        w.add_embedding_length(cfg.hidden_size)
        w.add_head_count(cfg.num_attention_heads)
        w.add_head_count_kv(cfg.num_key_value_heads)
        w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
        w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
        w.add_expert_used_count(cfg.num_experts_per_tok)
        if variant.startswith("mixtral"):
            w.add_feed_forward_length(cfg.intermediate_size)
            w.add_expert_count(cfg.num_local_experts)
        else:
            w.add_feed_forward_length(cfg.intermediate_size)
            w.add_expert_count(cfg.num_experts)
            w.add_expert_feed_forward_length(cfg.moe_intermediate_size)
            w.add_expert_shared_feed_forward_length(cfg.shared_expert_intermediate_size)
    for key, value in (("bos", cfg.bos_token_id), ("eos", cfg.eos_token_id), ("pad", cfg.pad_token_id)):
        if value is not None:
            getattr(w, f"add_{key}_token_id")(int(value))
    w.add_file_type(gguf.LlamaFileType.ALL_F32 if qtype == "F32" else gguf.LlamaFileType[f"MOSTLY_{qtype}"])
    for name, tensor in tensors.items():
        if name in drop:
            continue
        array = tensor.numpy().astype(np.float32)
        # like llama.cpp: rows that are not whole blocks (qwen2_moe's I=48 with Q8_0's 32) fall back
        keep_f32 = (
            array.ndim == 1
            or name.endswith("ffn_gate_inp.weight")
            or array.shape[-1] % gguf.GGML_QUANT_SIZES[quant][0] != 0
        )
        if quant == gguf.GGMLQuantizationType.F32 or keep_f32:
            w.add_tensor(name, array)
        else:
            w.add_tensor(name, gguf.quants.quantize(array, quant), raw_dtype=quant)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
