"""The vocabulary of message shapes: what a field sent by a peer may be, checked before any
handler runs. Pure: no Dask.

A message from a peer reaches a handler as keyword arguments decoded from msgpack (by
plain_wire.py on a hardened network): strings, integers, floats, booleans, None, bytes, tuples
and maps. A shape says which fields a message takes (an unknown field is refused, not ignored),
of what type, and how large each may be: strings and byte strings by length, numbers by range
(bool is never an integer, floats must be finite), lists by count, maps by count and key type,
and fields whose content distributed owns (a worker's metrics, its host information) by depth
and size. messages.py builds neuro_dask's own messages from these; schemas.py Dask's.
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


def validate(op: str, schema: Schema, msg: Any) -> None:
    """Refuse `msg` unless it has `schema`'s shape: SchemaError names the field and what is wrong."""
    try:
        schema.validate(msg, "")
    except _Invalid as bad:
        raise SchemaError(op, bad.path, bad.why) from None
