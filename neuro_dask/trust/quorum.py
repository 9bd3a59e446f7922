"""Quorum of replicated expert calls, after BOINC's validator: generic logic apart from comparison.

One `Quorum` per call (one layer's experts for one set of rows). Replicas report results or
errors; `decide()` says accept, ask for more, or give up.

Rules:
  1. Results are grouped by agreement (`validation.agree` against each group's first member).
  2. A result *counts* only if its worker is trusted or established: agreement among newcomers
     alone never suffices (unless the policy runs in `anchorless` mode, see 6).
  3. Accept a group when it holds at least `quorum` results and at least one counting result.
     `quorum` is min_quorum for a replicated call, 1 for a call the replication policy chose not
     to replicate (then the single worker is established or trusted).
     The group's first result is canonical; its members are valid, everyone else invalid.
  4. Otherwise ask for one more replica at a time, until `max_total_replicas` results+errors
     or `max_error_replicas` errors are spent: then Exhausted (the caller falls back to a
     trusted worker, or raises QuorumExhaustedError).
  5. A result that arrives after the decision is judged against the canonical result: credited
     only if it agrees (trust/late_checks.py, `late_verdict`).
  6. `anchorless=True` (no trusted worker and no established one exists yet, as at a network's
     first start) lets agreement of `quorum` results from distinct owners count, and never fewer
     than `min_quorum` owners: one owner's word alone (an expert only it hosts) is accepted from
     nobody without a record, so a newcomer cannot earn one unchecked. It guarantees only that
     no single owner changed the output; the dispatcher logs that plainly.
  7. A replica abandoned unanswered (it lost a hedge race while another replica of the call had
     already answered) may be waived: the call then needs one result fewer, never below 1, and
     still a counting one. A check whose subject did not answer in time checks nothing, and the
     remaining answer is accepted only if it would have been acceptable unreplicated. Never in
     anchorless mode, where agreement is the only safeguard.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from neuro_dask.errors import ConfigError, NeuroDaskError
from neuro_dask.trust.validation import Result, ValidationPolicy, agree


@dataclass(frozen=True)
class QuorumPolicy:
    min_quorum: int = 2
    target_replicas: int = 2
    max_total_replicas: int = 5
    max_error_replicas: int = 3

    def __post_init__(self) -> None:
        if not 1 <= self.min_quorum <= self.target_replicas <= self.max_total_replicas:
            raise ConfigError(
                "quorum needs 1 <= min_quorum <= target_replicas <= max_total_replicas, got "
                f"{self.min_quorum}, {self.target_replicas}, {self.max_total_replicas}"
            )
        if self.max_error_replicas < 1:
            raise ConfigError(f"max_error_replicas must be >= 1, got {self.max_error_replicas}")


class QuorumExhaustedError(NeuroDaskError):
    def __init__(self, layer: int, experts: list[int], results: int, groups: int, errors: int):
        self.layer, self.experts = layer, experts
        super().__init__(
            f"layer {layer} experts {experts}: no quorum after {results} results in {groups} disagreeing "
            f"groups and {errors} errors; mark an honest worker trusted (`neuro-dask trust WORKER`) so "
            "exhausted calls can fall back to it, or raise max_total_replicas"
        )


@dataclass(frozen=True)
class Accepted:
    canonical: Result
    valid: tuple[str, ...]
    invalid: tuple[str, ...]


@dataclass(frozen=True)
class NeedMore:
    replicas: int


@dataclass(frozen=True)
class Exhausted:
    results: int
    groups: int
    errors: int


Decision = Accepted | NeedMore | Exhausted


@dataclass
class Quorum:
    policy: QuorumPolicy
    counts: Callable[[str], bool]  # trusted or established
    quorum: int = 2
    validation: ValidationPolicy = field(default_factory=ValidationPolicy)
    anchorless: bool = False
    owner_of: Callable[[str], str] = lambda w: w
    groups: list[list[tuple[str, Result]]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    decided: Accepted | None = None

    @property
    def replies(self) -> int:
        return sum(map(len, self.groups)) + len(self.errors)

    def add_result(self, worker: str, result: Result) -> None:
        for group in self.groups:
            if agree(group[0][1], result, self.validation):
                group.append((worker, result))
                return
        self.groups.append([(worker, result)])

    def add_error(self, worker: str) -> None:
        self.errors.append(worker)

    def waive(self) -> bool:
        """Rule 7: one result fewer is needed; False (and no change) in anchorless mode."""
        if self.anchorless or self.decided is not None:
            return False
        self.quorum = max(1, self.quorum - 1)
        return True

    def _accepts(self, group: list[tuple[str, Result]]) -> bool:
        if len(group) < self.quorum:
            return False
        if any(self.counts(w) for w, _ in group):
            return True
        # Rule 6 guarantees only that no single owner changed the output, so it needs min_quorum
        # owners even where the call's own quorum is 1 (an unreplicated call, a waived replica).
        owners = len({self.owner_of(w) for w, _ in group})
        return self.anchorless and owners >= max(self.quorum, self.policy.min_quorum)

    def decide(self, outstanding: int = 0) -> Decision:
        """outstanding: replicas sent that have not answered yet (they may still complete a quorum)."""
        if self.decided is not None:
            return self.decided
        for group in sorted(self.groups, key=len, reverse=True):
            if self._accepts(group):
                valid = tuple(w for w, _ in group)
                invalid = tuple(w for g in self.groups if g is not group for w, _ in g)
                self.decided = Accepted(group[0][1], valid, invalid)
                return self.decided
        spent = self.replies + outstanding >= self.policy.max_total_replicas
        if spent or len(self.errors) >= self.policy.max_error_replicas:
            if outstanding:
                return NeedMore(0)  # wait for what is in flight before giving up
            return Exhausted(sum(map(len, self.groups)), len(self.groups), len(self.errors))
        return NeedMore(0 if outstanding else 1)
