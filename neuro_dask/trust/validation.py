"""Fuzzy validation of expert results, BOINC's 'fuzzy validator' for floating point.

Replicas on different hardware never agree bit for bit, so two results agree when, after a
shape, dtype and finite check, every element satisfies |a - b| <= atol + rtol * max(|a|, |b|)
(symmetric, so the order of comparison never matters). `exact=True` demands bit equality.

Defaults (atol 1e-4, rtol 1e-3) sit well above float32 rounding differences between kernels and
devices and well below any perturbation that changes a token: `benchmarks/bench_tolerance.py`
measures both (see docs/trust.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch

from neuro_dask.errors import ConfigError

Result = Mapping[int, torch.Tensor]  # expert -> outputs [n, D]


@dataclass(frozen=True)
class ValidationPolicy:
    atol: float = 1e-4
    rtol: float = 1e-3
    exact: bool = False

    def __post_init__(self) -> None:
        if self.atol < 0 or self.rtol < 0:
            raise ConfigError(f"validation tolerances must be >= 0, got atol={self.atol} rtol={self.rtol}")


def malformed(result: Result, expected: Mapping[int, tuple[int, ...]], dtype: torch.dtype) -> str | None:
    """Why a result cannot be compared at all (wrong experts, shape, dtype, NaN/inf), or None."""
    if sorted(result) != sorted(expected):
        return f"covers experts {sorted(result)}, expected {sorted(expected)}"
    for expert, tensor in result.items():
        if tuple(tensor.shape) != tuple(expected[expert]):
            return f"expert {expert}: shape {tuple(tensor.shape)}, expected {tuple(expected[expert])}"
        if tensor.dtype != dtype:
            return f"expert {expert}: dtype {tensor.dtype}, expected {dtype}"
        if not bool(torch.isfinite(tensor).all()):
            return f"expert {expert}: non-finite values"
    return None


def agree(a: Result, b: Result, policy: ValidationPolicy = ValidationPolicy()) -> bool:
    """True when every expert's outputs match within the policy's tolerance."""
    if sorted(a) != sorted(b):
        return False
    for expert, x in a.items():
        y = b[expert]
        if x.shape != y.shape:
            return False
        if policy.exact:
            if not torch.equal(x, y):
                return False
            continue
        x32, y32 = x.float(), y.float()
        bound = policy.atol + policy.rtol * torch.maximum(x32.abs(), y32.abs())
        if not bool(((x32 - y32).abs() <= bound).all()):
            return False
    return True
