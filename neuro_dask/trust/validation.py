"""Fuzzy validation of expert results, BOINC's 'fuzzy validator' for floating point.

Replicas on different hardware never agree bit for bit, so two results agree when, after a
shape, dtype and finite check, every element satisfies |a - b| <= atol + rtol * max(|a|, |b|)
(symmetric, so the order of comparison never matters). `exact=True` demands bit equality.

Defaults (atol 1e-4, rtol 1e-3) sit well above float32 rounding differences between kernels and
devices and well below any perturbation that changes a token: `benchmarks/bench_tolerance.py`
measures both (see docs/trust.md).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

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


# Tolerances across expert precisions (neuro.worker.precision), measured by
# benchmarks/bench_backends.py --tolerance on the golden tiny models and the bundled adder:
# 64 random rows per expert, every expert, the smallest atol that passes at the rtol below.
#   vs float32   needed atol (rtol)         chosen (margin on the worst model)
#   bfloat16     0.035 (0.05), adder         atol 0.10, rtol 0.05  (~3x)
#   int8         0.055 (0.05), adder         atol 0.25, rtol 0.05  (~4.5x)
#   int4         1.22  (0.10), adder         atol 3.0,  rtol 0.10  (~2.5x): no real check left
# Two replicas at the same reduced precision differ only by bfloat16 rounding of activations and
# outputs (the quantized codes are a deterministic function of the verified file): SAME_PRECISION.
# The values are in the units of the expert output (RMS 0.3-3.5 on the measured models); a model
# with much larger expert outputs needs them scaled. Note that the int8 error (0.8-1.5% of the
# output RMS) exceeds the smallest adversarial perturbation the drills use (1% of the RMS), so a
# quorum that mixes precisions catches only coarser cheating: prefer replicas of one precision.
ACROSS_PRECISIONS: dict[str, tuple[float, float]] = {
    "float32": (0.0, 0.0),
    "bfloat16": (0.10, 0.05),
    "int8": (0.25, 0.05),
    "int4": (3.0, 0.10),
}
SAME_PRECISION: dict[str, tuple[float, float]] = {
    "float32": (0.0, 0.0),
    "bfloat16": (1e-2, 2e-2),
    "int8": (1e-2, 2e-2),
    "int4": (1e-2, 2e-2),
}


def tolerance_for(
    precisions: set[str] | frozenset[str], base: ValidationPolicy = ValidationPolicy()
) -> ValidationPolicy:
    """The policy for comparing replicas whose experts ran at these precisions.

    Rule: all one precision -> base loosened to SAME_PRECISION[p]; mixed -> base loosened to the
    loosest ACROSS_PRECISIONS entry among them (each is that precision's error against float32,
    which bounds a pair of reduced precisions too, with the margin above). Loosening takes the
    larger atol and the larger rtol. `exact` survives only for a set of one precision; an empty
    set gives the base; an unknown precision raises ConfigError.
    """
    unknown = sorted(p for p in precisions if p not in ACROSS_PRECISIONS)
    if unknown:
        raise ConfigError(f"unknown expert precision(s) {unknown}: expected some of {sorted(ACROSS_PRECISIONS)}")
    if not precisions:
        return base
    table = SAME_PRECISION if len(precisions) == 1 else ACROSS_PRECISIONS
    atol = max([base.atol] + [table[p][0] for p in precisions])
    rtol = max([base.rtol] + [table[p][1] for p in precisions])
    return ValidationPolicy(atol, rtol, base.exact and len(precisions) == 1)
