"""What each operation a worker or client may send must look like: plain data, every field typed
and bounded, checked before the handler runs. Pure: no Dask.

A message from a peer reaches a handler as keyword arguments decoded from msgpack (by
plain_wire.py on a hardened network): strings, integers, floats, booleans, None, bytes, tuples
and maps. A schema says, for one operation, which fields it takes (an unknown field is refused,
not ignored), of what type, and how large each may be: strings and byte strings by length,
numbers by range (bool is never an integer, floats must be finite), lists by count, maps by
count and key type, and fields whose content distributed owns (a worker's metrics, its host
information) by depth and size. Each operation also has a rate class (RATE_CLASSES): how often
one peer may use it per minute, enforced by guards.py before the work.

`check(op, msg)` raises SchemaError naming the field and what is wrong; an operation without a
schema is not checked here (only the operator and the scheduler may use those, roles.py).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from neuro_dask.errors import NeuroDaskError

# Sizes shared by the schemas below (docs/security.md lists them).
MAX_ID = 128  # request, call, batch, cause ids
MAX_NAME = 64  # worker, account, channel names (certificate names are 1-64 characters)
MAX_MODEL = 256  # model ids (architecture-hash) and channel names
MAX_ADDRESS = 256  # tcp://host:port, tls://[v6]:port
MAX_TEXT = 2_000  # free text: reasons, messages
MAX_URL = 4_096
MAX_EXPERTS = 1 << 20  # (layer, expert) pairs in one report: far above any model (DeepSeek: 61 x 256)
MAX_LIST = 10_000  # entries of one report (outcomes, calls, load)
MAX_RECEIPTS = 4_096  # cumulative receipts in one report (one per worker and request)
MAX_OPAQUE_ITEMS = 20_000  # scalars in a field whose content distributed owns
MAX_DEPTH = 12


class SchemaError(NeuroDaskError):
    """A peer's message does not have the shape its operation takes."""

    def __init__(self, op: str, path: str, why: str):
        self.op, self.path, self.why = op, path, why
        self.detail = f"{path or 'the message'} {why}"
        super().__init__(f"{op}: {self.detail}")


class _Invalid(Exception):
    def __init__(self, path: str, why: str):
        self.path, self.why = path, why


# ---- the schema vocabulary -----------------------------------------------------------------------


class Schema:
    def validate(self, value: Any, path: str) -> None:  # pragma: no cover - abstract
        raise NotImplementedError


@dataclass(frozen=True)
class Str(Schema):
    max_len: int = MAX_TEXT
    pattern: str | None = None
    choices: tuple[str, ...] = ()

    def validate(self, value: Any, path: str) -> None:
        if not isinstance(value, str):
            raise _Invalid(path, f"must be a string, not {type(value).__name__}")
        if len(value) > self.max_len:
            raise _Invalid(path, f"is {len(value)} characters long; the limit is {self.max_len}")
        if self.choices and value not in self.choices:
            raise _Invalid(path, f"must be one of {', '.join(self.choices)}")
        if self.pattern is not None and not re.fullmatch(self.pattern, value):
            raise _Invalid(path, f"must match {self.pattern}")


@dataclass(frozen=True)
class Int(Schema):
    lo: int = 0
    hi: int = 2**62

    def validate(self, value: Any, path: str) -> None:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _Invalid(path, f"must be an integer, not {type(value).__name__}")
        if not self.lo <= value <= self.hi:
            raise _Invalid(path, f"must lie in [{self.lo}, {self.hi}]")


@dataclass(frozen=True)
class Num(Schema):
    lo: float = 0.0
    hi: float = 1e18

    def validate(self, value: Any, path: str) -> None:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _Invalid(path, f"must be a number, not {type(value).__name__}")
        if not math.isfinite(value) or not self.lo <= value <= self.hi:
            raise _Invalid(path, f"must be a finite number in [{self.lo}, {self.hi}]")


@dataclass(frozen=True)
class Bool(Schema):
    def validate(self, value: Any, path: str) -> None:
        if not isinstance(value, bool):
            raise _Invalid(path, f"must be true or false, not {type(value).__name__}")


@dataclass(frozen=True)
class Bytes(Schema):
    max_len: int = 1 << 30

    def validate(self, value: Any, path: str) -> None:
        if not isinstance(value, (bytes, bytearray, memoryview)):
            raise _Invalid(path, f"must be bytes, not {type(value).__name__}")
        if len(value) > self.max_len:
            raise _Invalid(path, f"is {len(value)} bytes; the limit is {self.max_len}")


@dataclass(frozen=True)
class Maybe(Schema):
    inner: Schema

    def validate(self, value: Any, path: str) -> None:
        if value is not None:
            self.inner.validate(value, path)


@dataclass(frozen=True)
class ListOf(Schema):
    item: Schema
    max_len: int = MAX_LIST

    def validate(self, value: Any, path: str) -> None:
        if not isinstance(value, (list, tuple)):
            raise _Invalid(path, f"must be a list, not {type(value).__name__}")
        if len(value) > self.max_len:
            raise _Invalid(path, f"has {len(value)} entries; the limit is {self.max_len}")
        for i, item in enumerate(value):
            self.item.validate(item, f"{path}[{i}]")


@dataclass(frozen=True)
class Row(Schema):
    """A fixed-length list of positional fields, e.g. [layer, expert]."""

    items: tuple[Schema, ...]

    def validate(self, value: Any, path: str) -> None:
        if not isinstance(value, (list, tuple)) or len(value) != len(self.items):
            raise _Invalid(path, f"must be a list of {len(self.items)} fields")
        for i, (item, schema) in enumerate(zip(value, self.items)):
            schema.validate(item, f"{path}[{i}]")


@dataclass(frozen=True)
class MapOf(Schema):
    key: Schema
    value: Schema
    max_len: int = MAX_LIST

    def validate(self, value: Any, path: str) -> None:
        if not isinstance(value, Mapping):
            raise _Invalid(path, f"must be a map, not {type(value).__name__}")
        if len(value) > self.max_len:
            raise _Invalid(path, f"has {len(value)} entries; the limit is {self.max_len}")
        for k, v in value.items():
            self.key.validate(k, f"{path} key")
            self.value.validate(v, f"{path}[{k!r:.40}]")


@dataclass(frozen=True)
class Record(Schema):
    """A map with named fields: `required` must be there, `optional` may be, nothing else may
    (unless `rest` is given: then up to `max_rest` other string keys, each value of that schema)."""

    required: Mapping[str, Schema] = field(default_factory=dict)
    optional: Mapping[str, Schema] = field(default_factory=dict)
    rest: Schema | None = None
    max_rest: int = 0

    def validate(self, value: Any, path: str) -> None:
        if not isinstance(value, Mapping):
            raise _Invalid(path, f"must be a map, not {type(value).__name__}")
        others = 0
        for name in value:
            if name not in self.required and name not in self.optional:
                if self.rest is None or not isinstance(name, str) or len(name) > 128:
                    raise _Invalid(_join(path, str(name)[:40]), "is not a field this message takes")
                others += 1
                if others > self.max_rest:
                    raise _Invalid(path, f"has more than {self.max_rest} fields beyond the known ones")
                self.rest.validate(value[name], _join(path, name[:40]))
        for name, schema in self.required.items():
            if name not in value:
                raise _Invalid(_join(path, name), "is missing")
            schema.validate(value[name], _join(path, name))
        for name, schema in self.optional.items():
            if name in value:
                schema.validate(value[name], _join(path, name))


@dataclass(frozen=True)
class Opaque(Schema):
    """Plain data whose meaning distributed owns (metrics, host information, versions): any mix
    of scalars, strings, bytes, lists and maps, bounded in depth and in the number of items."""

    max_items: int = MAX_OPAQUE_ITEMS
    max_depth: int = MAX_DEPTH
    max_str: int = 64 * 1024

    def validate(self, value: Any, path: str) -> None:
        budget = [self.max_items]
        self._walk(value, path, 0, budget)

    def _walk(self, value: Any, path: str, depth: int, budget: list[int]) -> None:
        budget[0] -= 1
        if budget[0] < 0:
            raise _Invalid(path, f"holds more than {self.max_items} items")
        if depth > self.max_depth:
            raise _Invalid(path, f"nests deeper than {self.max_depth}")
        if value is None or isinstance(value, (bool, int)):
            return
        if isinstance(value, float):
            return
        if isinstance(value, (str, bytes, bytearray, memoryview)):
            if len(value) > self.max_str:
                raise _Invalid(path, f"holds a string of {len(value)} characters; the limit is {self.max_str}")
            return
        if isinstance(value, (list, tuple, set, frozenset)):
            for item in value:
                self._walk(item, path, depth + 1, budget)
            return
        if isinstance(value, Mapping):
            for k, v in value.items():
                self._walk(k, path, depth + 1, budget)
                self._walk(v, path, depth + 1, budget)
            return
        raise _Invalid(path, f"holds a {type(value).__name__}, which is not plain data")


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


# ---- the fields the schemas share ----------------------------------------------------------------

ID = Str(MAX_ID, r"[A-Za-z0-9._:-]*")
NAME = Str(MAX_NAME, r"[A-Za-z0-9._@-]*")
MODEL = Str(MAX_MODEL, r"[A-Za-z0-9._:/-]+")
CHANNEL = Str(MAX_MODEL, r"[A-Za-z0-9._-]+")
ADDRESS = Str(MAX_ADDRESS, r"[a-z]+://[^\s]+")
LAYER = Int(0, 1 << 16)
EXPERT = Int(0, 1 << 20)
PAIR = Row((LAYER, EXPERT))
PAIRS = ListOf(PAIR, MAX_EXPERTS)
ROWS = Int(0, 1 << 40)
PRECISIONS = ("float32", "bfloat16", "float16", "int8", "int4", "auto")
WIRE_DTYPES = ("float32", "float16", "bfloat16")
TIERS = ("standard", "private")
STIMULUS = Str(MAX_ID * 4)
WORKER_STATES = ("init", "starting", "running", "paused", "closing", "closing_gracefully", "closed", "failed")

# A worker's metrics, as distributed's scheduler reads them on every registration and heartbeat
# (a key missing there breaks its memory manager for good). Hardened workers run no Dask tasks:
# guards.py empties what only tasks fill (per-peer bandwidths, fine performance digests) before
# this check, so those maps cannot grow the scheduler's state either.
NUMBER = Num(-1e18, 1e18)
METRICS = Record(
    required={
        "memory": Int(0, 1 << 60),
        "cpu": Num(0, 1e6),
        "managed_bytes": Int(0, 1 << 60),
        "spilled_bytes": Record({"memory": Int(0, 1 << 60), "disk": Int(0, 1 << 60)}),
        "bandwidth": Record(
            {"total": Num(0, 1e15), "workers": MapOf(Str(1), NUMBER, 0), "types": MapOf(Str(1), NUMBER, 0)}
        ),
        "digests_total_since_heartbeat": MapOf(Str(1), NUMBER, 0),
        "time": Num(0, 1e11),
    },
    optional={
        "task_counts": MapOf(Str(64), Int(0, 1 << 40), 32),
        "event_loop_interval": Num(0, 1e6),
        "transfer": MapOf(Str(64), NUMBER, 16),
        "num_fds": Int(0, 1 << 31),
        "host_net_io": MapOf(Str(64), NUMBER, 8),
        "host_disk_io": MapOf(Str(64), NUMBER, 8),
    },
    rest=Opaque(max_items=2_000, max_depth=4, max_str=4_096),
    max_rest=64,
)
HOST_INFO = MapOf(Str(64), Opaque(max_items=64, max_depth=3, max_str=1_024), 32)

# A signed receipt, as neuro_dask/trust/receipts.py writes it (that module checks it in full;
# this bounds its size before the work).
RECEIPT = MapOf(Str(32), Opaque(max_items=8_300, max_depth=3, max_str=512), max_len=32)
TICKET = MapOf(Str(32), Opaque(max_items=64, max_depth=2, max_str=512), max_len=32)

_EXPERT_CALL = dict(
    required={
        "model": MODEL,
        "layer": LAYER,
        "experts": ListOf(EXPERT, 4096),
        "counts": ListOf(ROWS, 4096),
        "data": Bytes(),
    },
    optional={"call": ID, "request": ID, "ticket": Maybe(TICKET)},
)

# op -> schema of its keyword arguments. Scheduler and worker operations share one namespace:
# their names do not collide (neuro_expert lives on workers, neuro_routes on the scheduler).
SCHEMAS: dict[str, Record] = {
    # ---- scheduler, clients
    "neuro_routes": Record({"model": MODEL}),
    "neuro_channels": Record(),
    "neuro_ledger_report": Record(),
    "neuro_request_begin": Record(
        {"model": MODEL},
        {"request": ID, "account": NAME, "expert_tokens": Int(0, 1 << 40), "tier": Str(16, choices=TIERS)},
    ),
    "neuro_request_end": Record({"request": ID}),
    "neuro_report_outcomes": Record(
        {"model": MODEL, "outcomes": ListOf(Row((ADDRESS, Str(16), ID, Int(-1, 1 << 16), Int(-1, 1 << 20), ROWS, ID)))},
        {"receipts": ListOf(RECEIPT, MAX_RECEIPTS), "batch": ID},
    ),
    "neuro_report_load": Record({"model": MODEL, "load": ListOf(Row((LAYER, EXPERT, Num(0, 1e12))), MAX_EXPERTS)}),
    "neuro_report_calls": Record(
        {"model": MODEL, "calls": ListOf(Opaque(max_items=256, max_depth=3), 1_000)}, {"transport": Str(32)}
    ),
    "neuro_unreachable": Record({"worker": ADDRESS, "model": MODEL, "experts": ListOf(PAIR, 4096)}),
    "neuro_dispute": Record(
        {"model": MODEL, "evidence": MapOf(Str(32), Opaque(max_items=10_000, max_depth=4, max_str=1 << 30), max_len=16)}
    ),
    "register-client": Record({"client": Str(MAX_ID * 2), "versions": Opaque()}),
    "identity": Record(optional={"n_workers": Int(-1, 1 << 30)}),
    "versions": Record(optional={"packages": Maybe(ListOf(Str(64), 64))}),
    "echo": Record(optional={"data": Opaque(max_items=1_000, max_str=1 << 20)}),
    # ---- scheduler, workers (speaking for themselves: guards.py checks the named worker)
    "register-worker": Record(
        {
            "address": ADDRESS,
            "status": Str(32, choices=WORKER_STATES),
            "server_id": ID,
            "nthreads": Int(1, 4096),
            "name": Opaque(max_items=1, max_str=MAX_NAME),
            "now": Num(0, 1e11),
            "resources": MapOf(Str(64), Num(0, 1e12), 64),
            "memory_limit": Maybe(Int(0, 1 << 60)),
            "metrics": METRICS,
            "services": MapOf(Str(64), Int(0, 65535), 64),
            "local_directory": Str(MAX_URL),
            "versions": Opaque(),
            "nanny": Maybe(Str(MAX_ADDRESS)),
            "extra": Opaque(),
            "stimulus_id": STIMULUS,
        },
        {"resolve_address": Bool(), "host_info": Maybe(HOST_INFO), "pid": Int(0, 1 << 31)},
    ),
    "heartbeat_worker": Record(
        {"address": ADDRESS, "metrics": METRICS},
        {
            "resolve_address": Bool(),
            "now": Maybe(Num(0, 1e11)),
            "resources": Maybe(MapOf(Str(64), Num(0, 1e12), 64)),
            "host_info": Maybe(HOST_INFO),
            "executing": Maybe(MapOf(Str(MAX_ID * 2), Num(0, 1e11), 0)),
            "extensions": Maybe(MapOf(Str(64), Opaque(), 0)),
        },
    ),
    "unregister": Record({"address": ADDRESS, "stimulus_id": STIMULUS}, {"expected": Bool(), "close": Bool()}),
    "register_nanny": Record({"address": ADDRESS}),
    "log_event": Record({"topic": Str(MAX_MODEL), "msg": Opaque(max_items=2_000)}),
    "neuro_experts_loaded": Record(
        {
            "worker": ADDRESS,
            "model": MODEL,
            "loaded": PAIRS,
            "failed": ListOf(Row((LAYER, EXPERT, Str(MAX_TEXT))), 4096),
        },
        {"precision": Str(16, choices=PRECISIONS)},
    ),
    "neuro_pause": Record({"worker": ADDRESS, "paused": Bool()}, {"reason": Str(MAX_TEXT)}),
    "neuro_volunteer": Record({"worker": Str(MAX_ADDRESS)}),
    # ---- workers, clients
    "neuro_expert": Record(
        {**_EXPERT_CALL["required"], "dtype": Str(16, choices=WIRE_DTYPES), "hidden": Int(1, 1 << 18)},
        _EXPERT_CALL["optional"],
    ),
    "neuro_expert_share": Record(
        {
            **_EXPERT_CALL["required"],
            "step": Str(16, choices=("gate_up", "down")),
            "frac_bits": Int(0, 30),
            "width": Int(1, 1 << 20),
        },
        _EXPERT_CALL["optional"],
    ),
    "neuro_cancel": Record({"calls": ListOf(ID, 1_000)}),
    "neuro_status": Record(),
    "ping": Record(),
    # ---- nannies
    "close_gracefully": Record(optional={"reason": Str(MAX_TEXT)}),
}

# Stream operations a worker or client may send, keyed "stream:<op>" (their arguments without
# the stream's own `worker`/`client` field, which the scheduler sets).
STREAM_SCHEMAS: dict[str, Record] = {
    "heartbeat-client": Record(),
    "close-client": Record(optional={"stimulus_id": Maybe(STIMULUS)}),
    "client-releases-keys": Record(
        {"keys": ListOf(Opaque(max_items=16, max_depth=3, max_str=MAX_ID * 4), MAX_LIST)},
        {"stimulus_id": Maybe(STIMULUS)},
    ),
    "keep-alive": Record(),
    "log-event": Record({"topic": Str(MAX_MODEL), "msg": Opaque(max_items=2_000)}),
    # A worker's own status (the stream's worker, never another): the states a worker moves through.
    "worker-status-change": Record({"status": Str(32, choices=WORKER_STATES), "stimulus_id": STIMULUS}),
}

# Requests per minute one peer may make, per class of operation (guards.py's token buckets).
# `requests` follows neuro.security.requests-per-minute; the others are multiples of it or fixed.
RATE_CLASSES: dict[str, str] = {
    "register-client": "requests",
    "neuro_request_begin": "requests",
    "neuro_publish": "requests",
    "neuro_dispute": "disputes",
    "neuro_unreachable": "reports",
    "neuro_report_outcomes": "reports",
    "neuro_report_load": "reports",
    "neuro_report_calls": "reports",
    "neuro_request_end": "requests",
}
DEFAULT_RATE_CLASS = "control"


def check(op: str, msg: Mapping[str, Any], *, stream: bool = False) -> None:
    """Refuse `msg` unless it has `op`'s shape (SchemaError naming the field); ops without a schema pass."""
    schema = (STREAM_SCHEMAS if stream else SCHEMAS).get(op)
    if schema is None:
        return
    try:
        schema.validate(msg, "")
    except _Invalid as bad:
        raise SchemaError(op, bad.path, bad.why) from None


def has_schema(op: str, *, stream: bool = False) -> bool:
    return op in (STREAM_SCHEMAS if stream else SCHEMAS)


def rate_class(op: str) -> str:
    return RATE_CLASSES.get(op, DEFAULT_RATE_CLASS)
