"""Every neuro_dask operation a client or worker sends, as a frozen dataclass both ends use. Pure: no Dask.

The sender builds the message and sends it (`await Routes(model).send(client.scheduler)`); the
receiving handler is registered through `receiver(Message, method)`, which reads the keyword
arguments Dask delivers with `Message.from_msg` (the message's SCHEMA checked in full: an
unknown field, a wrong type or an out-of-bounds value is refused with a reply that names it)
before the method sees a typed message. A hardened network checks the same SCHEMA once more
before that, in its guards (security/guards.py, through schemas.py, which derives its table
from MESSAGES), so that a refused message is also counted against the peer.

Scheduler operations (clients): Routes, RequestBegin, RequestEnd, ReportOutcomes, ReportLoad,
ReportCalls, ReportPasses, Unreachable, Dispute. Scheduler operations (workers, for themselves):
ExpertsLoaded, Pause; VolunteerStatus (a worker or the operator). Worker operations (clients):
Cancel, WorkerStatus. The expert calls themselves (neuro_expert, neuro_expert_share) carry a
tensor frame: protocol/wire.py is their codec on both ends, and schemas.py holds their shape.

Rows inside a report keep their own records (records.py): a malformed OutcomeReport or
CallReport row is dropped from its batch, not the batch, so one bad row from an older client
costs only that row.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from typing import Any, ClassVar

from neuro_dask.protocol.records import MAX_PATHS, CallReport, OutcomeReport, PassReport, PathReport, RecordError
from neuro_dask.protocol.shapes import (
    ADDRESS,
    EXPERT,
    ID,
    LAYER,
    MAX_EXPERTS,
    MAX_RECEIPTS,
    MAX_TEXT,
    MODEL,
    NAME,
    PAIR,
    PAIRS,
    PRECISIONS,
    ROWS,
    TIERS,
    Bool,
    Int,
    ListOf,
    MapOf,
    Num,
    Opaque,
    Record,
    Row,
    SchemaError,
    Str,
    validate,
)

# A signed receipt, as neuro_dask/trust/receipts.py writes it (that module checks it in full;
# this bounds its size before the work).
RECEIPT = MapOf(Str(32), Opaque(max_items=8_300, max_depth=3, max_str=512), max_len=32)
TICKET = MapOf(Str(32), Opaque(max_items=64, max_depth=2, max_str=512), max_len=32)
OUTCOME_ROW = Row((ADDRESS, Str(16), ID, Int(-1, 1 << 16), Int(-1, 1 << 20), ROWS, ID))
LOAD_ROW = Row((LAYER, EXPERT, Num(0, 1e12)))
FAILED_ROW = Row((LAYER, EXPERT, Str(MAX_TEXT)))
EVIDENCE = MapOf(Str(32), Opaque(max_items=10_000, max_depth=4, max_str=1 << 30), max_len=16)

Pair = tuple[int, int]


class Message:
    """One operation's keyword arguments. Subclasses are frozen dataclasses with OP and SCHEMA."""

    OP: ClassVar[str]
    SCHEMA: ClassVar[Record]

    def to_msg(self) -> dict[str, Any]:
        """The keyword arguments to send: plain msgpack data (lists, not tuples; records in their
        wire form); an optional field at its default is left out, as the receiver fills it in."""
        msg = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in self.SCHEMA.optional and value == f.default:
                continue
            msg[f.name] = _plain(value)
        return msg

    @classmethod
    def from_msg(cls, msg: Mapping[str, Any]):
        """A peer's keyword arguments, checked against SCHEMA (SchemaError), as this message."""
        validate(cls.OP, cls.SCHEMA, msg)
        return cls._read(msg)

    @classmethod
    def _read(cls, msg: Mapping[str, Any]):
        """From checked data: the fields present (the rest keep their defaults)."""
        return cls(**{f.name: msg[f.name] for f in fields(cls) if f.name in msg})

    def send(self, rpc: Any):
        """The awaitable of sending this message through a Dask rpc (`client.scheduler`, a worker's pool entry)."""
        return getattr(rpc, self.OP)(**self.to_msg())


def _plain(value: Any) -> Any:
    if isinstance(value, (OutcomeReport, CallReport, PassReport, PathReport)):
        return value.to_msg()
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _pairs(raw: Any) -> tuple[Pair, ...]:
    return tuple((int(l), int(e)) for l, e in raw)


# ---- scheduler operations a client sends ---------------------------------------------------------


@dataclass(frozen=True)
class Routes(Message):
    """Which workers serve each expert of `model`, fastest first, with their standing."""

    model: str

    OP: ClassVar[str] = "neuro_routes"
    SCHEMA: ClassVar[Record] = Record({"model": MODEL})


@dataclass(frozen=True)
class RequestBegin(Message):
    """Lease the model version and (with a ledger) hold the fee; the reply names the request and its ticket.
    `request` is only a proposal: the scheduler names every request itself."""

    model: str
    account: str = ""
    expert_tokens: int = 0
    tier: str = "standard"
    request: str = ""

    OP: ClassVar[str] = "neuro_request_begin"
    SCHEMA: ClassVar[Record] = Record(
        {"model": MODEL},
        {"request": ID, "account": NAME, "expert_tokens": Int(0, 1 << 40), "tier": Str(16, choices=TIERS)},
    )


@dataclass(frozen=True)
class RequestEnd(Message):
    """The work is done: settle by the receipts presented and end the lease."""

    request: str

    OP: ClassVar[str] = "neuro_request_end"
    SCHEMA: ClassVar[Record] = Record({"request": ID})


@dataclass(frozen=True)
class ReportOutcomes(Message):
    """Workers' signed receipts, and the client's judged replies. `dropped`: rows that were not
    OutcomeReports (left out of `outcomes`, counted for the log)."""

    model: str
    outcomes: tuple[OutcomeReport, ...] = ()
    receipts: tuple[Mapping[str, Any], ...] = ()
    batch: str = ""
    dropped: int = 0

    OP: ClassVar[str] = "neuro_report_outcomes"
    SCHEMA: ClassVar[Record] = Record(
        {"model": MODEL, "outcomes": ListOf(OUTCOME_ROW)},
        {"receipts": ListOf(RECEIPT, MAX_RECEIPTS), "batch": ID},
    )

    def to_msg(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "outcomes": [o.to_msg() for o in self.outcomes],
            "receipts": list(self.receipts),
            "batch": self.batch,
        }

    @classmethod
    def _read(cls, msg: Mapping[str, Any]) -> ReportOutcomes:
        rows, dropped = _records(OutcomeReport, msg["outcomes"])
        return cls(msg["model"], rows, tuple(msg.get("receipts", ())), msg.get("batch", ""), dropped)


@dataclass(frozen=True)
class ReportLoad(Message):
    """How often the client called each expert since its last report: (layer, expert, rows)."""

    model: str
    load: tuple[tuple[int, int, float], ...]

    OP: ClassVar[str] = "neuro_report_load"
    SCHEMA: ClassVar[Record] = Record({"model": MODEL, "load": ListOf(LOAD_ROW, MAX_EXPERTS)})

    @classmethod
    def _read(cls, msg: Mapping[str, Any]) -> ReportLoad:
        return cls(msg["model"], tuple((int(l), int(e), float(n)) for l, e, n in msg["load"]))


@dataclass(frozen=True)
class ReportCalls(Message):
    """Layer calls for the dashboard's call stream, and how this client reaches the workers it
    called (`paths`: PathReports; relayed workers only). `dropped`: records that were not
    CallReports or PathReports."""

    model: str
    calls: tuple[CallReport, ...]
    transport: str = ""
    paths: tuple[PathReport, ...] = ()
    dropped: int = 0

    OP: ClassVar[str] = "neuro_report_calls"
    SCHEMA: ClassVar[Record] = Record(
        {"model": MODEL, "calls": ListOf(Opaque(max_items=256, max_depth=3), 1_000)},
        {"transport": Str(32), "paths": ListOf(Opaque(max_items=4, max_depth=1, max_str=256), MAX_PATHS)},
    )

    def to_msg(self) -> dict[str, Any]:
        msg = {"model": self.model, "calls": [c.to_msg() for c in self.calls], "transport": self.transport}
        if self.paths:
            msg["paths"] = [p.to_msg() for p in self.paths]
        return msg

    @classmethod
    def _read(cls, msg: Mapping[str, Any]) -> ReportCalls:
        calls, dropped = _records(CallReport, msg["calls"])
        paths, bad_paths = _records(PathReport, msg.get("paths", ()))
        return cls(msg["model"], calls, msg.get("transport", ""), paths, dropped + bad_paths)


@dataclass(frozen=True)
class ReportPasses(Message):
    """Speculative decoding passes for the dashboard's tokens-per-pass figure. `dropped`: rows
    that were not PassReports."""

    model: str
    passes: tuple[PassReport, ...]
    dropped: int = 0

    OP: ClassVar[str] = "neuro_report_passes"
    SCHEMA: ClassVar[Record] = Record({"model": MODEL, "passes": ListOf(Opaque(max_items=8, max_depth=2), 1_000)})

    def to_msg(self) -> dict[str, Any]:
        return {"model": self.model, "passes": [p.to_msg() for p in self.passes]}

    @classmethod
    def _read(cls, msg: Mapping[str, Any]) -> ReportPasses:
        passes, dropped = _records(PassReport, msg["passes"])
        return cls(msg["model"], passes, dropped)


@dataclass(frozen=True)
class Unreachable(Message):
    """The client got no answer from `worker` for these (layer, expert) pairs: the scheduler probes it."""

    worker: str
    model: str
    experts: tuple[Pair, ...]

    OP: ClassVar[str] = "neuro_unreachable"
    SCHEMA: ClassVar[Record] = Record({"worker": ADDRESS, "model": MODEL, "experts": ListOf(PAIR, 4096)})

    @classmethod
    def _read(cls, msg: Mapping[str, Any]) -> Unreachable:
        return cls(msg["worker"], msg["model"], _pairs(msg["experts"]))


@dataclass(frozen=True)
class Dispute(Message):
    """A complaint with the worker's signed answer as evidence (trust/receipts.py reads the evidence)."""

    model: str
    evidence: Mapping[str, Any]

    OP: ClassVar[str] = "neuro_dispute"
    SCHEMA: ClassVar[Record] = Record({"model": MODEL, "evidence": EVIDENCE})


# ---- scheduler operations a worker sends for itself ---------------------------------------------


@dataclass(frozen=True)
class ExpertsLoaded(Message):
    """What a worker can serve now, what it could not load (layer, expert, why), and at what precision."""

    worker: str
    model: str
    loaded: tuple[Pair, ...]
    failed: tuple[tuple[int, int, str], ...] = ()
    precision: str = "float32"

    OP: ClassVar[str] = "neuro_experts_loaded"
    SCHEMA: ClassVar[Record] = Record(
        {"worker": ADDRESS, "model": MODEL, "loaded": PAIRS, "failed": ListOf(FAILED_ROW, 4096)},
        {"precision": Str(16, choices=PRECISIONS)},
    )

    def to_msg(self) -> dict[str, Any]:  # `failed` is required on the wire (older schedulers)
        return {**super().to_msg(), "failed": [list(f) for f in self.failed]}

    @classmethod
    def _read(cls, msg: Mapping[str, Any]) -> ExpertsLoaded:
        failed = tuple((int(l), int(e), str(why)) for l, e, why in msg["failed"])
        return cls(msg["worker"], msg["model"], _pairs(msg["loaded"]), failed, msg.get("precision", "float32"))


@dataclass(frozen=True)
class Pause(Message):
    """An idle-only worker's owner is busy (paused) or no longer is."""

    worker: str
    paused: bool
    reason: str = ""

    OP: ClassVar[str] = "neuro_pause"
    SCHEMA: ClassVar[Record] = Record({"worker": ADDRESS, "paused": Bool()}, {"reason": Str(MAX_TEXT)})


@dataclass(frozen=True)
class VolunteerStatus(Message):
    """`neuro-dask worker-status`: one worker's standing (reputation, stake, earnings), by address or name."""

    worker: str

    OP: ClassVar[str] = "neuro_volunteer"
    SCHEMA: ClassVar[Record] = Record({"worker": Str(256)})


# ---- worker operations a client sends -------------------------------------------------------------


@dataclass(frozen=True)
class Cancel(Message):
    """The client won a hedge race elsewhere: skip these calls of its own that have not started."""

    calls: tuple[str, ...]

    OP: ClassVar[str] = "neuro_cancel"
    SCHEMA: ClassVar[Record] = Record({"calls": ListOf(ID, 1_000)})

    @classmethod
    def _read(cls, msg: Mapping[str, Any]) -> Cancel:
        return cls(tuple(msg["calls"]))


@dataclass(frozen=True)
class WorkerStatus(Message):
    """What a worker hosts, at what precision, and whether its owner paused it."""

    OP: ClassVar[str] = "neuro_status"
    SCHEMA: ClassVar[Record] = Record()


MESSAGES: tuple[type[Message], ...] = (
    Routes,
    RequestBegin,
    RequestEnd,
    ReportOutcomes,
    ReportLoad,
    ReportCalls,
    ReportPasses,
    Unreachable,
    Dispute,
    ExpertsLoaded,
    Pause,
    VolunteerStatus,
    Cancel,
    WorkerStatus,
)
BY_OP: dict[str, type[Message]] = {m.OP: m for m in MESSAGES}
assert len(BY_OP) == len(MESSAGES), "two messages share an operation"


def _records(record: type, raw: list) -> tuple[tuple, int]:
    rows, dropped = [], 0
    for row in raw:
        try:
            rows.append(record.from_msg(row))
        except RecordError:
            dropped += 1
    return tuple(rows), dropped


# ---- the receiving end --------------------------------------------------------------------------


def refusal(exc: SchemaError) -> dict[str, Any]:
    """The reply to a message that is not its operation's shape: the field and why, nothing run."""
    return {"status": "error", "message": f"refused: {exc}", "field": exc.path}


def receiver(message: type[Message], method: Callable[..., Any]) -> Callable[..., Any]:
    """A Dask handler for `message.OP`: it reads the keyword arguments as `message` and calls
    `method(comm, msg)` (or `method(msg)` when the method takes no comm). A message that is not
    the operation's shape is answered with `refusal`, and the method never runs."""
    wants_comm = next(iter(inspect.signature(method).parameters), "") == "comm"
    is_async = inspect.iscoroutinefunction(method)

    def read(kwargs: dict[str, Any]):
        try:
            return message.from_msg(kwargs), None
        except SchemaError as exc:
            return None, refusal(exc)

    if is_async:

        async def handle(comm=None, **kwargs):
            msg, refused = read(kwargs)
            if refused is not None:
                return refused
            return await (method(comm, msg) if wants_comm else method(msg))

    else:

        def handle(comm=None, **kwargs):
            msg, refused = read(kwargs)
            if refused is not None:
                return refused
            return method(comm, msg) if wants_comm else method(msg)

    functools.update_wrapper(handle, method, assigned=("__module__", "__name__", "__qualname__", "__doc__"))
    del handle.__wrapped__  # Dask reads the handler's own signature: it takes the comm first
    handle.message = message  # what the guards' schema check and the role table can read
    return handle
