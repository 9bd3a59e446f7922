"""Where each tensor lives in a Hugging Face checkpoint, per architecture and storage layout.

Two expert layouts occur in real checkpoints:
  - one tensor per expert (what `save_pretrained` writes, and every published Mixtral/Qwen/OLMoE):
      mixtral  ...block_sparse_moe.experts.{e}.w1|w3|w2.weight  (gate | up | down)
      others   ...mlp.experts.{e}.gate_proj|up_proj|down_proj.weight
  - stacked (transformers 5 in memory, and state_dicts saved from it):
      ...mlp.experts.gate_up_proj [E, 2I, D] (gate rows first), ...mlp.experts.down_proj [E, D, I]
The layout is detected from the names present, per layer.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from neuro_dask.errors import MissingTensorError
from neuro_dask.model.config import MoEConfig
from neuro_dask.model.moe import ExpertWeights


@dataclass(frozen=True)
class TensorRef:
    """A tensor, or one expert's slice of a stacked tensor (and optionally one half of its rows)."""

    name: str
    expert: int | None = None
    half: int | None = None  # 0 = first half of dim 0 (gate), 1 = second (up)


_MIXTRAL_EXPERT = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}


def moe_prefix(cfg: MoEConfig, layer: int, names: set[str]) -> str:
    legacy = f"model.layers.{layer}.block_sparse_moe"
    if cfg.model_type == "mixtral" and any(n.startswith(legacy + ".") for n in names):
        return legacy
    return f"model.layers.{layer}.mlp"


def trunk_refs(cfg: MoEConfig, names: Iterable[str], expected: Iterable[str]) -> dict[str, TensorRef]:
    """Canonical trunk name -> where it is in the checkpoint."""
    names = set(names)
    refs: dict[str, TensorRef] = {}
    for canon in expected:
        if canon == "lm_head.weight":
            hf = "lm_head.weight"
        elif canon.startswith("layers.") and ".router." in canon:
            layer = int(canon.split(".")[1])
            hf = f"{moe_prefix(cfg, layer, names)}.gate.weight"
        elif canon.startswith("layers.") and ".shared_expert" in canon:
            _, layer, rest = canon.split(".", 2)
            hf = f"model.layers.{layer}.mlp.{rest}"
        else:
            hf = f"model.{canon}"
        refs[canon] = TensorRef(hf)
    return refs


def expert_refs(cfg: MoEConfig, layer: int, expert: int, names: set[str], where: str) -> dict[str, TensorRef]:
    """ExpertWeights field -> where that expert's tensor is, for either layout."""
    prefix = f"{moe_prefix(cfg, layer, names)}.experts"
    stacked_gate_up = f"{prefix}.gate_up_proj"
    if stacked_gate_up in names:
        return {
            "gate_proj": TensorRef(stacked_gate_up, expert, 0),
            "up_proj": TensorRef(stacked_gate_up, expert, 1),
            "down_proj": TensorRef(f"{prefix}.down_proj", expert),
        }
    refs = {}
    for field in ExpertWeights.TENSOR_NAMES:
        leaf = _MIXTRAL_EXPERT[field] if prefix.endswith("block_sparse_moe.experts") else field
        refs[field] = TensorRef(f"{prefix}.{expert}.{leaf}.weight")
    for ref in refs.values():
        if ref.name not in names:
            raise MissingTensorError(ref.name, where)
    return refs


def expert_shapes(cfg: MoEConfig) -> dict[str, tuple[int, ...]]:
    d, i = cfg.hidden_size, cfg.moe_intermediate_size
    return {"gate_proj": (i, d), "up_proj": (i, d), "down_proj": (d, i)}
