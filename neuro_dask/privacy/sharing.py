"""Two-party additive secret sharing over Z_2^64 (torch.int64, wrapping).

split(s) -> (r, s - r) with r uniformly random: each share alone is a uniformly random ring
element, independent of s. Any linear map L (integer matrix) commutes with it:
L(r) + L(s - r) = L(s) mod 2^64, so two workers that never meet can each apply L to one share.

Every call to split draws fresh randomness: a share of one split must never be reused for
another (the same row sent to two experts gets two independent splits), or a worker holding
one share of each would learn their difference.

Randomness is injected as `random_bytes(n) -> n bytes`; the default is os.urandom (a CSPRNG).
No Dask here.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch

RandomBytes = Callable[[int], bytes]


def random_ring(shape: tuple[int, ...], random_bytes: RandomBytes = os.urandom) -> torch.Tensor:
    """Uniformly random int64 elements of Z_2^64."""
    n = 1
    for d in shape:
        n *= int(d)
    raw = bytearray(random_bytes(8 * n))
    if len(raw) != 8 * n:
        raise ValueError(f"random_bytes returned {len(raw)} bytes, {8 * n} asked")
    return torch.frombuffer(raw, dtype=torch.int64).reshape(shape) if n else torch.zeros(shape, dtype=torch.int64)


def split(secret: torch.Tensor, random_bytes: RandomBytes = os.urandom) -> tuple[torch.Tensor, torch.Tensor]:
    """int64 secret -> (r, secret - r) mod 2^64, r uniform."""
    if secret.dtype != torch.int64:
        raise TypeError(f"split expects int64 ring elements, got {secret.dtype}")
    r = random_ring(tuple(secret.shape), random_bytes)
    return r, secret - r


def reconstruct(*shares: torch.Tensor) -> torch.Tensor:
    """The secret: the sum of all shares mod 2^64."""
    total = shares[0].clone()
    for s in shares[1:]:
        total += s
    return total
