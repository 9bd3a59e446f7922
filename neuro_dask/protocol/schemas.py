"""What each operation a worker or client may send must look like: plain data, every field typed
and bounded, checked before the handler runs. Pure: no Dask.

neuro_dask's own operations are typed messages (messages.py: one frozen dataclass per
operation, whose `from_msg` checks the same shape on the receiving end); this module adds the
shapes of Dask's operations that a worker or client may send (registration, heartbeats, stream
operations), so that a hardened network checks every one of them before its handler runs
(guards.py). Each operation also has a rate class (RATE_CLASSES): how often one peer may use it
per minute, enforced by guards.py before the work.

`check(op, msg)` raises SchemaError naming the field and what is wrong; an operation without a
schema is not checked here (only the operator and the scheduler may use those, roles.py).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from neuro_dask.protocol.messages import MESSAGES, TICKET
from neuro_dask.protocol.shapes import (
    ADDRESS,
    EXPERT,
    ID,
    LAYER,
    MAX_ADDRESS,
    MAX_ID,
    MAX_LIST,
    MAX_MODEL,
    MAX_NAME,
    MAX_TEXT,
    MAX_URL,
    MODEL,
    ROWS,
    STIMULUS,
    WIRE_DTYPES,
    WORKER_STATES,
    Bool,
    Bytes,
    Int,
    ListOf,
    MapOf,
    Maybe,
    Num,
    Opaque,
    Record,
    SchemaError,
    Str,
    validate,
)

__all__ = ["SCHEMAS", "STREAM_SCHEMAS", "RATE_CLASSES", "SchemaError", "check", "has_schema", "rate_class"]

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
# The expert calls' typed codec is protocol/wire.py (a tensor frame: not a plain message).
SCHEMAS: dict[str, Record] = {
    # ---- scheduler, clients
    "neuro_channels": Record(),
    "neuro_ledger_report": Record(),
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
    "ping": Record(),
    # ---- nannies
    "close_gracefully": Record(optional={"reason": Str(MAX_TEXT)}),
    # ---- neuro_dask's own messages: each one's schema is its class's (messages.py)
    **{m.OP: m.SCHEMA for m in MESSAGES},
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
    "neuro_report_passes": "reports",
    "neuro_request_end": "requests",
}
DEFAULT_RATE_CLASS = "control"


def check(op: str, msg: Mapping[str, Any], *, stream: bool = False) -> None:
    """Refuse `msg` unless it has `op`'s shape (SchemaError naming the field); ops without a schema pass."""
    schema = (STREAM_SCHEMAS if stream else SCHEMAS).get(op)
    if schema is None:
        return
    validate(op, schema, msg)


def has_schema(op: str, *, stream: bool = False) -> bool:
    return op in (STREAM_SCHEMAS if stream else SCHEMAS)


def rate_class(op: str) -> str:
    return RATE_CLASSES.get(op, DEFAULT_RATE_CLASS)
