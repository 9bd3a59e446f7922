"""Weight-only int8 / int4 expert quantization: memory, error bounds, fallbacks, tolerance rule."""

from __future__ import annotations

import pytest
import torch

from neuro_dask.errors import ConfigError
from neuro_dask.model.moe import ExpertWeights, run_expert
from neuro_dask.runtime.expert_memory import ExpertMemory, weights_nbytes
from neuro_dask.runtime.quantization import Int4Linear, Int8Linear, int4_group
from neuro_dask.runtime.runners import prepare_expert
from neuro_dask.trust.validation import ValidationPolicy, agree, tolerance_for


def expert(d: int = 256, i: int = 512, seed: int = 0) -> ExpertWeights:
    g = torch.Generator().manual_seed(seed)
    return ExpertWeights(
        torch.randn(i, d, generator=g) / d**0.5,
        torch.randn(i, d, generator=g) / d**0.5,
        torch.randn(d, i, generator=g) / i**0.5,
    )


def rel_rms(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).pow(2).mean().sqrt() / b.pow(2).mean().sqrt())


def test_int8_uses_at_least_3_5x_less_memory_than_float32():
    w = expert(1024, 3584)
    assert weights_nbytes(w) / prepare_expert(w, "int8").nbytes() >= 3.5
    assert weights_nbytes(w) / prepare_expert(w, "int4").nbytes() >= 6.0


def test_expert_memory_budget_counts_quantized_bytes():
    w = expert()
    q = prepare_expert(w, "int8")
    mem = ExpertMemory(3 * q.nbytes())
    for e in range(3):
        assert mem.put(e, prepare_expert(w, "int8")) == []
    assert mem.bytes_used == 3 * q.nbytes() and mem.put(3, prepare_expert(w, "int8")) == [0]
    assert ExpertMemory(weights_nbytes(w)).put("f", w) == []  # plain weights are still counted as before


@pytest.mark.parametrize("precision, bound", [("bfloat16", 0.01), ("int8", 0.025), ("int4", 0.25)])
def test_error_against_float32_stays_within_measured_bounds(precision, bound):
    w = expert()
    x = torch.randn(16, 256, generator=torch.Generator().manual_seed(1))
    y = prepare_expert(w, precision)(x)
    assert y.dtype == torch.float32 and y.shape == x.shape
    assert rel_rms(y, run_expert(x, w)) < bound


def test_int8_dequantizes_to_within_half_a_step():
    w = torch.randn(64, 128, generator=torch.Generator().manual_seed(0))
    q = Int8Linear.quantize(w)
    step = q.scales.float()[:, None]
    assert bool(((q.dequantize() - w).abs() <= 0.5 * step * 1.01 + 1e-6).all())


@pytest.mark.parametrize("k, group, kernel", [(256, 64, True), (96, 32, True), (48, 16, False)])
def test_int4_picks_a_group_and_falls_back_without_the_kernel(k, group, kernel):
    w = torch.randn(32, k, generator=torch.Generator().manual_seed(0)) / k**0.5
    q = Int4Linear.quantize(w)
    assert q.group == int4_group(k) == group
    if hasattr(torch, "_weight_int4pack_mm_for_cpu"):
        assert q.kernel is kernel
    x = torch.randn(5, k, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(q(x).float(), x @ q.dequantize().T, atol=0.05, rtol=0.05)
    assert rel_rms(x @ q.dequantize().T, x @ w.T) < 0.15


def test_int4_refuses_widths_not_divisible_by_8():
    with pytest.raises(ConfigError, match="int8"):
        Int4Linear.quantize(torch.randn(4, 12))


def test_tolerance_for_one_or_mixed_precisions():
    base = ValidationPolicy()
    assert tolerance_for({"float32"}, base) == base
    assert tolerance_for(set(), base) == base
    same = tolerance_for({"int8"}, base)
    assert same.atol > base.atol and same.rtol > base.rtol
    mixed = tolerance_for({"float32", "int8"}, base)
    assert (mixed.atol, mixed.rtol) == (0.25, 0.05)
    assert tolerance_for({"int8", "int4", "float32"}, base) == tolerance_for({"int4", "float32"}, base)
    assert not tolerance_for({"float32", "int8"}, ValidationPolicy(exact=True)).exact
    assert tolerance_for({"float32"}, ValidationPolicy(exact=True)).exact
    loose = ValidationPolicy(atol=1.0, rtol=0.5)
    assert tolerance_for({"float32", "int8"}, loose) == loose  # never tighter than the base
    with pytest.raises(ConfigError, match="fp8"):
        tolerance_for({"fp8"}, base)


@pytest.mark.parametrize("precision", ["bfloat16", "int8"])
def test_mixed_quorum_agrees_with_tolerance_for_and_not_with_the_default(precision):
    w = expert()
    x = torch.randn(32, 256, generator=torch.Generator().manual_seed(2)) * 2
    full, reduced = {0: run_expert(x, w)}, {0: prepare_expert(w, precision)(x)}
    assert not agree(full, reduced, ValidationPolicy())
    assert agree(full, reduced, tolerance_for({"float32", precision}))


def test_same_precision_replicas_agree_across_batch_shapes():
    """One row at a time against a batch (other kernel paths): the SAME_PRECISION tolerance holds."""
    w = expert()
    runner = prepare_expert(w, "int8")
    x = torch.randn(16, 256, generator=torch.Generator().manual_seed(3))
    rows = torch.cat([runner(x[k : k + 1]) for k in range(16)])
    assert agree({0: rows}, {0: runner(x)}, tolerance_for({"int8"}))
