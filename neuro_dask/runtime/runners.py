"""Expert runners: one loaded expert ready to run at a chosen backend and precision.

Every runner is callable, x [n, D] -> [n, D] in x's dtype, and says how many bytes it holds
(`nbytes()`), which is what the worker's ExpertMemory budget counts.

Precisions: float32, bfloat16 (weights cast), int8, int4 (runtime/quantization.py).
Backends: torch (every precision), onnx (float32; runtime/onnx_backend.py).

`auto` precision (choose_precision): the highest precision, in the order float32, bfloat16,
int8, int4, at which all the experts asked for fit the memory budget; int4 when none does
(the LRU then reloads from the disk cache on demand).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from neuro_dask.errors import ConfigError, ConfigFieldError
from neuro_dask.model.moe import ExpertWeights, run_expert
from neuro_dask.runtime.quantization import INT4_GROUP, quantize_expert

PRECISIONS = ("float32", "bfloat16", "int8", "int4")  # highest first
BACKENDS = ("torch", "onnx")


class ExpertRunner(Protocol):
    precision: str

    def nbytes(self) -> int: ...

    def __call__(self, x: torch.Tensor) -> torch.Tensor: ...


@dataclass(frozen=True)
class TorchExpert:
    """float32 or bfloat16 weights, run by run_expert in the weights' dtype."""

    weights: ExpertWeights
    precision: str

    def nbytes(self) -> int:
        return sum(t.element_size() * t.numel() for t in self.weights.as_dict().values())

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        dtype = self.weights.gate_proj.dtype
        return run_expert(x.to(self.weights.gate_proj.device, dtype), self.weights).to(x.dtype)


def check_precision(precision: str, allow_auto: bool = True) -> str:
    allowed = (("auto",) if allow_auto else ()) + PRECISIONS
    if precision not in allowed:
        raise ConfigFieldError("neuro.worker", "precision", f"must be one of {', '.join(allowed)}, got {precision!r}")
    return precision


def check_backend(backend: str, precision: str) -> None:
    if backend not in BACKENDS:
        raise ConfigFieldError("neuro.worker", "backend", f"must be torch or onnx, got {backend!r}")
    if backend == "onnx" and precision not in ("auto", "float32"):
        raise ConfigFieldError(
            "neuro.worker",
            "precision",
            f"is {precision!r} but the onnx backend runs float32 experts; use backend torch for bfloat16, int8 or int4",
        )


def expert_nbytes(hidden: int, intermediate: int, precision: str, group: int = INT4_GROUP) -> int:
    """Bytes one SwiGLU expert (3 matrices of hidden x intermediate) holds at a precision."""
    weights = 3 * hidden * intermediate
    if precision == "float32":
        return 4 * weights
    if precision == "bfloat16":
        return 2 * weights
    if precision == "int8":
        return weights + 2 * (2 * intermediate + hidden)  # int8 codes + a bfloat16 scale per output row
    if precision == "int4":
        return weights // 2 + 2 * 2 * (weights // group)  # 4-bit codes + bfloat16 (scale, zero) per group
    raise ConfigError(f"unknown precision {precision!r}")


def choose_precision(budget_bytes: int, experts: int, hidden: int, intermediate: int) -> str:
    """The `auto` rule: the highest precision at which `experts` experts fit budget_bytes."""
    for precision in PRECISIONS:
        if experts * expert_nbytes(hidden, intermediate, precision) <= budget_bytes:
            return precision
    return PRECISIONS[-1]


def prepare_expert(weights: ExpertWeights, precision: str, device: torch.device | str = "cpu") -> ExpertRunner:
    """A torch runner for float weights (as read from the verified file) at `precision`."""
    device = torch.device(device)
    check_precision(precision, allow_auto=False)
    if precision in ("float32", "bfloat16"):
        dtype = torch.float32 if precision == "float32" else torch.bfloat16
        return TorchExpert(ExpertWeights(*(t.to(device, dtype) for t in weights.as_dict().values())), precision)
    tensors = [t.to(device) for t in weights.as_dict().values()]
    return quantize_expert(*tensors, precision=precision)
