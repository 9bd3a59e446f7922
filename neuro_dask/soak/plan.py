"""A soak run's plan: who misbehaves, and the chaos on a schedule. Pure: the shell (soak/run.py)
carries it out with real processes.

The schedule is drawn once from a seeded rng before the run starts, so a run is repeatable and
its faults are the plan's, never a reaction to what the network did (the load generator waits on
answers; the chaos does not wait on anything).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from neuro_dask.errors import ConfigError

# Adversarial modes a soak draws from (neuro_dask/testing/adversary.py), with their settings.
# Wrong results must be wrong enough to change answers, or "none wrong" proves nothing: noise of
# 5% of an output's RMS on every expert of the adder changed none of 200 answers; noise of 100%
# on two of its four experts per layer changed 130 (scripts/noise_probe.py reproduces both).
ADVERSARIES: dict[str, dict] = {
    "perturb": {"mode": "perturb", "scale": 1.0, "probability": 1.0},
    "collude": {"mode": "collude", "scale": 1.0, "group": "soak-cabal"},
    "straggle": {"mode": "straggle", "probability": 0.2, "delay": 2.0},
    "crash": {"mode": "crash", "after": 50},
}


@dataclass(frozen=True)
class SoakPlan:
    minutes: float = 3.0
    workers: int = 6
    adversarial: float = 0.3  # fraction of the workers
    kill_every: float = 10.0  # mean seconds between SIGKILLs of a random worker (0: none)
    rejoin_after: float = 3.0  # seconds before a killed volunteer's machine starts it again
    hogs: int = 2  # CPU-burning processes beside the network
    scheduler_restart_at: float | None = 0.5  # fraction of the run; None: never
    concurrency: int = 3  # load generator threads
    gateway_share: float = 0.5  # of the requests, through the OpenAI-compatible gateway
    max_new_tokens: int = 6
    seed: int = 0
    replicas: int = 2
    trust: bool = True

    def __post_init__(self) -> None:
        checks = {
            "minutes": self.minutes > 0,
            "workers": isinstance(self.workers, int) and self.workers >= 2,
            "adversarial": 0 <= self.adversarial < 1,
            "kill_every": self.kill_every >= 0,
            "rejoin_after": self.rejoin_after >= 0,
            "hogs": isinstance(self.hogs, int) and self.hogs >= 0,
            "concurrency": isinstance(self.concurrency, int) and self.concurrency >= 1,
            "gateway_share": 0 <= self.gateway_share <= 1,
            "max_new_tokens": isinstance(self.max_new_tokens, int) and self.max_new_tokens >= 1,
            "replicas": isinstance(self.replicas, int) and self.replicas >= 1,
        }
        for name, ok in checks.items():
            if not ok:
                raise ConfigError(f"soak {name.replace('_', '-')}={getattr(self, name)!r} is out of range")
        at = self.scheduler_restart_at
        if at is not None and not 0 < at < 1:
            raise ConfigError(f"soak scheduler-restart-at={at!r} must be a fraction of the run in (0, 1)")

    @property
    def seconds(self) -> float:
        return 60.0 * self.minutes

    def roles(self) -> list[str]:
        """Each worker's role, "honest" or an ADVERSARIES key: round(fraction x workers) of them
        adversarial, the modes taken in turn, shuffled by the seed. At least one worker is honest
        and operator-trusted (index of the first honest one: trusted_index)."""
        bad = min(self.workers - 1, round(self.adversarial * self.workers))
        modes = list(ADVERSARIES)
        roles = [modes[i % len(modes)] for i in range(bad)] + ["honest"] * (self.workers - bad)
        random.Random(f"{self.seed}-roles").shuffle(roles)
        return roles

    def trusted_index(self) -> int:
        return self.roles().index("honest")


@dataclass(frozen=True)
class Fault:
    at: float  # seconds after the start
    kind: str  # kill | scheduler-restart
    target: int = -1  # kill: which worker slot (never the trusted one)


@dataclass(frozen=True)
class Schedule:
    faults: tuple[Fault, ...] = field(default_factory=tuple)

    @property
    def kills(self) -> int:
        return sum(f.kind == "kill" for f in self.faults)


def chaos_schedule(plan: SoakPlan) -> Schedule:
    """Kills at exponential gaps (mean kill_every) on random slots other than the trusted one,
    and the scheduler restart, in time order."""
    rng = random.Random(f"{plan.seed}-chaos")
    trusted = plan.trusted_index()
    slots = [i for i in range(plan.workers) if i != trusted]
    faults: list[Fault] = []
    if plan.kill_every > 0 and slots:
        t = rng.expovariate(1 / plan.kill_every)
        while t < plan.seconds:
            faults.append(Fault(round(t, 3), "kill", rng.choice(slots)))
            t += rng.expovariate(1 / plan.kill_every)
    if plan.scheduler_restart_at is not None:
        faults.append(Fault(round(plan.scheduler_restart_at * plan.seconds, 3), "scheduler-restart"))
    return Schedule(tuple(sorted(faults, key=lambda f: f.at)))


def problems(seed: int, count: int) -> list[str]:
    """Addition prompts for the bundled adder, "a+b=" with a and b below 1,000."""
    rng = random.Random(f"{seed}-problems")
    return [f"{rng.randrange(1000)}+{rng.randrange(1000)}=" for _ in range(count)]
