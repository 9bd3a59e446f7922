"""The soak's rules (neuro_dask/soak/plan.py, tally.py): who misbehaves, the chaos schedule, and
what a run's records add up to."""

from __future__ import annotations

import math

import pytest

from neuro_dask.errors import ConfigError
from neuro_dask.soak.plan import ADVERSARIES, SoakPlan, chaos_schedule, problems
from neuro_dask.soak.tally import RequestRecord, quantile, summarize, svg_timeline


def test_the_adversarial_fraction_takes_each_mode_in_turn_and_leaves_an_honest_trusted_worker():
    plan = SoakPlan(workers=10, adversarial=0.3)
    roles = plan.roles()
    assert sum(r != "honest" for r in roles) == 3
    assert {r for r in roles if r != "honest"} <= set(ADVERSARIES)
    assert roles[plan.trusted_index()] == "honest"
    assert SoakPlan(workers=2, adversarial=0.9).roles().count("honest") == 1  # never all adversarial
    assert roles == SoakPlan(workers=10, adversarial=0.3).roles()  # the seed decides


def test_the_chaos_schedule_is_the_plans_own_and_spares_the_trusted_worker():
    plan = SoakPlan(minutes=30, workers=6, kill_every=10.0, seed=3)
    schedule = chaos_schedule(plan)
    kills = [f for f in schedule.faults if f.kind == "kill"]
    assert 140 <= len(kills) <= 220  # about 1,800 s / 10 s
    assert all(f.target != plan.trusted_index() for f in kills)
    assert [f.at for f in schedule.faults] == sorted(f.at for f in schedule.faults)
    assert all(0 <= f.at < plan.seconds for f in schedule.faults)
    [restart] = [f for f in schedule.faults if f.kind == "scheduler-restart"]
    assert restart.at == pytest.approx(plan.seconds / 2)
    assert chaos_schedule(plan) == schedule  # repeatable
    quiet = SoakPlan(kill_every=0, scheduler_restart_at=None)
    assert chaos_schedule(quiet).faults == ()


@pytest.mark.parametrize(
    "field, value",
    [
        ("minutes", 0),
        ("workers", 1),
        ("adversarial", 1.0),
        ("kill_every", -1),
        ("concurrency", 0),
        ("scheduler_restart_at", 1.5),
        ("gateway_share", 2),
    ],
)
def test_a_plan_out_of_range_is_refused(field, value):
    with pytest.raises(ConfigError, match=field.replace("_", "-")):
        SoakPlan(**{field: value})


def test_problems_are_additions_the_adder_reads():
    ps = problems(0, 50)
    assert len(ps) == 50 and all(p.endswith("=") and "+" in p for p in ps)
    assert ps == problems(0, 50) and ps != problems(1, 50)


def _r(outcome, seconds=1.0, via="gateway", error=""):
    return RequestRecord(via, 0.0, seconds, outcome, error)


def test_the_summary_counts_completion_wrong_answers_and_failures_by_kind():
    records = [_r("correct", s) for s in (0.1, 0.2, 0.3, 0.4)] + [
        _r("wrong", 0.5, "map"),
        _r("failed", 9.0, "generate", "ExpertUnavailableError: no live worker serves expert(s) [6]"),
        _r("failed", 9.0, "generate", "ExpertUnavailableError: again"),
        _r("failed", 1.0, "gateway", "HTTPError: HTTP Error 503"),
    ]
    s = summarize(records, {"hedges": 3})
    assert (s["requests"], s["correct"], s["wrong"], s["failed"]) == (8, 4, 1, 3)
    assert s["completion_rate"] == 0.5
    assert s["failures"] == {"ExpertUnavailableError": 2, "HTTPError": 1}
    assert s["p50_s"] == 0.2 and s["p99_s"] == 0.4  # correct answers' latency only
    generate = s["by_via"]["generate"]
    assert (generate["requests"], generate["correct"]) == (2, 0) and math.isnan(generate["p50_s"])
    assert s["network"] == {"hedges": 3}
    assert math.isnan(summarize([])["completion_rate"])


def test_quantiles_are_of_the_values_seen():
    assert quantile([3.0, 1.0, 2.0], 0.5) == 2.0
    assert quantile(list(range(1, 101)), 0.99) == 99
    assert math.isnan(quantile([], 0.5))


def test_the_plot_is_an_svg_with_a_mark_per_request_and_a_line_per_fault():
    plan = SoakPlan(minutes=1, kill_every=10.0)
    faults = chaos_schedule(plan).faults
    records = [_r("correct", 0.3), _r("wrong", 0.4), _r("failed", 2.0, error="X: y")]
    svg = svg_timeline(records, faults, plan.seconds, "a <title> & more")
    assert svg.startswith("<svg") and svg.rstrip().endswith("</svg>")
    assert svg.count("<circle") == 2 and ">x</text>" in svg
    assert svg.count('stroke="#bbb"') == len(faults)
    assert "a &lt;title&gt; &amp; more" in svg
