"""Shamir's t-of-n secret sharing over GF(P), P = 2^521 - 1 (a Mersenne prime), for 32-byte
secrets: any t shares give the secret back, fewer reveal nothing about it. Pure Python integers.

Used by secure aggregation's self-masks (secure_aggregation.py): each participant shares its
round's self-mask seed among the cohort, so that a threshold of survivors can remove it.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence

from neuro_dask.federated.errors import ProtocolError

P = 2**521 - 1
SHARE_BYTES = 66  # ceil(521 / 8): a share's value, big-endian


def _random_field(entropy: Callable[[int], bytes]) -> int:
    while True:  # rejection sampling: uniform on [0, P)
        value = int.from_bytes(entropy(SHARE_BYTES), "big") & ((1 << 521) - 1)
        if value < P:
            return value


def split(
    secret: bytes, xs: Sequence[int], threshold: int, entropy: Callable[[int], bytes] = os.urandom
) -> dict[int, bytes]:
    """x -> share of `secret` for each nonzero x in `xs`; any `threshold` of them recover it."""
    if not 1 <= threshold <= len(xs):
        raise ProtocolError(f"threshold {threshold} must be between 1 and the {len(xs)} share holders")
    if len(set(xs)) != len(xs) or any(not 0 < x < P for x in xs):
        raise ProtocolError(f"share points {list(xs)} must be distinct and nonzero")
    coefficients = [int.from_bytes(secret, "big")] + [_random_field(entropy) for _ in range(threshold - 1)]
    if coefficients[0] >= P:
        raise ProtocolError("the secret is too large for the field")
    shares = {}
    for x in xs:
        y = 0
        for c in reversed(coefficients):  # Horner
            y = (y * x + c) % P
        shares[x] = y.to_bytes(SHARE_BYTES, "big")
    return shares


def combine(shares: Mapping[int, bytes], threshold: int, secret_bytes: int = 32) -> bytes:
    """The secret from at least `threshold` shares (x -> share): Lagrange interpolation at 0."""
    if len(shares) < threshold:
        raise ProtocolError(f"{len(shares)} shares cannot recover a secret shared {threshold}-of-n")
    points = [(x, int.from_bytes(y, "big")) for x, y in sorted(shares.items())[:threshold]]
    secret = 0
    for i, (xi, yi) in enumerate(points):
        num = den = 1
        for j, (xj, _) in enumerate(points):
            if i != j:
                num = num * (-xj) % P
                den = den * (xi - xj) % P
        secret = (secret + yi * num * pow(den, -1, P)) % P
    if secret >= 1 << (8 * secret_bytes):
        raise ProtocolError("the shares do not agree on a secret (a share was altered)")
    return secret.to_bytes(secret_bytes, "big")
