"""Idle-only volunteering: when does a worker step aside for the machine's owner?

A pure state machine: signals in (others' CPU and GPU use, seconds since the last keyboard or
mouse input), a decision out (serve or pause, and why). The worker's shell
(neuro_dask/volunteer/idle.py) samples the machine, feeds `IdleMonitor.observe` and enacts the
decision; nothing here touches the machine, a clock or distributed.

The rule, with hysteresis so that a worker does not flap:

- a sample is *busy* when any signal that is known crosses its pause threshold: others use more
  than `busy_cpu` percent of the CPUs, more than `busy_gpu` percent of a GPU, or the owner
  touched the keyboard or mouse less than `busy_input` seconds ago;
- a sample is *idle* when every known signal is under its resume threshold: others below
  `resume_cpu` and `resume_gpu` percent, and no input for `resume_input` seconds;
- anything between is neither, and resets both counts;
- a serving worker pauses after `busy_samples` busy samples in a row, or at once on recent input
  (the owner is at the machine);
- a paused worker resumes after `resume_samples` idle samples in a row, and not before it has
  been paused `min_pause` seconds.

A signal that cannot be read on this platform is None and ignored; with none known at all the
worker never pauses (the shell warns that it cannot watch this machine).
"""

from __future__ import annotations

from dataclasses import dataclass

from neuro_dask.errors import ConfigFieldError


@dataclass(frozen=True)
class IdleSignals:
    """One sample of the machine. Percentages are of the whole machine (0-100); None = unknown."""

    cpu: float | None = None  # CPU use by processes other than this worker's, percent
    gpu: float | None = None  # highest use of a GPU by other processes, percent
    input_idle: float | None = None  # seconds since the last keyboard or mouse input


@dataclass(frozen=True)
class IdlePolicy:
    busy_cpu: float = 50.0
    resume_cpu: float = 25.0
    busy_gpu: float = 30.0
    resume_gpu: float = 10.0
    busy_input: float = 60.0
    resume_input: float = 120.0
    busy_samples: int = 3
    resume_samples: int = 5
    min_pause: float = 30.0

    def __post_init__(self) -> None:
        for kind in ("cpu", "gpu", "input"):
            busy, resume = getattr(self, f"busy_{kind}"), getattr(self, f"resume_{kind}")
            if busy < 0 or resume < 0:
                raise ConfigFieldError("neuro.worker", f"idle-busy-{kind}", "thresholds must not be negative")
            if kind == "input" and resume < busy:
                raise ConfigFieldError(
                    "neuro.worker", "idle-resume-input", f"must be at least idle-busy-input ({busy}), got {resume}"
                )
            if kind != "input" and resume > busy:
                raise ConfigFieldError(
                    "neuro.worker", f"idle-resume-{kind}", f"must be at most idle-busy-{kind} ({busy}), got {resume}"
                )
        for name in ("busy_samples", "resume_samples"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigFieldError(
                    "neuro.worker", f"idle-{name.replace('_', '-')}", f"must be a positive integer, got {value!r}"
                )
        if self.min_pause < 0:
            raise ConfigFieldError("neuro.worker", "idle-min-pause", "must be 0 or a positive number of seconds")


@dataclass(frozen=True)
class IdleDecision:
    paused: bool  # after this sample
    changed: bool  # this sample paused or resumed the worker
    reason: str  # why it is paused (the busiest signal), or why it resumed


class IdleMonitor:
    """Feed it a sample every interval; it says whether the worker should serve."""

    def __init__(self, policy: IdlePolicy | None = None):
        self.policy = policy or IdlePolicy()
        self.paused = False
        self.reason = ""
        self.busy_run = 0  # busy samples in a row
        self.idle_run = 0  # idle samples in a row
        self.paused_at = 0.0

    def busy_reasons(self, s: IdleSignals) -> list[str]:
        p = self.policy
        reasons = []
        if s.input_idle is not None and s.input_idle < p.busy_input:
            reasons.append(f"input {s.input_idle:.0f} s ago")
        if s.cpu is not None and s.cpu > p.busy_cpu:
            reasons.append(f"other processes use {s.cpu:.0f}% CPU")
        if s.gpu is not None and s.gpu > p.busy_gpu:
            reasons.append(f"other processes use {s.gpu:.0f}% GPU")
        return reasons

    def is_idle(self, s: IdleSignals) -> bool:
        p = self.policy
        return (
            (s.cpu is None or s.cpu < p.resume_cpu)
            and (s.gpu is None or s.gpu < p.resume_gpu)
            and (s.input_idle is None or s.input_idle >= p.resume_input)
        )

    def observe(self, signals: IdleSignals, now: float) -> IdleDecision:
        p = self.policy
        busy = self.busy_reasons(signals)
        if busy:
            self.busy_run, self.idle_run = self.busy_run + 1, 0
        elif self.is_idle(signals):
            self.busy_run, self.idle_run = 0, self.idle_run + 1
        else:
            self.busy_run = self.idle_run = 0
        if not self.paused:
            at_keyboard = signals.input_idle is not None and signals.input_idle < p.busy_input
            if busy and (at_keyboard or self.busy_run >= p.busy_samples):
                self.paused, self.reason, self.paused_at = True, "; ".join(busy), now
                return IdleDecision(True, True, self.reason)
            return IdleDecision(False, False, "")
        if busy:
            self.reason = "; ".join(busy)  # still paused: the latest cause
        if self.idle_run >= p.resume_samples and now - self.paused_at >= p.min_pause:
            self.paused, self.reason = False, ""
            return IdleDecision(False, True, f"idle for {self.idle_run} samples")
        return IdleDecision(True, False, self.reason)
