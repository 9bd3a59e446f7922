"""Multi-token-prediction layers a checkpoint ships after its decoder layers, kept for drafts.

DeepSeek-V3 (and R1, V3.1, Kimi K2, GLM-4.5: `num_nextn_predict_layers`) publishes, after its
N decoder layers, layers `model.layers.{N+i}` that transformers does not load: each is one
more decoder layer (attention and a routed-experts MoE) with a projection in front that mixes
the main model's last hidden state with the next token's embedding (DeepSeek-V3 report, 2.2;
neuro_dask/model/mtp.py runs them). They predict the token after next, which is a draft.

The store keeps them apart from the model the workers serve:
  mtp.safetensors  (role "mtp")         every tensor of the layers but their routed experts, under
                                         "{i}.{name in the layer}", dequantized like the trunk;
  experts/layer-{N+i}/expert-*          (role "mtp-expert") one file per routed expert, in the
                                         store's expert format, never placed on a worker.
The embedding and output head the layers carry are the trunk's (the report: "shared"), so
they are not stored twice.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from neuro_dask.errors import ConfigError, MissingTensorError
from neuro_dask.store.expert_formats import dequantize_fp8_block
from neuro_dask.store.manifest import ROLE_MTP, ROLE_MTP_EXPERT, Artifact

log = logging.getLogger(__name__)

MTP_PATH = "mtp.safetensors"
# The layer's own tensors beside its decoder layer's, under the checkpoint's names.
MTP_OWN = ("enorm.weight", "hnorm.weight", "eh_proj.weight", "shared_head.norm.weight")
SHARED_WITH_TRUNK = ("embed_tokens.weight", "shared_head.head.weight")
MAX_MTP_LAYERS = 8  # DeepSeek-V3 ships 1; a hostile config's count must not build thousands
_COUNT_NAMES = ("num_nextn_predict_layers", "num_mtp_layers")


def declared_mtp_layers(raw: dict[str, Any]) -> int:
    """How many multi-token-prediction layers the config says the checkpoint has (0 if none)."""
    for name in _COUNT_NAMES:
        value = raw.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_MTP_LAYERS:
            raise ConfigError(f"config.json: {name} must be an integer in 0..{MAX_MTP_LAYERS}, got {value!r}")
        return value
    return 0


def mtp_layers(raw: dict[str, Any], names: set[str] | frozenset[str]) -> list[int]:
    """The decoder-layer indices of the multi-token-prediction layers the checkpoint really holds
    (a config may declare them while its files leave them out, as transformers' own saves do)."""
    if isinstance(raw.get("text_config"), dict):
        return []  # the layouts that ship them after the last layer are all flat configs
    first = raw.get("num_hidden_layers")
    if not isinstance(first, int) or isinstance(first, bool):
        return []
    found = []
    for i in range(declared_mtp_layers(raw)):
        if f"model.layers.{first + i}.eh_proj.weight" not in names:
            break
        found.append(first + i)
    return found


class MtpSharder:
    """Writes a checkpoint's multi-token-prediction layers into a store (the module docstring).

    `ext` is the checkpoint's TransformersSharder built with these layers as ordinary decoder
    layers (`extra_layers`): transformers' conversion rules then map their attention and
    experts as any layer's."""

    def __init__(self, ext, layers: list[int]):
        self.ext = ext
        self.layers = layers

    def owns(self, key: str) -> bool:
        """Whether a checkpoint tensor belongs to these layers (so it is not 'unused')."""
        return any(key.startswith(f"model.layers.{layer}.") for layer in self.layers)

    def write(self, dst: Path) -> list[Artifact]:
        tensors: dict[str, torch.Tensor] = {}
        for i, layer in enumerate(self.layers):
            prefix = f"model.layers.{layer}."
            for name in self.ext.trunk:
                if name.startswith(prefix):
                    tensors[f"{i}.{name[len(prefix) :]}"] = self.ext._whole(name)
            for own in MTP_OWN:
                tensors[f"{i}.{own}"] = self._own(prefix + own)
        artifacts = [self.ext.write_file(Path(dst), MTP_PATH, tensors, ROLE_MTP)]
        self.ext.tick(MTP_PATH)
        artifacts += self.ext.write_experts(Path(dst), self.layers, ROLE_MTP_EXPERT)
        log.info("kept %d multi-token-prediction layer(s) for drafting: %s", len(self.layers), self.layers)
        return artifacts

    def _own(self, key: str) -> torch.Tensor:
        ckpt = self.ext.ckpt
        if key not in ckpt.names:
            raise MissingTensorError(key, str(self.ext.src))
        t = ckpt.read_key(key)
        scale = key + "_scale_inv"
        if t.dtype == torch.float8_e4m3fn and scale in ckpt.names:
            block = tuple(self.ext.block or (128, 128))
            t = dequantize_fp8_block(t, ckpt.read_key(scale).float(), block, torch.float32)
        return t.to(self.ext.trunk_dtype) if t.is_floating_point() else t
