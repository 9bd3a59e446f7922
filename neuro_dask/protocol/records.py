"""What a client reports to the scheduler, as typed records both ends share. Pure: no Dask, no torch.

Each record has one wire form, plain msgpack data (a list of scalars), because that is what
clients have always sent and what the hardened schemas (schemas.py) check before a handler runs:

- OutcomeReport, a row of neuro_report_outcomes' `outcomes`: one judged reply,
  [worker, kind, cause_id, layer, expert, rows, request].
- CallReport, a row of neuro_report_calls' `calls`: one layer call for the dashboard,
  [layer, experts, workers, seconds, replicas, hedges, outcome, transport, rows, request]; a
  record that does not know its rows and request (older clients, the private tier) sends the
  first 8 fields only.
- PassReport, a row of neuro_report_passes' `passes`: one speculative decoding pass,
  [drafted, kept, request].
- PathReport, a row of neuro_report_calls' optional `paths`: how this client reaches a worker,
  [worker, path, rtt_ms].
- Refusal: what a worker's error answer means to a client, as a code rather than as text.

`to_msg()` gives the wire form; `from_msg(raw)` reads a peer's data, which is untrusted: every field
must be of its type and within its bounds, else RecordError (a ValueError) says which is not.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from neuro_dask.errors import NeuroDaskError

OUTCOME_KINDS = frozenset({"validated", "invalid", "late", "timeout", "error"})

# Bounds of the fields, the same as schemas.py's for these operations.
MAX_ADDRESS = 256
MAX_ID = 128
MAX_LAYER = 1 << 16
MAX_EXPERT = 1 << 20
MAX_ROWS = 1 << 40

# The dashboard keeps less of a call record than the wire allows: it shows, it does not judge.
CALL_WORKERS_KEPT = 16
CALL_WORKER_CHARS = 200
CALL_LABEL_CHARS = 16  # outcome and transport
CALL_REQUEST_CHARS = 64
CALL_MAX_ROWS = 1 << 24
CALL_MAX_COUNT = 1 << 20  # experts, replicas, hedges in one layer call
CALL_MAX_SECONDS = 86_400
PATH_KINDS = ("direct", "relayed", "punched", "lan")  # how a client reaches a worker (relay/comm.py)
MAX_PATHS = 256  # path rows in one report
PATH_MAX_MS = 600_000.0
PASS_MAX_DRAFTED = 4_096  # draft tokens one pass may verify (a tree of 2 x 64 is far below)


class RecordError(NeuroDaskError, ValueError):
    """A peer's report does not have its record's shape; the record is dropped, not the batch."""

    def __init__(self, record: str, why: str):
        self.record, self.why = record, why
        super().__init__(f"{record}: {why}")


# ---- field checks ------------------------------------------------------------------------------------


def _int(record: str, name: str, value: object, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise RecordError(record, f"{name} must be an integer in [{low}, {high}], got {str(value)[:80]!r}")
    return value


def _str(record: str, name: str, value: object, limit: int) -> str:
    if not isinstance(value, str):
        raise RecordError(record, f"{name} must be a string, got {type(value).__name__}")
    if len(value) > limit:
        raise RecordError(record, f"{name} is {len(value)} characters long; the limit is {limit}")
    return value


def _label(record: str, name: str, value: object, limit: int) -> str:
    """A free label the dashboard shows: any string, cut to `limit` characters."""
    if not isinstance(value, str):
        raise RecordError(record, f"{name} must be a string, got {type(value).__name__}")
    return value[:limit]


def _request_id(record: str, value: object, limit: int) -> str:
    """A request id as the dashboard shows and filters by it: up to `limit` of [A-Za-z0-9._:-]."""
    if (
        not isinstance(value, str)
        or len(value) > limit
        or not all(c.isascii() and (c.isalnum() or c in "._:-") for c in value)
    ):
        raise RecordError(record, f"request must be an id of up to {limit} characters, got {str(value)[:80]!r}")
    return value


def _fields(record: str, raw: object, counts: tuple[int, ...]) -> list:
    if not isinstance(raw, (list, tuple)):
        raise RecordError(record, f"must be a list, got {type(raw).__name__}")
    if len(raw) not in counts:
        raise RecordError(record, f"has {' or '.join(map(str, counts))} fields, got {len(raw)}")
    return list(raw)


# ---- the records -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class OutcomeReport:
    """One reply a client's trust layer judged, for the request it worked for."""

    worker: str  # the worker's address
    kind: str  # validated | invalid | late | timeout | error
    cause_id: str  # the judged call: a worker is credited once per cause
    layer: int  # -1: not one layer's (a late reply of an abandoned call)
    expert: int  # -1: not one expert's
    rows: int = 0  # validated: (token, expert) pairs computed
    request: str = ""

    NAME = "an outcome report"

    @classmethod
    def of(cls, outcome: Any, request: str) -> OutcomeReport:
        """From a trust Outcome (client/dispatch/trusted.py): its fields, and the request."""
        return cls(outcome.worker, outcome.kind, outcome.cause_id, outcome.layer, outcome.expert, outcome.rows, request)

    def to_msg(self) -> list:
        return [self.worker, self.kind, self.cause_id, self.layer, self.expert, self.rows, self.request]

    @classmethod
    def from_msg(cls, raw: object) -> OutcomeReport:
        worker, kind, cause_id, layer, expert, rows, request = _fields(cls.NAME, raw, (7,))
        if kind not in OUTCOME_KINDS:
            raise RecordError(cls.NAME, f"kind must be one of {', '.join(sorted(OUTCOME_KINDS))}, got {kind!r:.80}")
        return cls(
            _str(cls.NAME, "worker", worker, MAX_ADDRESS),
            kind,
            _str(cls.NAME, "cause_id", cause_id, MAX_ID),
            _int(cls.NAME, "layer", layer, -1, MAX_LAYER),
            _int(cls.NAME, "expert", expert, -1, MAX_EXPERT),
            _int(cls.NAME, "rows", rows, 0, MAX_ROWS),
            _str(cls.NAME, "request", request, MAX_ID),
        )


@dataclass(frozen=True)
class CallReport:
    """One layer call, for the dashboard's call stream. It moves no reputation and no money: a
    client that lies in one skews the dashboard's figures (calls, tokens/s, latency), nothing more."""

    layer: int
    experts: int  # experts in the layer call
    workers: tuple[str, ...]  # who answered (addresses)
    seconds: float
    replicas: int  # expert evaluations sent (1 per expert without checks)
    hedges: int
    outcome: str  # ok | retried | checked | caught | failed
    transport: str  # direct | futures | private
    rows: int = -1  # expert rows sent: tokens x experts per token (-1: not said)
    request: str = ""  # the request the call worked for ("": not said)

    NAME = "a call record"

    @property
    def says_rows(self) -> bool:
        return self.rows != -1

    def to_msg(self) -> list:
        head = [
            self.layer,
            self.experts,
            list(self.workers),
            self.seconds,
            self.replicas,
            self.hedges,
            self.outcome,
            self.transport,
        ]
        return head + [self.rows, self.request] if self.says_rows else head

    @classmethod
    def from_msg(cls, raw: object) -> CallReport:
        """The short (8-field) form reads as rows -1 and request "". What the dashboard keeps of
        free labels and worker lists is cut to its bounds; numbers out of bounds are refused."""
        fields = _fields(cls.NAME, raw, (8, 10))
        layer, experts, workers, seconds, replicas, hedges, outcome, transport = fields[:8]
        rows, request = fields[8:] if len(fields) == 10 else (-1, "")
        if not isinstance(workers, (list, tuple)) or not all(isinstance(w, str) for w in workers):
            raise RecordError(cls.NAME, "workers must be a list of strings")
        if not isinstance(seconds, (int, float)) or isinstance(seconds, bool) or not 0 <= seconds < CALL_MAX_SECONDS:
            raise RecordError(cls.NAME, f"seconds must be a number of seconds, got {str(seconds)[:80]!r}")
        name = cls.NAME
        return cls(
            _int(name, "layer", layer, -1, MAX_LAYER),
            _int(name, "experts", experts, 0, CALL_MAX_COUNT),
            tuple(w[:CALL_WORKER_CHARS] for w in workers[:CALL_WORKERS_KEPT]),
            float(seconds),
            _int(name, "replicas", replicas, 0, CALL_MAX_COUNT),
            _int(name, "hedges", hedges, 0, CALL_MAX_COUNT),
            _label(name, "outcome", outcome, CALL_LABEL_CHARS),
            _label(name, "transport", transport, CALL_LABEL_CHARS),
            _int(name, "rows", rows, -1, CALL_MAX_ROWS),
            _request_id(name, request, CALL_REQUEST_CHARS),
        )


@dataclass(frozen=True)
class PassReport:
    """One speculative decoding pass over the layers, for the dashboard: how many draft tokens it
    verified and how many it kept (it yielded kept + 1 tokens per row). It moves nothing but the
    dashboard's tokens-per-pass figure."""

    drafted: int
    kept: int
    request: str = ""

    NAME = "a pass record"

    def to_msg(self) -> list:
        return [self.drafted, self.kept, self.request]

    @classmethod
    def from_msg(cls, raw: object) -> PassReport:
        drafted, kept, request = _fields(cls.NAME, raw, (3,))
        drafted = _int(cls.NAME, "drafted", drafted, 0, PASS_MAX_DRAFTED)
        kept = _int(cls.NAME, "kept", kept, 0, drafted)
        return cls(drafted, kept, _request_id(cls.NAME, request, CALL_REQUEST_CHARS))


@dataclass(frozen=True)
class PathReport:
    """How this client reaches one worker: `direct` (the worker listens where it can dial),
    `relayed`, `punched` (through both NATs) or `lan` (one router), and the round trip it measured
    on that path (-1: not measured). For the dashboard; it moves nothing else."""

    worker: str
    path: str
    rtt_ms: float = -1.0

    NAME = "a path record"

    def to_msg(self) -> list:
        return [self.worker, self.path, self.rtt_ms]

    @classmethod
    def from_msg(cls, raw: object) -> PathReport:
        worker, path, rtt_ms = _fields(cls.NAME, raw, (3,))
        if path not in PATH_KINDS:
            raise RecordError(cls.NAME, f"path must be one of {', '.join(PATH_KINDS)}, got {str(path)[:80]!r}")
        ok = isinstance(rtt_ms, (int, float)) and not isinstance(rtt_ms, bool)
        if not ok or not (rtt_ms == -1 or 0 <= rtt_ms <= PATH_MAX_MS):
            raise RecordError(cls.NAME, f"rtt_ms must be -1 or in [0, {PATH_MAX_MS:g}], got {str(rtt_ms)[:80]!r}")
        return cls(_str(cls.NAME, "worker", worker, CALL_WORKER_CHARS), path, float(rtt_ms))


# ---- a worker's refusals -------------------------------------------------------------------------------

# The texts workers answer with, which are the wire contract: a worker's error answer is
# {"status": "error", "message": text} (protocol/wire.py's encode_error), and these mark the
# refusals a client treats as routine (its routes are merely behind the network).
PAUSED_PREFIX = "paused:"  # the owner is using the machine (idle-only workers: volunteer/idle.py)
NOT_HOSTED_MARK = "is not hosted here"  # the expert moved (runtime/expert_host.py's ExpertNotHostedError)
NO_KEY_MARK = "has no scheduler key yet"  # registered, its assignment (with the ticket key) not yet in
REFUSED_PREFIX = "worker refused the call: "  # how protocol/wire.py's decode_response words a refusal

PAUSED, NOT_HOSTED, NO_KEY, OTHER = "paused", "not-hosted", "no-key", "other"
# Routine: the refuser does no work and earns nothing for it, so a worker that lies about being
# paused, moved or keyless only loses calls; the client re-sends elsewhere without suspecting it.
ROUTINE_CODES = frozenset({PAUSED, NOT_HOSTED, NO_KEY})


@dataclass(frozen=True)
class Refusal:
    """A worker's error answer: `code` says what it means (PAUSED, NOT_HOSTED or OTHER)."""

    code: str
    message: str

    @property
    def routine(self) -> bool:
        """The network moved on (a re-placement, an idle-only pause): not a fault of the worker's."""
        return self.code in ROUTINE_CODES

    @classmethod
    def from_text(cls, message: str) -> Refusal:
        if message.startswith(PAUSED_PREFIX):
            return cls(PAUSED, message)
        if NOT_HOSTED_MARK in message:
            return cls(NOT_HOSTED, message)
        if NO_KEY_MARK in message:
            return cls(NO_KEY, message)
        return cls(OTHER, message)

    @classmethod
    def from_msg(cls, response: object) -> Refusal | None:
        """The refusal a worker's response carries; None for an answer (status OK) or for what is
        not a response at all (the caller's decoding refuses that)."""
        if not isinstance(response, Mapping) or response.get("status") == "OK":
            return None
        return cls.from_text(str(response.get("message", response.get("status"))))

    @classmethod
    def from_error(cls, exc: BaseException) -> Refusal | None:
        """The refusal behind decode_response's error for a refused call; None for other errors."""
        text = str(exc)
        return cls.from_text(text[len(REFUSED_PREFIX) :]) if text.startswith(REFUSED_PREFIX) else None
