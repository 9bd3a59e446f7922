"""The private inference tier: expert calls on additive secret shares (docs/privacy.md).

fixed_point, sharing and share_wire are pure (torch only, no Dask); private_executor is the
client's shell over a DistributedExecutor.
"""

from __future__ import annotations

from neuro_dask.privacy.fixed_point import FRAC_BITS, FixedPointOverflowError, decode, encode
from neuro_dask.privacy.sharing import reconstruct, split

PRIVACY_TIERS = ("standard", "private")

__all__ = ["FRAC_BITS", "PRIVACY_TIERS", "FixedPointOverflowError", "decode", "encode", "reconstruct", "split"]
