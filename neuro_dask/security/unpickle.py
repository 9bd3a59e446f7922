"""Restricted unpickling: a pickle may name only allow-listed globals.

A pickle is a program: each GLOBAL opcode imports a name and REDUCE calls it with arguments
the sender chose. Refusing every global outside a short allow-list of constructors that are
safe to call with any arguments (neuro_dask/security/allowlist.py) removes the code-execution
path while keeping what a neuro_dask network actually sends: task specs, numpy arrays, plain
exceptions. Pure: no distributed here; neuro_dask/security/hardening.py puts this loader
behind distributed's own `loads` functions.
"""

from __future__ import annotations

import io
import pickle
import pickletools
import types
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from neuro_dask.security.errors import PickleRefusedError

Allowed = Callable[[str, str], bool]

# Opcodes that call or build with what the pickle names.
_CALLS = frozenset({"REDUCE", "NEWOBJ", "NEWOBJ_EX", "OBJ", "INST", "BUILD"})


def calls_anything(data: bytes | bytearray | memoryview) -> bool:
    """Whether a pickle calls a global (REDUCE and friends) rather than merely naming it."""
    try:
        return any(op.name in _CALLS for op, _arg, _pos in pickletools.genops(bytes(data)))
    except Exception:  # unreadable: treat as the dangerous kind
        return True


# State may be applied only to instances. BUILD on an allow-listed *class* (or function) would
# set its attributes for the whole process: one message could break or subvert every later
# task graph (e.g. rewrite a task function's __module__ to pass the worker's task check).
_NOT_INSTANCES = (type, types.FunctionType, types.BuiltinFunctionType, types.MethodType, types.ModuleType)


class RestrictedUnpickler(pickle._Unpickler):
    """An unpickler whose find_class consults `allowed(module, name)` before importing, and
    which applies state (BUILD) to instances only.

    The pure-Python unpickler, because the C one's BUILD cannot be intercepted; what a hardened
    network pickles is small (task specs, exceptions, array headers; array data travels as
    out-of-band buffers), so the cost stays in microseconds (docs/security.md).
    """

    dispatch = dict(pickle._Unpickler.dispatch)

    def __init__(self, data, *, allowed: Allowed, buffers: Iterable[Any] | None = None, peer: str | None = None,
                 named_only: Allowed | None = None, substitutes: Mapping[tuple[str, str], Any] | None = None):
        super().__init__(io.BytesIO(data), buffers=buffers)
        self._data = data
        self._substitutes = substitutes or {}
        self._allowed = allowed
        self._named_only = named_only
        self._peer = peer

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self._substitutes:
            return self._substitutes[module, name]
        if self._allowed(module, name):
            return super().find_class(module, name)
        # Some types may be *named* (distributed pickles `type(x)` alone, e.g. bytes) but never
        # called: bytes(10**11) would be a memory bomb.
        if self._named_only is not None and self._named_only(module, name) and not calls_anything(self._data):
            return super().find_class(module, name)
        raise PickleRefusedError(module, name, self._peer)

    def load_build(self) -> None:
        target = self.stack[-2] if len(self.stack) > 1 else None  # [..., target, state]
        if isinstance(target, _NOT_INSTANCES):
            raise PickleRefusedError(getattr(target, "__module__", None) or "?",
                                     f"{getattr(target, '__qualname__', type(target).__name__)} (state applied to it)",
                                     self._peer)
        super().load_build()

    dispatch[pickle.BUILD[0]] = load_build

    def persistent_load(self, pid: Any) -> Any:
        # Persistent ids reach into the loader's own world (torch uses them for storages):
        # nothing a peer sends has a reason to use them.
        raise PickleRefusedError("<persistent id>", repr(pid)[:80], self._peer)


def restricted_loads(data: bytes | bytearray | memoryview, *, allowed: Allowed, buffers: Iterable[Any] | None = None,
                     peer: str | None = None, named_only: Allowed | None = None,
                     substitutes: Mapping[tuple[str, str], Any] | None = None) -> Any:
    """pickle.loads with an allow-list; raises PickleRefusedError naming the first refused global.

    `named_only` globals load only from a pickle that calls nothing (a bare type reference)."""
    return RestrictedUnpickler(data, allowed=allowed, buffers=buffers or (), peer=peer, named_only=named_only,
                               substitutes=substitutes).load()


def globals_named(data: bytes | bytearray | memoryview, buffers: Iterable[Any] | None = None) -> list[tuple[str, str]]:
    """Every global a pickle imports, in order, found by loading it with a recording loader.

    For audits and tests only: it *does* load the pickle, so never call it on untrusted bytes.
    """
    seen: list[tuple[str, str]] = []

    def record(module: str, name: str) -> bool:
        seen.append((module, name))
        return True

    restricted_loads(data, allowed=record, buffers=buffers)
    return seen
