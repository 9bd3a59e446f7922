"""The adversary drills with a NEURO ledger: every adversary is caught, and only proven fraud is
slashed. A perturber's or a colluder's wrong answer reaches the scheduler as a dispute carrying
its signed answer, which an operator-trusted worker recomputes; a straggler or a crashing worker
has done nothing provable, so its stake stays whole (lateness and crashes cost reputation only,
on the scheduler's own observations). tests/integration/test_ledger_network.py runs perturb."""

from __future__ import annotations

import pytest

from neuro_dask.cli.drill import run_drill

pytestmark = pytest.mark.slow


def _drill(sharded, tmp_path, mode: str, **options):
    url = f"sqlite:///{tmp_path}/ledger.db"
    report = run_drill(
        sharded("mixtral"), workers=6, adversaries=0.34, mode=mode, seed=5, prompts=6, tokens=16, ledger=url, **options
    )
    assert report.identical and report.wrong_accepted == 0
    assert report.ledger["problems"] == []  # the books balance
    assert report.ledger["charged"] > 0 and sum(report.ledger["earned"].values()) > 0
    return report


def test_colluders_are_proven_wrong_and_slashed(sharded, tmp_path):
    report = _drill(sharded, tmp_path, "collude")
    exercised = sorted(set(report.adversaries) - set(report.unexercised))
    assert exercised and report.ledger["slashed"] == exercised
    assert set(exercised) <= set(report.caught)


@pytest.mark.parametrize(
    "mode, options",
    [
        ("straggle", {"probability": 0.3, "delay": 0.05}),
        ("crash", {"after": 3}),
    ],
)
def test_stragglers_and_crashes_lose_no_stake(sharded, tmp_path, mode, options):
    report = _drill(sharded, tmp_path, mode, **options)
    assert report.ledger["slashed"] == []
    if mode == "crash":
        assert report.departed  # the crashed adversaries are gone, and the output is unchanged
