"""Helpers for tests and operator drills: adversarial workers."""

from __future__ import annotations

from neuro_dask.testing.adversary import (
    MIN_NOISE,
    MODES,
    Adversary,
    AdversaryCrash,
    AdversarySpec,
    make_adversary,
)

__all__ = ["MIN_NOISE", "MODES", "Adversary", "AdversaryCrash", "AdversarySpec", "make_adversary"]
