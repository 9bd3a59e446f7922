"""Adaptive replication: how many replicas one call gets, and which workers, from their records.

Rules:
  1. A worker that is neither trusted nor established is always replicated, and its replica
     goes to a trusted or established worker when one hosts the experts: a newcomer's work is
     checked against someone with a record until it has one of its own.
  2. An established worker with n consecutive validated results is replicated with probability
     max(spot_check, establish_after / n): 1 when it has just established itself, halving as its
     record doubles, never below `spot_check` (default 5%), so no worker can bank trust and then
     cheat unchecked. A trusted worker is replicated with probability `spot_check`.
  3. Two replicas of a call never go to the same owner (one owner's workers count as one).
  4. A replicated call needs `min_quorum` agreeing results; an unreplicated one needs 1.
  5. With no candidate of a different owner the call goes out unreplicated and is marked
     `unchecked`, so the caller can report what it could not guarantee.
Randomness is injected (`rng.random()`), so a seeded drill is repeatable.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from neuro_dask.errors import ConfigError


@dataclass(frozen=True)
class ReplicationPolicy:
    spot_check: float = 0.05
    establish_after: int = 20
    min_quorum: int = 2

    def __post_init__(self) -> None:
        if not 0 <= self.spot_check <= 1:
            raise ConfigError(f"spot_check must be in [0, 1], got {self.spot_check}")
        if self.establish_after < 1 or self.min_quorum < 1:
            raise ConfigError("establish_after and min_quorum must be >= 1")


@dataclass(frozen=True)
class Standing:
    """What replication needs to know about a worker (from the scheduler's reputation)."""

    trusted: bool = False
    established: bool = False
    consecutive_valid: int = 0
    owner: str = ""
    precision: str = "float32"  # what its experts of this model run at (neuro.worker.precision)


@dataclass(frozen=True)
class CallPlan:
    workers: tuple[str, ...]  # the primary first
    quorum: int
    unchecked: bool = False


def replication_probability(s: Standing, policy: ReplicationPolicy) -> float:
    """Rule 2 (and 1: a worker without a record is always replicated)."""
    if s.trusted:
        return policy.spot_check
    if not s.established:
        return 1.0
    return max(policy.spot_check, min(1.0, policy.establish_after / max(s.consecutive_valid, 1)))


def plan_call(
    candidates: Sequence[str], standing: Callable[[str], Standing], policy: ReplicationPolicy, rng: random.Random
) -> CallPlan:
    """candidates: workers hosting the call's experts, preferred first (the first is the primary)."""
    if not candidates:
        raise ValueError("plan_call needs at least one candidate worker")
    primary = candidates[0]
    p = standing(primary)
    if rng.random() >= replication_probability(p, policy):
        return CallPlan((primary,), 1)
    owner = p.owner or primary
    others = [w for w in candidates[1:] if (standing(w).owner or w) != owner]
    if not others:
        return CallPlan((primary,), 1, unchecked=True)
    anchored = [w for w in others if standing(w).trusted or standing(w).established]
    picked: list[str] = [primary]
    owners = {owner}
    for w in (anchored if not (p.trusted or p.established) and anchored else []) + others:
        if len(picked) >= policy.min_quorum:
            break
        o = standing(w).owner or w
        if o not in owners:
            picked.append(w)
            owners.add(o)
    return CallPlan(tuple(picked), min(policy.min_quorum, len(picked)))
