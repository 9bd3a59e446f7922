"""A checkpoint's multi-token-prediction layer (DeepSeek-V3's `num_nextn_predict_layers`) as a module.

DeepSeek-V3 report, section 2.2, as vLLM and SGLang run it (vllm/model_executor/models/
deepseek_mtp.py): at position i, with h_i the main model's final hidden state there (after its
final norm) and t_{i+1} the next token,

    x_i = eh_proj([enorm(embed(t_{i+1})), hnorm(h_i)])      (embed zeroed at position 0)
    g_i = block(x_i)                                        one more decoder layer of the model
    p(t_{i+2}) = softmax(lm_head(shared_head.norm(g_i)))

so the layer guesses the token after next. For a chain of drafts, g_i stands in for the main
model's state at the next position (vLLM does the same). `block` is the architecture's own
transformers decoder layer, built as layer N of the model so that it has routed experts; its
attention keeps its own cache, and its experts go to whatever dispatch the caller gives.
The embedding and output head are the main model's (the report: shared).

Shape legend: B batch, n positions, D hidden size, V vocabulary.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from neuro_dask.errors import MissingTensorError, TensorShapeError
from neuro_dask.model.hf_trunk import build_skeleton, expert_parameter_names, experts_modules, on_meta


class MtpLayer(nn.Module):
    def __init__(self, block: nn.Module, hidden_size: int, eps: float):
        super().__init__()
        norm = type(block.input_layernorm)  # the architecture's RMSNorm
        self.enorm = norm(hidden_size, eps=eps)
        self.hnorm = norm(hidden_size, eps=eps)
        self.eh_proj = nn.Linear(2 * hidden_size, hidden_size, bias=False)
        self.shared_head = nn.Module()
        self.shared_head.norm = norm(hidden_size, eps=eps)
        self.block = block

    def forward(
        self,
        embeds: torch.Tensor,  # [B, n, D] the next tokens' embeddings
        previous: torch.Tensor,  # [B, n, D] the hidden states before them
        positions: torch.Tensor,  # [B, n]
        mask: Any,  # the block's attention mask, as its model prepares it
        cache: Any,
        rotary: tuple[torch.Tensor, torch.Tensor],
    ) -> torch.Tensor:
        """g [B, n, D] (before shared_head.norm)."""
        embeds = torch.where(positions[..., None] == 0, torch.zeros_like(embeds), embeds)
        x = self.eh_proj(torch.cat([self.enorm(embeds), self.hnorm(previous)], dim=-1))
        return self.block(
            x, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True, position_embeddings=rotary
        )


def mtp_block_names(name: str) -> str:
    """A stored name ("enorm.weight", "self_attn.q_proj.weight") -> the MtpLayer's."""
    return name if name.split(".")[0] in ("enorm", "hnorm", "eh_proj", "shared_head") else f"block.{name}"


def build_mtp_layers(
    raw_config: Mapping[str, Any],
    tensors: Mapping[str, torch.Tensor],
    count: int,
    dtype: torch.dtype,
    device: torch.device | str,
    where: str,
) -> list[MtpLayer]:
    """The checkpoint's `count` multi-token-prediction layers from a store's tensors ("{i}.{name}":
    store/mtp_sharder.py), every tensor present and shaped as the layer says. Their routed
    experts stay on meta: each experts module knows its layer (`_neuro_layer`, N + i)."""
    first = int(raw_config["num_hidden_layers"])
    model = build_skeleton({**raw_config, "num_hidden_layers": first + count}, dtype)
    text = model.config.get_text_config()
    layers = []
    for i in range(count):
        block = model.base_model.layers[first + i]
        block.self_attn.layer_idx = 0  # one layer in its own cache
        with on_meta():
            layer = MtpLayer(block, int(text.hidden_size), float(text.rms_norm_eps))
        own = {name[len(f"{i}.") :]: t for name, t in tensors.items() if name.startswith(f"{i}.")}
        _load(layer, own, where, dtype, torch.device(device))
        layers.append(layer.eval())
    for layer, module in experts_modules(model).items():
        module._neuro_layer = layer
    return layers


def _load(
    layer: MtpLayer, tensors: Mapping[str, torch.Tensor], where: str, dtype: torch.dtype, device: torch.device
) -> None:
    skip = {f"block.{n}" for n in expert_parameter_names(layer.block)}
    expected = {name: tuple(t.shape) for name, t in layer.state_dict().items() if name not in skip}
    given = {mtp_block_names(name): t for name, t in tensors.items()}
    for name, shape in expected.items():
        if name not in given:
            raise MissingTensorError(name, where)
        if tuple(given[name].shape) != shape:
            raise TensorShapeError(name, where, shape, tuple(given[name].shape))
    state = {n: (given[n].to(dtype) if given[n].is_floating_point() else given[n]).to(device) for n in expected}
    layer.load_state_dict(state, strict=False, assign=True)
    unset = [n for n, t in layer.named_buffers() if t.is_meta and f"block.{n}" not in skip and n not in skip]
    if unset:  # a buffer no file holds (none in the layouts that ship these layers)
        raise MissingTensorError(unset[0], where)
