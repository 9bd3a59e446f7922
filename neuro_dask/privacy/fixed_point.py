"""Fixed-point numbers in the ring Z_2^64, held as torch.int64 (two's complement, wrapping).

A real x is encoded as round(x * 2^f), f = FRAC_BITS = 16, so the encoding error is at most
2^-(f+1) per element. Activations and weights use the same f; a product of two encodings (one
matmul) is at scale 2^(2f) = 2^32 and is decoded with `decode(v, 2 * f)`.

Overflow bound: ring elements are read back as signed 64-bit integers, so a decoded value is
right only while its true value at its scale lies in [-2^63, 2^63):
  * an encoded input needs |x| < 2^(62-f) = 2^46 (checked by `encode`, which refuses beyond);
  * a matmul output y_j = sum_i W_ji x_i needs |y_j| + its rounding error < 2^(63-2f) = 2^31
    (about 2.1e9). Nothing after a matmul can check this (a wrapped sum looks like any other
    ring element); MoE hidden states and expert outputs are many orders of magnitude smaller.
Error bound of one linear map, per output j (all terms exact arithmetic, see tests):
  |y_fp_j - y_j| <= 2^-(f+1) * (sum_i |W_ji| + sum_i |x_i|) + D * 2^-(2f+2) + 2^-52 * |y_j|
(the last term: converting the int64 result to float64 when decoding).

Shape-agnostic; no Dask here.
"""

from __future__ import annotations

import torch

from neuro_dask.errors import NeuroDaskError

FRAC_BITS = 16
RING_BITS = 64
INPUT_LIMIT = 2.0 ** (62 - FRAC_BITS)  # |x| must stay below this to be encoded at FRAC_BITS


class FixedPointOverflowError(NeuroDaskError):
    """A value too large to encode in Z_2^64 at the tier's fixed-point scale."""

    def __init__(self, largest: float, frac_bits: int):
        self.largest, self.frac_bits = largest, frac_bits
        super().__init__(
            f"value {largest:g} does not fit the private tier's fixed point (|x| < 2^{62 - frac_bits} "
            f"at 2^{frac_bits}); the model's activations are out of range: use the standard tier"
        )


def encode(x: torch.Tensor, frac_bits: int = FRAC_BITS) -> torch.Tensor:
    """Real tensor -> int64 ring elements round(x * 2^frac_bits); refuses values past the bound."""
    scaled = torch.round(x.detach().to(torch.float64) * float(2**frac_bits))
    if scaled.numel():
        largest = float(scaled.abs().max())
        if not largest < 2.0**62:  # also catches NaN and inf
            raise FixedPointOverflowError(largest / 2**frac_bits, frac_bits)
    return scaled.to(torch.int64)


def decode(v: torch.Tensor, frac_bits: int = FRAC_BITS, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """int64 ring elements (read as signed) -> reals v / 2^frac_bits."""
    if v.dtype != torch.int64:
        raise TypeError(f"decode expects int64 ring elements, got {v.dtype}")
    return (v.to(torch.float64) / float(2**frac_bits)).to(dtype)


def ring_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b in Z_2^64: torch's int64 CPU matmul wraps (tests check it against exact integers)."""
    return a.to(torch.int64) @ b.to(torch.int64)


LIMB_BITS = 16
LIMBS = RING_BITS // LIMB_BITS
_EXACT = 2**53  # integers below this are exact in float64, and so are sums that stay below it


def limb_exact(b: torch.Tensor) -> bool:
    """Whether `ring_matmul_limbs` is exact for a right operand like `b` (integer-valued, [K, N]):
    every limb product sum must stay below 2^53, i.e. K * 2^16 * max|b| < 2^53."""
    largest = int(b.abs().max()) if b.numel() else 0
    return b.shape[0] * (2**LIMB_BITS - 1) * largest < _EXACT


def ring_matmul_limbs(a: torch.Tensor, b64: torch.Tensor) -> torch.Tensor:
    """a @ b in Z_2^64 with float64 GEMMs, for devices without an int64 matmul (CUDA's BLAS has
    none): a (any ring elements) is cut into four unsigned 16-bit limbs a_i, each a_i @ b is a
    float64 GEMM whose every partial sum is an integer below 2^53 when `limb_exact(b)` (so exact,
    in any summation order), and a @ b = sum_i (a_i @ b) << 16 i mod 2^64. `b64`: b as float64
    on a's device (weights are small integers: the caller converts them once and checks
    `limb_exact`)."""
    mask = (1 << LIMB_BITS) - 1
    out = torch.zeros(a.shape[0], b64.shape[1], dtype=torch.int64, device=a.device)
    for i in range(LIMBS):
        limb = ((a >> (LIMB_BITS * i)) & mask).to(torch.float64)
        out += (limb @ b64).to(torch.int64) << (LIMB_BITS * i)  # int64 shifts and adds wrap: the ring
    return out
