"""Idle-only volunteering: the pause/resume state machine (neuro_dask/volunteer/idle_policy.py), its
settings, and the machine-facing helpers of neuro_dask/volunteer/idle.py that need no cluster."""

from __future__ import annotations

import dask
import pytest

from neuro_dask.errors import ConfigFieldError
from neuro_dask.settings import WorkerSettings
from neuro_dask.volunteer.idle_policy import IdleMonitor, IdlePolicy, IdleSignals

S = IdleSignals
QUIET = S(cpu=5.0, gpu=0.0, input_idle=600.0)
POLICY = IdlePolicy(busy_samples=3, resume_samples=2, min_pause=0.0)


def run(samples, policy=POLICY, step=1.0):
    """The paused flag after each sample, and the reasons of the changes."""
    monitor = IdleMonitor(policy)
    states, reasons = [], []
    for i, signals in enumerate(samples):
        decision = monitor.observe(signals, now=i * step)
        states.append(decision.paused)
        if decision.changed:
            reasons.append(decision.reason)
    return states, reasons


@pytest.mark.parametrize(
    "samples, expected",
    [
        # quiet machine: always serving
        ([QUIET] * 5, [False] * 5),
        # others' CPU above 50% pauses only after 3 samples in a row
        ([S(cpu=80)] * 4, [False, False, True, True]),
        # a busy run broken by a quiet sample starts again
        ([S(cpu=80), S(cpu=80), S(cpu=10), S(cpu=80), S(cpu=80)], [False] * 5),
        # ... and by an in-between sample (neither busy nor idle)
        ([S(cpu=80), S(cpu=80), S(cpu=40), S(cpu=80), S(cpu=80)], [False] * 5),
        # exactly at the threshold is not busy
        ([S(cpu=50)] * 4, [False] * 4),
        # hysteresis: once paused, 40% (below 50, above 25) keeps it paused
        ([S(cpu=80)] * 3 + [S(cpu=40)] * 4, [False, False, True, True, True, True, True]),
        # resume after 2 idle samples in a row
        ([S(cpu=80)] * 3 + [S(cpu=10)] * 3, [False, False, True, True, False, False]),
        # recent input pauses at once, whatever the CPU
        ([QUIET, S(cpu=0, input_idle=5)], [False, True]),
        # input between 60 and 120 s ago: neither pauses nor lets a paused worker resume
        ([S(input_idle=5), S(input_idle=90), S(input_idle=90), S(input_idle=90)], [True] * 4),
        ([S(input_idle=5), S(input_idle=130), S(input_idle=130)], [True, True, False]),
        # GPU used by other processes
        ([S(cpu=0, gpu=95)] * 3, [False, False, True]),
        ([S(cpu=0, gpu=95)] * 3 + [S(cpu=0, gpu=20)] * 3, [False, False, True, True, True, True]),
        ([S(cpu=0, gpu=95)] * 3 + [S(cpu=0, gpu=5)] * 2, [False, False, True, True, False]),
        # missing signals are ignored: GPU busy with no CPU or input signal still pauses
        ([S(gpu=95)] * 3, [False, False, True]),
        # no signal at all: never pauses
        ([S()] * 5, [False] * 5),
        # a paused worker whose signals vanish resumes (nothing says the owner is busy)
        ([S(cpu=80)] * 3 + [S()] * 2, [False, False, True, True, False]),
    ],
)
def test_pause_and_resume(samples, expected):
    assert run(samples)[0] == expected


def test_reasons_name_the_busy_signals():
    _, reasons = run([S(cpu=80, gpu=90, input_idle=3)] + [QUIET] * 2)
    assert reasons[0] == "input 3 s ago; other processes use 80% CPU; other processes use 90% GPU"
    assert reasons[1].startswith("idle for")


def test_min_pause_holds_a_paused_worker_on_the_injected_clock():
    policy = IdlePolicy(busy_samples=1, resume_samples=1, min_pause=10.0)
    # one sample every 4 s: paused at t=0, idle from t=4, but not resumed before t=10 (so at t=12)
    states, _ = run([S(cpu=80)] + [QUIET] * 4, policy, step=4.0)
    assert states == [True, True, True, False, False]


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(busy_cpu=20, resume_cpu=30), "idle-resume-cpu"),
        (dict(busy_gpu=20, resume_gpu=30), "idle-resume-gpu"),
        (dict(busy_input=200, resume_input=100), "idle-resume-input"),
        (dict(busy_samples=0), "idle-busy-samples"),
        (dict(resume_samples=1.5), "idle-resume-samples"),
        (dict(min_pause=-1), "idle-min-pause"),
        (dict(busy_cpu=-1), "idle-busy-cpu"),
    ],
)
def test_policy_rejects_inconsistent_thresholds(kwargs, field):
    with pytest.raises(ConfigFieldError, match=field):
        IdlePolicy(**kwargs)


def test_settings_defaults_and_validation():
    s = WorkerSettings.load()
    assert s.idle_only is False and s.idle_policy() == IdlePolicy()
    assert s.threads(8) is None and s.vram_cap() is None  # plain preload: torch's defaults
    on = WorkerSettings.load(idle_only=True)
    assert on.threads(8) == 7 and on.threads(1) == 1 and on.vram_cap() == 0.8
    assert WorkerSettings.load(max_threads=2, vram_fraction=0.5).threads(8) == 2
    with dask.config.set({"neuro.worker.max-threads": None, "neuro.worker.vram-fraction": None}):
        off = WorkerSettings.load(idle_only=True)
    assert off.threads(8) is None and off.vram_cap() is None
    for bad in (
        dict(max_threads=0),
        dict(vram_fraction=1.5),
        dict(nice=30),
        dict(idle_interval=0),
        dict(idle_busy_cpu=10, idle_resume_cpu=20),
    ):
        with pytest.raises(ConfigFieldError):
            WorkerSettings.load(**bad)


def test_limits_lower_priority_and_cap_threads(monkeypatch):
    import torch

    from neuro_dask.volunteer import idle as volunteer_idle

    calls = {}
    monkeypatch.setattr(volunteer_idle.sys, "platform", "linux")
    monkeypatch.setattr(volunteer_idle.os, "nice", lambda n: calls.setdefault("nice", n) + 0)
    monkeypatch.setattr(torch, "set_num_threads", lambda n: calls.setdefault("threads", n))
    applied = volunteer_idle.apply_limits(WorkerSettings.load(idle_only=True), "cpu", cores=4)
    assert calls == {"nice": 10, "threads": 3}
    assert applied == {"priority": "nice 10", "threads": 3}  # no VRAM cap on a CPU device
    calls.clear()
    assert volunteer_idle.apply_limits(WorkerSettings.load(), "cpu", cores=4) == {}
    assert calls == {}


def test_machine_signals_are_numbers_or_none():
    from neuro_dask.volunteer.idle import MachineSampler, input_idle_seconds

    signals = MachineSampler(gpu=False)()
    assert 0.0 <= signals.cpu <= 100.0 and signals.gpu is None
    idle = input_idle_seconds()
    assert idle is None or idle >= 0


def test_sampler_registry_is_keyed_by_worker_name():
    from neuro_dask.volunteer.idle import SAMPLERS, register_sampler

    undo = register_sampler("w-1", lambda: QUIET)
    assert SAMPLERS["w-1"]() == QUIET
    undo()
    assert "w-1" not in SAMPLERS
