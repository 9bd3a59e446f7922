"""DP for federated rounds: clipping, noise shares, the RDP accountant."""

from __future__ import annotations

import math

import numpy as np
import pytest

from neuro_dask.errors import ConfigError
from neuro_dask.federated.dp import (
    DPSettings,
    PrivacyAccountant,
    clip_l2,
    effective_multiplier,
    noise_share,
    privatize,
    rdp_epsilon,
)


@pytest.mark.parametrize(
    "vec,clip,norm_after",
    [([3.0, 4.0], 1.0, 1.0), ([3.0, 4.0], 10.0, 5.0), ([0.0, 0.0], 1.0, 0.0), ([3.0, 4.0], None, 5.0)],
)
def test_clip_l2(vec, clip, norm_after):
    out, before = clip_l2(np.array(vec), clip)
    assert before == pytest.approx(np.linalg.norm(vec))
    assert np.linalg.norm(out) == pytest.approx(norm_after)


def test_noise_shares_sum_to_the_full_noise():
    s = DPSettings(clip_norm=2.0, noise_multiplier=1.5)
    rng = np.random.default_rng(0)
    total = sum(noise_share(200_000, s, 4, rng) for _ in range(4))
    assert total.std() == pytest.approx(1.5 * 2.0, rel=0.02)
    assert not noise_share(10, DPSettings(), 4, rng).any()


def test_privatize_clips_before_noise():
    s = DPSettings(clip_norm=1.0, noise_multiplier=0.0)
    assert np.linalg.norm(privatize(np.full(100, 5.0), s, 3, np.random.default_rng(0))) == pytest.approx(1.0)


@pytest.mark.parametrize("kwargs", [dict(clip_norm=0.0), dict(noise_multiplier=-1.0), dict(noise_multiplier=1.0)])
def test_settings_are_checked(kwargs):
    with pytest.raises(ConfigError):
        DPSettings(**kwargs)


def test_rdp_epsilon_matches_the_closed_form_optimum():
    """eps(alpha) = R alpha / (2 z^2) + log(1/delta) / (alpha - 1) is minimised at
    alpha* = 1 + sqrt(2 z^2 log(1/delta) / R), giving R/(2z^2) + sqrt(2 R log(1/delta)) / z."""
    z, rounds, delta = 1.0, 10, 1e-5
    closed = rounds / (2 * z * z) + math.sqrt(2 * rounds * math.log(1 / delta)) / z
    fine = [1 + i / 1000 for i in range(1, 100_000)]
    assert rdp_epsilon([z] * rounds, delta, fine) == pytest.approx(closed, rel=1e-4)
    assert rdp_epsilon([z] * rounds, delta) == pytest.approx(closed, rel=0.02)


def test_epsilon_grows_with_rounds_and_shrinks_with_noise():
    assert rdp_epsilon([1.0] * 20, 1e-5) > rdp_epsilon([1.0] * 10, 1e-5)
    assert rdp_epsilon([2.0] * 10, 1e-5) < rdp_epsilon([1.0] * 10, 1e-5)
    assert rdp_epsilon([], 1e-5) == 0.0
    assert rdp_epsilon([0.0], 1e-5) == math.inf


def test_accountant_charges_the_survivors_noise():
    acc = PrivacyAccountant(DPSettings(clip_norm=1.0, noise_multiplier=1.0))
    acc.record_round(4, 4)
    full = acc.epsilon(1e-5)
    acc2 = PrivacyAccountant(DPSettings(clip_norm=1.0, noise_multiplier=1.0))
    acc2.record_round(3, 4)  # one dropped: its noise share is missing
    assert acc2.epsilon(1e-5) > full
    assert effective_multiplier(1.0, 3, 4) == pytest.approx(math.sqrt(0.75))
