"""Differential privacy for federated rounds: L2 clipping, Gaussian noise, an RDP accountant.

Unit of privacy: one participant (user-level DP, as DP-FedAvg, McMahan et al. 2018): two
neighbouring runs differ by adding or removing one participant's whole data set.

Where the noise is added: by the participants, *before* masking (distributed DP). Each of the n
members of a round's cohort clips its update to L2 norm <= C and adds N(0, (z C)^2 / n) per
coordinate; the sum the aggregator decodes then carries N(0, (z C)^2) noise when all n survive,
and m/n of that variance when only m do (the accountant is told the survivors and charges the
smaller effective multiplier z_eff = z * sqrt(m / n)). Secure aggregation means the aggregator
never sees a less noisy individual value; the guarantee assumes the survivors are honest (a
participant that skips its noise share weakens it).

Accountant: the Gaussian mechanism with L2 sensitivity C and noise std z C has Renyi DP
eps_alpha = alpha / (2 z^2) at every order alpha > 1 (Mironov 2017); R rounds compose by
adding: eps_alpha = sum_r alpha / (2 z_r^2); and (eps, delta)-DP follows from
eps = min_alpha [eps_alpha + log(1/delta) / (alpha - 1)]. No subsampling amplification is claimed
(every participant is in every round). This conversion is simple and slightly loose; an
analytic/PLD accountant would give a smaller epsilon for the same noise.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from neuro_dask.errors import ConfigError

DEFAULT_ORDERS = tuple([1.0 + x / 10.0 for x in range(1, 100)] + list(range(12, 64)) + [128, 256, 512, 1024])


@dataclass(frozen=True)
class DPSettings:
    """clip_norm C: each participant's update is scaled to L2 norm <= C (None: no clipping).
    noise_multiplier z: the round's summed noise has std z*C per coordinate (0: no noise)."""

    clip_norm: float | None = None
    noise_multiplier: float = 0.0

    def __post_init__(self) -> None:
        if self.clip_norm is not None and not self.clip_norm > 0:
            raise ConfigError(f"clip_norm must be > 0 or None, got {self.clip_norm}")
        if self.noise_multiplier < 0:
            raise ConfigError(f"noise_multiplier must be >= 0, got {self.noise_multiplier}")
        if self.noise_multiplier > 0 and self.clip_norm is None:
            raise ConfigError("noise without clipping has no sensitivity bound: set clip_norm as well")


def clip_l2(update: np.ndarray, clip_norm: float | None) -> tuple[np.ndarray, float]:
    """(update scaled to L2 norm <= clip_norm, its norm before clipping)."""
    norm = float(np.linalg.norm(update))
    if clip_norm is None or norm <= clip_norm:
        return update, norm
    return update * (clip_norm / norm), norm


def noise_share(length: int, settings: DPSettings, cohort_size: int, rng: np.random.Generator) -> np.ndarray:
    """One participant's share of the round's Gaussian noise: N(0, (z C)^2 / cohort_size)."""
    if settings.noise_multiplier == 0:
        return np.zeros(length)
    std = settings.noise_multiplier * settings.clip_norm / math.sqrt(cohort_size)
    return rng.normal(0.0, std, size=length)


def privatize(update: np.ndarray, settings: DPSettings, cohort_size: int, rng: np.random.Generator) -> np.ndarray:
    """Clip, then add this participant's noise share."""
    clipped, _ = clip_l2(update, settings.clip_norm)
    return clipped + noise_share(clipped.size, settings, cohort_size, rng)


def effective_multiplier(noise_multiplier: float, survivors: int, cohort_size: int) -> float:
    """The multiplier the decoded sum actually carries when only `survivors` of the cohort added noise."""
    return noise_multiplier * math.sqrt(survivors / cohort_size)


def rdp_epsilon(noise_multipliers: Iterable[float], delta: float, orders: Iterable[float] = DEFAULT_ORDERS) -> float:
    """(epsilon at delta) after one Gaussian mechanism per round, multipliers z_r; inf if any z_r == 0."""
    zs = list(noise_multipliers)
    if not 0 < delta < 1:
        raise ConfigError(f"delta must be in (0, 1), got {delta}")
    if not zs:
        return 0.0
    if any(z <= 0 for z in zs):
        return math.inf
    per_order = sum(1.0 / (2.0 * z * z) for z in zs)
    return min(a * per_order + math.log(1.0 / delta) / (a - 1.0) for a in orders)


@dataclass
class PrivacyAccountant:
    """Tracks the multipliers of the rounds run so far; `epsilon(delta)` reports the spend."""

    settings: DPSettings
    rounds: list[float] | None = None

    def record_round(self, survivors: int, cohort_size: int) -> None:
        self.rounds = (self.rounds or []) + [
            effective_multiplier(self.settings.noise_multiplier, survivors, cohort_size)
        ]

    def epsilon(self, delta: float) -> float:
        return rdp_epsilon(self.rounds or [], delta)
