"""Per-worker reputation: correctness, timeliness, speed and uptime, slow to earn and quick to lose.

Inspired by BOINC (validated-result streaks before a host is trusted, availability fractions) and
EigenTrust (operator-marked pre-trusted peers). Pure: no Dask, no clock, no randomness. Every
method that needs the time takes `now` (seconds, any epoch); events go in, `ReputationChange`
decisions come out, and the whole state round-trips through JSON (`to_dict` / `from_dict`).

Components
----------
Each worker has four components, each in [0, 1], all starting at `initial` (c0, default 0.5).
r = earn_rate, p_inv = invalid_penalty, p_late = late_penalty, p_crash = crash_penalty,
H = uptime_halflife.

correctness c
    validated:  c <- c + r * c * (1 - c)
        Logistic growth: each correct result earns in proportion to the trust already held, so
        rebuilding from a low value is slower than a stranger's start and every further wrong
        result lengthens the way back (there is no floor that caps a serial defector's penalty).
    invalid:    c <- min(c, c0) * (1 - p_inv)
        A wrong result leaves any worker, however long its record, at most (1 - p_inv) times as
        trusted as a stranger. The policy requires c0 * (1 - p_inv) < min_reputation, so one wrong
        result always takes an untrusted worker out of routing. With p_inv = 1, c becomes 0 and
        logistic growth never lifts it again: one strike bans the worker for good.
timeliness t
    validated, on time:  t <- t + r * (1 - t)     (steady recovery: lateness is usually load)
    late, timeout:       t <- t * (1 - p_late)    (repeated lateness compounds geometrically)
    A result reported `late` and then `validated` under the same cause_id earns correctness but
    not timeliness (the newest 64 late cause_ids per worker are remembered for this).
speed s
    observe_speed(rho):  s <- rho / (1 + rho)     with rho = worker speed / median worker speed,
    so the median worker scores 0.5, twice the median 0.667, and s -> 1 only as rho -> inf.
    The latest observation replaces the previous one: the caller smooths its measurements.
uptime u  (an exponentially weighted fraction of time present, like BOINC's on_frac)
    Before every event that carries `now`, Delta = now - last update (never negative):
        present:  u <- 1 - (1 - u) * 2 ** (-Delta / H)      (moves toward 1)
        absent:   u <- u * 2 ** (-Delta / H)                (moves toward 0)
    crash:    u <- u * (1 - p_crash), and the worker is absent until it joins again
    timeout:  u <- u * (1 - p_crash)  (it may still be connected, but did not deliver)

Score
-----
    G     = prod_i x_i ** w_i        over (c, t, s, u) with weights (w_c, w_t, w_s, w_u), sum 1
    score = min(c, G)

G is the weighted geometric mean: a weakness in any component cannot be bought back by strength
in another (a correct, fast worker that is always late is still a poor choice), and a component
at 0 zeroes the score. It is clamped to [min x_i, max x_i] over the positive-weight components,
where it lies mathematically, so floating point cannot put a newcomer a hair below 0.5.
`min(c, .)` makes correctness a ceiling: no amount of speed or uptime outweighs wrong answers.

Rules
-----
* A newcomer has every component at c0, so score == c0 == 0.5 == min_reputation: routable, with no
  slack (any late result, timeout or crash takes it below the threshold until it earns back).
* A worker is *established* once it has `establish_after` consecutive validated results; an
  invalid result, a timeout or a crash resets the streak to 0 (a late result does not).
* A worker is *routable* when score >= min_reputation. Below it, it gets spot checks only.
* Trusted (operator-marked) workers are always established and routable. Their score is still
  computed honestly, so a trusted worker that returns wrong results loses correctness and score
  and operators see it on the dashboard, but routing is the operator's call, not the formula's.
* An event for an unknown worker first joins it silently as a newcomer with owner "" (a result
  can arrive before the join is seen); the returned change's `before` is the newcomer's score.
  Queries (`record`, `score`, `routable`, `ranked`, ...) never join: an unknown worker reads as
  a newcomer that is not stored.
* `leave` keeps the record: a worker that comes back under the same name keeps its reputation
  (its uptime has decayed while away).
* Time never runs backwards: an event with an earlier `now` than the last one counts as no time
  passing.

Trajectories with the default policy (asserted in tests/unit/test_reputation.py)
--------------------------------------------------------------------------------
* A newcomer is established after 20 consecutive validated results (correctness 0.5 -> 0.732);
  correctness needs 44 validated results to reach 0.9 and 59 to reach 0.95.
* One invalid result puts any worker at correctness <= 0.25, so score <= 0.25. From 0.25 it
  takes 23 validated results to be routable again (c >= 0.5; its streak makes it established
  again after 20, while still unroutable) and 81 to get back to 0.95. A second wrong result right
  after costs more: 40 validated results from 0.125 back to 0.5.
* A worker with c = t = u = 1 at median speed (score 0.5 ** 0.15 = 0.901) drops below
  min_reputation after 28 late results in a row; its timeliness is below 0.5 after 7.
* One timeout costs that worker 0.901 -> 0.853, one crash 0.901 -> 0.872: far less than one
  wrong result (-> 0.25).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from neuro_dask.errors import ConfigError

FORMAT_VERSION = 1
LATE_MEMORY = 64  # late cause_ids remembered per worker; bounds memory when a verdict never comes
_WEIGHT_TOLERANCE = 1e-9


ANCHOR_MEMORY = 600.0  # seconds an absent anchor still anchors the network (a restart, a blip)


@dataclass(frozen=True)
class ReputationPolicy:
    """How reputation is earned and lost.

    Rules: establish_after >= 1; min_reputation in (0, 1]; weights are four finite numbers >= 0
    (correctness, timeliness, speed, uptime) summing to 1; earn_rate, invalid_penalty,
    late_penalty, crash_penalty and initial in (0, 1]; uptime_halflife finite and > 0;
    initial * (1 - invalid_penalty) < min_reputation, so that one wrong result always takes an
    untrusted worker out of routing.
    """

    establish_after: int = 20  # consecutive validated results before a record is established
    min_reputation: float = 0.5  # below this a worker receives no routed work (spot checks only)
    weights: tuple[float, float, float, float] = (0.5, 0.2, 0.15, 0.15)  # c, t, s, u
    earn_rate: float = 0.05  # r in c <- c + r*c*(1-c) and t <- t + r*(1-t)
    invalid_penalty: float = 0.5  # a wrong result: c <- min(c, initial) * (1 - invalid_penalty)
    late_penalty: float = 0.1  # a late result or timeout: t <- t * (1 - late_penalty)
    crash_penalty: float = 0.2  # a crash or timeout: u <- u * (1 - crash_penalty)
    initial: float = 0.5  # a newcomer's starting value for every component
    uptime_halflife: float = 86400.0  # seconds for uptime to close half its gap to present/absent

    def __post_init__(self) -> None:
        self._check_establish_after()
        object.__setattr__(self, "weights", _checked_weights(self.weights))
        for name in ("earn_rate", "invalid_penalty", "late_penalty", "crash_penalty", "initial"):
            _check_unit_rate(name, getattr(self, name))
        _check_unit_rate("min_reputation", self.min_reputation)
        halflife = self.uptime_halflife
        if not (_is_number(halflife) and math.isfinite(halflife) and halflife > 0):
            raise ConfigError(f"ReputationPolicy.uptime_halflife={halflife!r} must be a finite number > 0")
        if self.initial * (1 - self.invalid_penalty) >= self.min_reputation:
            raise ConfigError(
                f"ReputationPolicy: initial * (1 - invalid_penalty) = {self.initial * (1 - self.invalid_penalty):g} "
                f"must be < min_reputation={self.min_reputation:g}, or a wrong result would leave a worker "
                "routable; raise invalid_penalty or min_reputation, or lower initial."
            )

    def _check_establish_after(self) -> None:
        value = self.establish_after
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"ReputationPolicy.establish_after={value!r} must be an integer >= 1")


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_unit_rate(name: str, value: object) -> None:
    """Rule: a rate is a number in (0, 1]."""
    if not (_is_number(value) and 0 < value <= 1):
        raise ConfigError(f"ReputationPolicy.{name}={value!r} must be a number in (0, 1]")


def _checked_weights(weights: object) -> tuple[float, float, float, float]:
    """Rule: four finite numbers >= 0 summing to 1 (within 1e-9). A list (from YAML) becomes a tuple."""
    try:
        values = tuple(weights)  # type: ignore[arg-type]
    except TypeError:
        raise ConfigError(f"ReputationPolicy.weights={weights!r} must be four numbers") from None
    if len(values) != 4 or not all(_is_number(w) and math.isfinite(w) and w >= 0 for w in values):
        raise ConfigError(
            f"ReputationPolicy.weights={weights!r} must be four finite numbers >= 0 "
            "(correctness, timeliness, speed, uptime)"
        )
    if abs(sum(values) - 1.0) > _WEIGHT_TOLERANCE:
        raise ConfigError(f"ReputationPolicy.weights={weights!r} sum to {sum(values):g}; they must sum to 1")
    return tuple(float(w) for w in values)  # type: ignore[return-value]


def squash_speed(relative_speed: float) -> float:
    """Map speed / median speed (>= 0) to [0, 1): rho / (1 + rho); the median worker gets 0.5."""
    if not (_is_number(relative_speed) and math.isfinite(relative_speed) and relative_speed >= 0):
        raise ConfigError(f"relative_speed={relative_speed!r} must be a finite number >= 0")
    return relative_speed / (1.0 + relative_speed)


def combined_score(
    correctness: float,
    timeliness: float,
    speed: float,
    uptime: float,
    weights: tuple[float, float, float, float],
) -> float:
    """score = min(c, G), G = prod x_i ** w_i clamped to [min, max] of the positive-weight x_i."""
    weighted = [(x, w) for x, w in zip((correctness, timeliness, speed, uptime), weights) if w > 0]
    values = [x for x, _ in weighted]
    if min(values) <= 0.0:
        geometric = 0.0  # x ** w with x == 0 is 0; log() would fail
    else:
        geometric = math.exp(sum(w * math.log(x) for x, w in weighted))
    # The weighted mean lies in [min, max] mathematically; clamping removes float drift, so that
    # equal components (a newcomer) give exactly that value.
    geometric = min(max(geometric, min(values)), max(values))
    return min(correctness, geometric)


@dataclass(frozen=True)
class WorkerRecord:
    """Immutable snapshot of one worker's reputation.

    Rules: components in [0, 1]; counters >= 0; `established` is trusted or consecutive_valid >=
    policy.establish_after; `score` is `combined_score` of the components under policy.weights.
    """

    worker: str
    owner: str = ""
    trusted: bool = False  # operator-marked pre-trusted peer
    consecutive_valid: int = 0  # reset to 0 by invalid, timeout or crash
    validated: int = 0
    invalid: int = 0
    late: int = 0
    timeouts: int = 0
    crashes: int = 0
    correctness: float = 0.5
    timeliness: float = 0.5
    speed: float = 0.5
    uptime: float = 0.5
    present: bool = True  # joined and neither left nor crashed since; drives the uptime integral
    updated_at: float | None = None  # `now` of the last time-aware event; None until one is seen
    late_pending: tuple[str, ...] = ()  # cause_ids reported late and still awaiting a verdict
    policy: ReputationPolicy = field(default=ReputationPolicy(), repr=False)

    @property
    def established(self) -> bool:
        """Trusted, or at least policy.establish_after consecutive validated results."""
        return self.trusted or self.consecutive_valid >= self.policy.establish_after

    @property
    def score(self) -> float:
        """min(correctness, weighted geometric mean of the four components), in [0, 1]."""
        return combined_score(self.correctness, self.timeliness, self.speed, self.uptime, self.policy.weights)

    @property
    def routable(self) -> bool:
        """Trusted, or score >= policy.min_reputation."""
        return self.trusted or self.score >= self.policy.min_reputation


@dataclass(frozen=True)
class ReputationChange:
    """One event's effect on a worker's score, for Dask events, the dashboard and the ledger.

    cause is one of: joined, trusted, untrusted, validated, invalid, late, timeout, crash.
    cause_id names the task or check that caused it ("" for joined/trusted/untrusted).
    """

    worker: str
    cause: str
    before: float
    after: float
    cause_id: str = ""


_STATE_FIELDS = (
    "owner", "trusted", "consecutive_valid", "validated", "invalid", "late", "timeouts", "crashes",
    "correctness", "timeliness", "speed", "uptime", "present", "updated_at", "late_pending",
)  # fmt: skip
_COUNTERS = ("consecutive_valid", "validated", "invalid", "late", "timeouts", "crashes")
_COMPONENTS = ("correctness", "timeliness", "speed", "uptime")


class Reputation:
    """Every worker's `WorkerRecord`, updated by events. See the module docstring for the formula."""

    def __init__(self, policy: ReputationPolicy = ReputationPolicy()):
        self.policy = policy
        self._records: dict[str, WorkerRecord] = {}

    # ---- membership -------------------------------------------------------------------------

    def join(self, worker: str, owner: str = "", trusted: bool = False, now: float | None = None) -> ReputationChange:
        """Add a newcomer, or bring back a known worker with its record (uptime decayed while away).

        A non-empty `owner` replaces the recorded one; trusted=True marks the worker trusted,
        trusted=False leaves an existing mark alone (use `mark_trusted(w, False)` to clear it).
        `now` None starts the uptime clock at the next event that carries a time.
        """
        before = self._get(worker).score
        rec = self._advance(self._get(worker), now)
        rec = replace(rec, present=True, owner=owner or rec.owner, trusted=rec.trusted or trusted)
        return self._commit(rec, "joined", before, "")

    def leave(self, worker: str, now: float) -> None:
        """Mark a worker absent (uptime now decays toward 0). The record is kept for a rejoin."""
        rec = self._advance(self._get(worker), now)
        self._records[worker] = replace(rec, present=False)

    def all_absent(self, now: float) -> None:
        """A restarted scheduler has seen nobody yet: every record is absent since its last event
        (`now` for a record that has none), until its worker joins again."""
        for worker, rec in self._records.items():
            if rec.present:
                self._records[worker] = replace(rec, present=False, updated_at=rec.updated_at or float(now))

    def mark_trusted(self, worker: str, trusted: bool = True) -> ReputationChange:
        """Operator (un)marks a pre-trusted peer. The score is unchanged; routing and establishment are."""
        rec = self._get(worker)
        return self._commit(replace(rec, trusted=trusted), "trusted" if trusted else "untrusted", rec.score, "")

    # ---- results ------------------------------------------------------------------------------

    def validated(self, worker: str, cause_id: str, now: float) -> ReputationChange:
        """A correct result: streak +1, c <- c + r*c*(1-c); t <- t + r*(1-t) unless reported late."""
        rec = self._get(worker)
        before = rec.score
        rec = self._advance(rec, now)
        r = self.policy.earn_rate
        was_late = cause_id in rec.late_pending
        rec = replace(
            rec,
            validated=rec.validated + 1,
            consecutive_valid=rec.consecutive_valid + 1,
            correctness=_unit(rec.correctness + r * rec.correctness * (1 - rec.correctness)),
            timeliness=rec.timeliness if was_late else _unit(rec.timeliness + r * (1 - rec.timeliness)),
            late_pending=_without(rec.late_pending, cause_id),
        )
        return self._commit(rec, "validated", before, cause_id)

    def invalid(self, worker: str, cause_id: str, now: float) -> ReputationChange:
        """A wrong result: streak reset to 0, c <- min(c, initial) * (1 - invalid_penalty)."""
        rec = self._get(worker)
        before = rec.score
        rec = self._advance(rec, now)
        rec = replace(
            rec,
            invalid=rec.invalid + 1,
            consecutive_valid=0,
            correctness=_unit(min(rec.correctness, self.policy.initial) * (1 - self.policy.invalid_penalty)),
            late_pending=_without(rec.late_pending, cause_id),
        )
        return self._commit(rec, "invalid", before, cause_id)

    def late(self, worker: str, cause_id: str, now: float) -> ReputationChange:
        """A result after its deadline: t <- t * (1 - late_penalty); the streak is kept.

        Its verdict (validated/invalid with the same cause_id) may follow; a validated late
        result then earns correctness but not timeliness.
        """
        rec = self._get(worker)
        before = rec.score
        rec = self._advance(rec, now)
        pending = (_without(rec.late_pending, cause_id) + (cause_id,))[-LATE_MEMORY:]
        rec = replace(rec, late=rec.late + 1, timeliness=self._lower_timeliness(rec), late_pending=pending)
        return self._commit(rec, "late", before, cause_id)

    def timeout(self, worker: str, cause_id: str, now: float) -> ReputationChange:
        """No answer at all: streak reset, t <- t * (1 - late_penalty), u <- u * (1 - crash_penalty)."""
        rec = self._get(worker)
        before = rec.score
        rec = self._advance(rec, now)
        rec = replace(
            rec,
            timeouts=rec.timeouts + 1,
            consecutive_valid=0,
            timeliness=self._lower_timeliness(rec),
            uptime=self._lower_uptime(rec),
        )
        return self._commit(rec, "timeout", before, cause_id)

    def crash(self, worker: str, cause_id: str, now: float) -> ReputationChange:
        """The worker died: streak reset, u <- u * (1 - crash_penalty), absent until it joins again."""
        rec = self._get(worker)
        before = rec.score
        rec = self._advance(rec, now)
        rec = replace(rec, crashes=rec.crashes + 1, consecutive_valid=0, uptime=self._lower_uptime(rec), present=False)
        return self._commit(rec, "crash", before, cause_id)

    def observe_speed(self, worker: str, relative_speed: float) -> None:
        """speed <- relative_speed / (1 + relative_speed), relative to the median worker (median -> 0.5)."""
        self._records[worker] = replace(self._get(worker), speed=squash_speed(relative_speed))

    # ---- queries --------------------------------------------------------------------------------

    def record(self, worker: str) -> WorkerRecord:
        """The worker's snapshot; a newcomer's (not stored) for an unknown worker."""
        _check_worker(worker)
        return self._records.get(worker) or WorkerRecord(worker, **self._newcomer())

    def score(self, worker: str) -> float:
        return self.record(worker).score

    def established(self, worker: str) -> bool:
        return self.record(worker).established

    def routable(self, worker: str) -> bool:
        """score >= min_reputation; trusted workers always."""
        return self.record(worker).routable

    def ranked(self, workers: Iterable[str]) -> list[str]:
        """Distinct workers, highest score first, ties by name."""
        return sorted(set(workers), key=lambda w: (-self.score(w), w))

    def workers(self) -> list[str]:
        """Every worker with a record, sorted."""
        return sorted(self._records)

    def anchored(self, now: float, memory: float = ANCHOR_MEMORY) -> bool:
        """Whether the network has an anchor: a trusted or established worker present now, or
        absent for less than `memory` seconds. Only a network without one may let newcomers'
        agreement decide (quorum rule 6): after a scheduler restart the first volunteers back
        are not a first start, and must wait to be checked by the anchors coming back too."""
        return any(
            r.established and (r.present or (r.updated_at is not None and now - r.updated_at < memory))
            for r in self._records.values()
        )

    def __contains__(self, worker: object) -> bool:
        return worker in self._records

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Reputation):
            return NotImplemented
        return self.policy == other.policy and self._records == other._records

    __hash__ = None  # type: ignore[assignment]  # mutable

    # ---- persistence ----------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly state (no policy: it comes from configuration on load)."""
        workers = {}
        for name in sorted(self._records):
            rec = self._records[name]
            state = {key: getattr(rec, key) for key in _STATE_FIELDS}
            state["late_pending"] = list(rec.late_pending)
            workers[name] = state
        return {"version": FORMAT_VERSION, "workers": workers}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], policy: ReputationPolicy = ReputationPolicy()) -> Reputation:
        """Rebuild from `to_dict` output; malformed data raises ConfigError naming the field."""
        if not isinstance(data, Mapping) or data.get("version") != FORMAT_VERSION:
            raise ConfigError(f"reputation state: expected a mapping with version {FORMAT_VERSION}")
        workers = data.get("workers")
        if not isinstance(workers, Mapping):
            raise ConfigError("reputation state: 'workers' must be a mapping of worker -> record")
        rep = cls(policy)
        for name, state in workers.items():
            _check_worker(name)
            rep._records[name] = _record_from_state(name, state, policy)
        return rep

    # ---- internals ------------------------------------------------------------------------------

    def _newcomer(self) -> dict[str, Any]:
        c0 = self.policy.initial
        return {"correctness": c0, "timeliness": c0, "speed": c0, "uptime": c0, "policy": self.policy}

    def _get(self, worker: str) -> WorkerRecord:
        # Unknown workers are newcomers: a result may arrive before its worker's join is seen.
        _check_worker(worker)
        if worker not in self._records:
            self._records[worker] = WorkerRecord(worker, **self._newcomer())
        return self._records[worker]

    def _commit(self, rec: WorkerRecord, cause: str, before: float, cause_id: str) -> ReputationChange:
        self._records[rec.worker] = rec
        return ReputationChange(rec.worker, cause, before, rec.score, cause_id)

    def _advance(self, rec: WorkerRecord, now: float | None) -> WorkerRecord:
        """Integrate presence since the last event into uptime (half-life H); time never runs back."""
        if now is None:
            return rec
        if not (_is_number(now) and math.isfinite(now)):
            raise ConfigError(f"now={now!r} must be a finite number of seconds")
        if rec.updated_at is None:
            return replace(rec, updated_at=float(now))
        elapsed = max(0.0, now - rec.updated_at)
        keep = 0.5 ** (elapsed / self.policy.uptime_halflife)
        uptime = 1 - (1 - rec.uptime) * keep if rec.present else rec.uptime * keep
        return replace(rec, uptime=_unit(uptime), updated_at=max(rec.updated_at, float(now)))

    def _lower_timeliness(self, rec: WorkerRecord) -> float:
        return _unit(rec.timeliness * (1 - self.policy.late_penalty))

    def _lower_uptime(self, rec: WorkerRecord) -> float:
        return _unit(rec.uptime * (1 - self.policy.crash_penalty))


def _unit(x: float) -> float:
    """Clamp to [0, 1]: the update rules stay inside mathematically; this guards float drift."""
    return min(1.0, max(0.0, x))


def _without(items: tuple[str, ...], item: str) -> tuple[str, ...]:
    return tuple(i for i in items if i != item)


def _check_worker(worker: object) -> None:
    if not isinstance(worker, str) or not worker:
        raise ConfigError(f"worker={worker!r} must be a non-empty string")


def _record_from_state(name: str, state: object, policy: ReputationPolicy) -> WorkerRecord:
    """Validate one persisted record: known fields only, counters ints >= 0, components in [0, 1]."""
    if not isinstance(state, Mapping):
        raise ConfigError(f"reputation state: worker {name!r} must map to a record")
    unknown = sorted(set(state) - set(_STATE_FIELDS))
    if unknown:
        raise ConfigError(f"reputation state: worker {name!r} has unknown fields {unknown}")
    for key in _COUNTERS:
        value = state.get(key, 0)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ConfigError(f"reputation state: worker {name!r} field {key!r}={value!r} must be an integer >= 0")
    for key in _COMPONENTS:
        value = state.get(key, policy.initial)
        if not (_is_number(value) and 0 <= value <= 1):
            raise ConfigError(f"reputation state: worker {name!r} field {key!r}={value!r} must be in [0, 1]")
    updated_at = state.get("updated_at")
    if updated_at is not None and not (_is_number(updated_at) and math.isfinite(updated_at)):
        raise ConfigError(f"reputation state: worker {name!r} field 'updated_at'={updated_at!r} must be a number")
    pending = state.get("late_pending", [])
    if not isinstance(pending, (list, tuple)) or not all(isinstance(p, str) for p in pending):
        raise ConfigError(f"reputation state: worker {name!r} field 'late_pending' must be a list of strings")
    return WorkerRecord(
        worker=name,
        owner=str(state.get("owner", "")),
        trusted=bool(state.get("trusted", False)),
        present=bool(state.get("present", False)),
        updated_at=None if updated_at is None else float(updated_at),
        late_pending=tuple(pending)[-LATE_MEMORY:],
        policy=policy,
        **{key: int(state.get(key, 0)) for key in _COUNTERS},
        **{key: float(state.get(key, policy.initial)) for key in _COMPONENTS},
    )
