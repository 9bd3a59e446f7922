"""Experts of a transformers-layout store, run exactly as their architecture's experts class does.

An expert file holds one expert's slice of its layer's experts-module parameters (in-memory
layout, possibly quantized: store/expert_formats.py). Two ways to run it:

- plain SwiGLU experts (concatenated gate/up, no biases, SiLU, no post-expert norm: Mixtral,
  Qwen, DeepSeek, GLM, MiniMax, ERNIE, ...) become ExpertWeights, so every backend and
  precision of runtime/runners.py applies (int8, int4, ONNX, the private tier);
- any other layout (gpt-oss's clamped SwiGLU with biases and interleaved gate/up, no-gate
  experts, post-expert norms, transposed weights) runs through the architecture's own experts
  class: its `_apply_gate`, `act_fn` and norm modules, over this expert's tensors, following
  transformers' experts forward (integrations/moe.py) for one expert. These run at float32 or
  bfloat16; int8/int4/ONNX do not apply to them and the worker says so.
"""

from __future__ import annotations

import copy
import functools
import json
import logging
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from neuro_dask.errors import CheckpointError
from neuro_dask.store.expert_files import describe_refusal, is_swiglu, read_expert_tensors, swiglu_weights
from neuro_dask.store.safetensors_io import read_tensors

log = logging.getLogger(__name__)
_WARNED: set[tuple[str, str]] = set()
_WARN_LOCK = threading.Lock()


@functools.lru_cache(maxsize=8)
def _skeleton(config_json: str):
    from neuro_dask.model.hf_trunk import build_skeleton

    return build_skeleton(json.loads(config_json), torch.float32)


def experts_template(raw_config: Mapping[str, Any], layer: int) -> torch.nn.Module:
    """The architecture's experts module of `layer` (parameters on meta): its activation, gate
    and flags are what an expert runs with. Built once per model from the manifest's config."""
    from neuro_dask.model.hf_trunk import experts_modules

    modules = experts_modules(_skeleton(json.dumps(raw_config, sort_keys=True)))
    if layer not in modules:
        raise CheckpointError(f"layer {layer} has no routed experts in this model")
    return modules[layer]


@dataclass
class TransformersExpert:
    """One expert run by its architecture's experts class: x [n, D] -> expert(x) [n, D]."""

    template: torch.nn.Module
    tensors: dict[str, torch.Tensor]
    precision: str
    norm: torch.nn.Module | None = None

    @classmethod
    def build(
        cls,
        template: torch.nn.Module,
        tensors: Mapping[str, torch.Tensor],
        precision: str,
        device: torch.device | str = "cpu",
    ) -> TransformersExpert:
        dtype = torch.bfloat16 if precision == "bfloat16" else torch.float32
        own = {k: v.to(device, dtype) for k, v in tensors.items() if "." not in k}
        norm = None
        if template.has_post_expert_norm:
            norm = copy.deepcopy(template.post_expert_norm)
            state = {
                k.split(".", 1)[1]: v.to(device, dtype) for k, v in tensors.items() if k.startswith("post_expert_norm.")
            }
            norm.load_state_dict(state, strict=True, assign=True)
        return cls(template, own, precision, norm)

    def nbytes(self) -> int:
        return sum(t.element_size() * t.numel() for t in self.tensors.values())

    def _linear(self, x: torch.Tensor, name: str) -> torch.Tensor:
        w = self.tensors[name]
        y = x @ w if self.template.is_transposed else F.linear(x, w)
        bias = self.tensors.get(name + "_bias")
        return y + bias if bias is not None else y

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        t = self.template
        w = next(iter(self.tensors.values()))
        h = x.to(w.device, w.dtype)
        if t.has_gate:
            h = t._apply_gate(self._linear(h, "gate_up_proj"))
        else:
            h = t.act_fn(self._linear(h, "up_proj"))
        y = self._linear(h, "down_proj")
        if self.norm is not None:
            y = self.norm(y)
        return y.to(x.dtype)


STORED = "stored"  # keep the file's quantized tensors in memory, dequantize at each call


@dataclass
class StoredExpert:
    """A quantized expert (fp8-block, mxfp4) kept as published: a quarter to half the memory of
    bfloat16, dequantized on the worker's device at each call (an H100 holds gpt-oss-120b's
    experts this way; their bfloat16 copy would not fit). What does not change between calls
    (the architecture's experts module) is resolved once, at load."""

    raw: dict[str, torch.Tensor]
    spec: Mapping[str, Any]
    template: torch.nn.Module | None  # None: plain SwiGLU experts
    device: torch.device
    precision: str = STORED

    def nbytes(self) -> int:
        return sum(t.element_size() * t.numel() for t in self.raw.values())

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        from neuro_dask.model.moe import run_expert
        from neuro_dask.store.expert_formats import dequantize_expert

        block = tuple(self.spec["block"]) if self.spec.get("block") else None
        dtype = torch.bfloat16 if self.device.type != "cpu" else torch.float32
        tensors = dequantize_expert(self.raw, self.spec.get("format", "float"), dtype, block)
        if self.template is None:
            return run_expert(x.to(self.device, dtype), swiglu_weights(tensors, self.spec)).to(x.dtype)
        return TransformersExpert.build(
            self.template, tensors, "bfloat16" if dtype == torch.bfloat16 else "float32", self.device
        )(x)


def transformers_runner(
    path: Path,
    spec: Mapping[str, Any],
    raw_config: Mapping[str, Any],
    layer: int,
    precision: str,
    device: torch.device | str = "cpu",
    backend: str = "torch",
):
    """A runner for one expert file of a transformers-layout store, at `precision` on `backend`."""
    if precision == STORED:
        read_expert_tensors(path, spec)  # shapes and companions checked once, at load
        raw = {k: v.to(device) for k, v in read_tensors(path).items()}
        template = None if is_swiglu(spec) else experts_template(raw_config, layer)
        return StoredExpert(raw, spec, template, torch.device(device))
    return _runner(read_expert_tensors(path, spec), spec, raw_config, layer, precision, device, backend)


def _runner(
    tensors: Mapping[str, torch.Tensor],
    spec: Mapping[str, Any],
    raw_config: Mapping[str, Any],
    layer: int,
    precision: str,
    device: torch.device | str = "cpu",
    backend: str = "torch",
):
    from neuro_dask.runtime.runners import prepare_expert

    if is_swiglu(spec):
        weights = swiglu_weights(tensors, spec)
        if backend == "onnx":
            from neuro_dask.runtime.onnx_backend import onnx_expert

            return onnx_expert(weights)
        return prepare_expert(weights, precision, device)
    run_at = precision if precision in ("float32", "bfloat16") else "bfloat16"
    if run_at != precision or backend != "torch":
        _warn_once(
            spec,
            f"{describe_refusal(spec)}: {precision} on {backend} does not apply to them; "
            f"running them with torch at {run_at}",
        )
    return TransformersExpert.build(experts_template(raw_config, layer), tensors, run_at, device)


def precision_sizes(spec: Mapping[str, Any], stored_bytes: int) -> list[tuple[str, int]]:
    """(precision, bytes one expert holds) for every precision these experts can run at, largest
    first: what the `auto` rule walks down until the assigned experts fit the memory budget."""
    params = sum(_prod(s) for s in dict(spec.get("parameters") or {}).values())
    sizes = [("float32", 4 * params), ("bfloat16", 2 * params)]
    if is_swiglu(spec):
        sizes += [("int8", params), ("int4", params // 2 + params // 16)]
    if spec.get("format", "float") != "float":
        sizes.append((STORED, stored_bytes))
    return sorted(sizes, key=lambda ps: -ps[1])


def choose_precision(spec: Mapping[str, Any], stored_bytes: int, experts: int, budget_bytes: int) -> str:
    sizes = precision_sizes(spec, stored_bytes)
    for precision, size in sizes:
        if experts * size <= budget_bytes:
            return precision
    return sizes[-1][0]


def _prod(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def _warn_once(spec: Mapping[str, Any], message: str) -> None:
    key = (str(spec.get("class")), message)
    with _WARN_LOCK:
        if key in _WARNED:
            return
        _WARNED.add(key)
    log.warning(message)
