"""The soak's CI version (`neuro-dask soak`, docs/trust.md): three minutes of a real network of
processes under load while a volunteer is SIGKILLed every 10 s on average (and comes back), 30%
of the volunteers misbehave (perturb, collude, straggle, crash) with trust on, two CPU hogs run
beside them, and the scheduler is stopped and started again halfway. Every answer is checked
against the local model's."""

from __future__ import annotations

import json

import pytest

from neuro_dask.soak.plan import SoakPlan
from neuro_dask.soak.run import soak

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def test_a_three_minute_soak_completes_every_request_and_never_answers_wrong(tmp_path):
    plan = SoakPlan(minutes=3.0)
    summary = soak(plan, tmp_path, say=print)
    print(json.dumps({k: v for k, v in summary.items() if k != "records"}, indent=2, default=str))
    assert summary["plan"]["kills"] >= 10 and summary["requests"] >= 100, summary["plan"]
    assert summary["wrong"] == 0, [r for r in summary["records"] if r["outcome"] == "wrong"][:5]
    assert summary["completion_rate"] >= 0.999, summary["first_failures"]
    assert (tmp_path / "soak.svg").read_text().startswith("<svg")
