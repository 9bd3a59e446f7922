"""One expert's file of a transformers-layout store, read: its tensors under the experts module's
names (dequantized from the stored format, store/expert_formats.py), shapes checked, and, for plain
SwiGLU experts, as ExpertWeights. Shared by the store (`ShardStore.read_expert`), the workers'
runners (runtime/hf_experts.py) and the private tier."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from neuro_dask.errors import NeuroDaskError, TensorShapeError
from neuro_dask.model.moe import ExpertWeights
from neuro_dask.store.expert_formats import dequantize_expert
from neuro_dask.store.safetensors_io import read_tensors


class ExpertLayoutError(NeuroDaskError):
    """A feature that needs plain SwiGLU experts asked of experts that are not."""


def read_expert_tensors(
    path: Path, spec: Mapping[str, Any], dtype: torch.dtype = torch.float32
) -> dict[str, torch.Tensor]:
    """One expert file -> float tensors under the experts module's names, shapes checked."""
    raw = read_tensors(path)
    block = tuple(spec["block"]) if spec.get("block") else None
    tensors = dequantize_expert(raw, spec.get("format", "float"), dtype, block)
    for name, shape in {**dict(spec.get("parameters") or {}), **dict(spec.get("shared") or {})}.items():
        actual = tuple(tensors[name].shape) if name in tensors else ()
        if actual != tuple(shape):
            raise TensorShapeError(name, str(path), tuple(shape), actual)
    return tensors


def is_swiglu(spec: Mapping[str, Any]) -> bool:
    return bool(spec.get("swiglu"))


def swiglu_weights(tensors: Mapping[str, torch.Tensor], spec: Mapping[str, Any]) -> ExpertWeights:
    """gate_up [2I, D] (gate rows first) and down [D, I], or their transposes -> ExpertWeights."""
    if not is_swiglu(spec):
        raise ExpertLayoutError(describe_refusal(spec))
    gate_up, down = tensors["gate_up_proj"], tensors["down_proj"]
    if spec["flags"]["is_transposed"]:
        gate_up, down = gate_up.t(), down.t()
    gate, up = gate_up.chunk(2, dim=0)
    return ExpertWeights(gate.contiguous(), up.contiguous(), down.contiguous())


def describe_refusal(spec: Mapping[str, Any]) -> str:
    """Why these experts are not plain SwiGLU, in words a volunteer or data scientist can act on."""
    flags = spec.get("flags") or {}
    reasons = [
        text
        for key, want, text in (
            ("has_bias", False, "biases"),
            ("has_gate", True, "no gate projection"),
            ("has_post_expert_norm", False, "a post-expert norm"),
            ("is_concatenated", True, "interleaved gate/up"),
        )
        if key in flags and bool(flags[key]) != want
    ]
    if not spec.get("default_gate", True):
        reasons.append("a custom gated activation")
    if spec.get("activation") not in (None, "SiLUActivation") and flags.get("has_gate", True):
        reasons.append(f"activation {spec.get('activation')}")
    cls = str(spec.get("class", "?")).rsplit(":", 1)[-1]
    return f"{cls} experts are not plain SwiGLU ({', '.join(reasons) or 'layout'})"
