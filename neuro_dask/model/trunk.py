"""The trunk: everything but the routed experts. It runs in the data scientist's process.

Parameter names here are neuro_dask's canonical names (HF's without the `model.` prefix, the
router always `router`); neuro_dask/model/keymap.py maps each architecture's HF names onto them.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from neuro_dask.errors import MissingTensorError, TensorShapeError
from neuro_dask.model.config import MoEConfig
from neuro_dask.model.layers import Attention, RMSNorm, SwiGLU


class TrunkLayer(nn.Module):
    def __init__(self, cfg: MoEConfig, index: int):
        super().__init__()
        self.index = index
        self.is_moe = cfg.is_moe_layer(index)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.sliding_window = cfg.sliding_window
        if self.is_moe:
            self.router = nn.Linear(cfg.hidden_size, cfg.num_experts, bias=False)
            if cfg.shared_expert_intermediate_size:
                self.shared_expert = SwiGLU(cfg.hidden_size, cfg.shared_expert_intermediate_size)
                self.shared_expert_gate = nn.Linear(cfg.hidden_size, 1, bias=False)
        else:
            self.mlp = SwiGLU(cfg.hidden_size, cfg.intermediate_size)

    def shared_output(self, x: torch.Tensor) -> torch.Tensor | None:
        """Qwen2-MoE's always-on expert, scaled by its sigmoid gate; None elsewhere."""
        if not hasattr(self, "shared_expert"):
            return None
        return torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)


class Trunk(nn.Module):
    def __init__(self, cfg: MoEConfig):
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(TrunkLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def expected_tensors(self) -> dict[str, tuple[int, ...]]:
        """Canonical name -> shape of every tensor a trunk file must hold."""
        shapes = {name: tuple(p.shape) for name, p in self.state_dict().items()}
        if self.config.tie_word_embeddings:
            shapes.pop("lm_head.weight")
        return shapes

    def load_tensors(self, tensors: Mapping[str, torch.Tensor], where: str) -> None:
        """Load canonical tensors, checking every key and shape first; nothing half-loaded."""
        expected = self.expected_tensors()
        for name, shape in expected.items():
            if name not in tensors:
                raise MissingTensorError(name, where)
            actual = tuple(tensors[name].shape)
            if actual != shape:
                raise TensorShapeError(name, where, shape, actual)
        state = {name: tensors[name] for name in expected}
        if self.config.tie_word_embeddings:
            state["lm_head.weight"] = tensors["embed_tokens.weight"]
        # assign=True: the trunk may live on the meta device until now (no throwaway init).
        self.load_state_dict(state, strict=True, assign=True)
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
