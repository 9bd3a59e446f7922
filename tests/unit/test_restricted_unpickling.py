"""The bounded restricted unpickler (neuro_dask/security/unpickle.py with the allow-list of allowlist.py),
which on a hardened network loads pickles from scheduler and operator certificates only.

Attacks: each pickle below would run code, open a file, crash the process, or allocate or loop without
bound if plain `pickle.loads` read it; the restricted loader must refuse it before calling anything
dangerous, and the marker file each code-execution attempt aims at must never appear. The crafted
ones that crash or exhaust a process under a plain (or the previous, unbounded) loader are loaded in
a child process, which also proves that none of them imported numpy. What must still load: plain
containers, exceptions as distributed pickles them (their tracebacks dropped, not refused), a Status.
What no longer loads: numpy arrays and scalars, Dask task specs, WrappedKey, Serialize and ToPickle
(hardened networks send no task graphs and no serialized objects). Hygiene: the allow-list names
nothing that imports, runs, opens, or allocates in proportion to an argument's value, and each of its
entries exists in this environment.
"""

from __future__ import annotations

import builtins
import collections
import datetime
import functools
import importlib
import io
import json
import os
import pickle
import shlex
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import cloudpickle
import numpy as np
import pytest
import tblib.pickling_support
from dask._task_spec import DataNode, Task
from distributed.core import Status
from distributed.protocol import pickle as dpickle
from distributed.protocol.serialize import Serialize, ToPickle
from distributed.utils_comm import WrappedKey

from neuro_dask.client.dispatch.tasks import serve_expert_call
from neuro_dask.errors import ConfigFieldError, NeuroDaskError
from neuro_dask.security.allowlist import (
    ALLOWED_GLOBALS,
    BUILDABLE_CLASSES,
    NAMED_ONLY_GLOBALS,
    SUBSTITUTES,
    TASK_FUNCTIONS,
    is_allowed,
    is_named_only,
    is_task_function,
)
from neuro_dask.security.errors import PickleLimitError, PickleRefusedError, RequestRefusedError, TaskRefusedError
from neuro_dask.security.plain_wire import MAX_EQUAL_HASHES
from neuro_dask.security.unpickle import (
    MAX_HASHABLE_DEPTH,
    MAX_MEMO_ENTRIES,
    MAX_OPCODES,
    calls_anything,
    globals_named,
    restricted_loads,
)

ROOT = Path(__file__).resolve().parents[2]


def hardened(data, buffers=None, peer=None):
    """Exactly the call hardened mode makes (hardening._restricted)."""
    return restricted_loads(
        data, allowed=is_allowed, buffers=buffers, peer=peer, named_only=is_named_only, substitutes=SUBSTITUTES
    )


# ---- pickles that must be refused -----------------------------------------------------------------


class Payload:
    """Plain pickle.loads of this opens (creates) the marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


class Reduce:
    """Pickles as `fn(*args)`: whatever callable an attacker likes."""

    def __init__(self, fn, args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return (self.fn, self.args)


class Storage:
    """Pickled by persistent id (as torch pickles its storages), never by value."""


class PersistentPickler(pickle.Pickler):
    def persistent_id(self, obj):
        return f"storage-{id(obj)}" if isinstance(obj, Storage) else None


def _touch(marker) -> str:
    return f"touch {shlex.quote(str(marker))}"


def _with_persistent_id(_marker) -> bytes:
    out = io.BytesIO()
    PersistentPickler(out, protocol=5).dump([1, Storage(), 2])
    return out.getvalue()


def _raw_protocol0_global(marker) -> bytes:
    # GLOBAL os.system, REDUCE with a command: what a hand-written exploit looks like.
    return b"cos\nsystem\n(S'" + _touch(marker).encode() + b"'\ntR."


def _raw_protocol0_inst(marker) -> bytes:
    # INST builds (calls) the class named inline, without a REDUCE.
    return b"(S'" + _touch(marker).encode() + b"'\nios\nsystem\n."


def _allowed_caller_of_forbidden(marker) -> bytes:
    # tblib's unpickle_exception is allowed and calls its first argument: that argument is checked too.
    return pickle.dumps(Reduce(tblib.pickling_support.unpickle_exception, (os.system, (_touch(marker),), None, None)))


def _stack_global(module: str, name: str) -> bytes:
    """Protocol 4: push module and name, STACK_GLOBAL, call it with no arguments, STOP."""

    def text(s: str) -> bytes:
        raw = s.encode()
        return b"\x8c" + bytes([len(raw)]) + raw

    return b"\x80\x04" + text(module) + text(name) + b"\x93)R."


REFUSED = [
    # (id, pickle maker taking the marker path, refused module, refused name)
    ("open", lambda m: pickle.dumps(Payload(m)), "io", "open"),
    ("open-protocol-0", lambda m: pickle.dumps(Payload(m), protocol=0), "io", "open"),
    ("os.system", lambda m: pickle.dumps(Reduce(os.system, (_touch(m),))), os.system.__module__, "system"),
    ("builtins.eval", lambda m: pickle.dumps(Reduce(eval, (f"open({str(m)!r}, 'w').close()",))), "builtins", "eval"),
    ("builtins.exec", lambda m: pickle.dumps(Reduce(exec, (f"open({str(m)!r}, 'w').close()",))), "builtins", "exec"),
    ("builtins.getattr", lambda m: pickle.dumps(Reduce(getattr, (str(m), "upper"))), "builtins", "getattr"),
    ("builtins.__import__", lambda m: pickle.dumps(Reduce(__import__, ("os",))), "builtins", "__import__"),
    (
        "importlib.import_module",
        lambda m: pickle.dumps(Reduce(importlib.import_module, ("os",))),
        "importlib",
        "import_module",
    ),
    ("subprocess.Popen", lambda m: pickle.dumps(Reduce(subprocess.Popen, (["touch", str(m)],))), "subprocess", "Popen"),
    ("functools.partial", lambda m: pickle.dumps(functools.partial(os.system, _touch(m))), "functools", "partial"),
    (
        "cloudpickle-lambda",
        lambda m: cloudpickle.dumps(lambda: open(str(m), "w")),
        "cloudpickle.cloudpickle",
        None,
    ),  # whichever of its helpers comes first
    ("bytes-called", lambda m: pickle.dumps(Reduce(bytes, (10**6,))), "builtins", "bytes"),
    ("bytearray-called", lambda m: pickle.dumps(Reduce(bytearray, (10**6,))), "builtins", "bytearray"),
    # A bytearray *value* below protocol 5 is pickled as a call of bytearray: refused like any call.
    ("bytearray-value-protocol-4", lambda m: pickle.dumps(bytearray(b"ab"), protocol=4), "builtins", "bytearray"),
    # named_only is a property of the whole pickle: a type named next to any call is refused.
    ("bytes-named-beside-a-call", lambda m: pickle.dumps([bytes, ValueError("x")]), "builtins", "bytes"),
    ("SystemExit", lambda m: pickle.dumps(SystemExit(1)), "builtins", "SystemExit"),
    ("KeyboardInterrupt", lambda m: pickle.dumps(KeyboardInterrupt()), "builtins", "KeyboardInterrupt"),
    ("persistent-id", _with_persistent_id, "<persistent id>", None),
    ("raw-GLOBAL-os.system", _raw_protocol0_global, "os", "system"),
    ("raw-INST-os.system", _raw_protocol0_inst, "os", "system"),
    ("allowed-caller-of-os.system", _allowed_caller_of_forbidden, os.system.__module__, "system"),
    # copyreg._reconstructor (base.__new__(cls), skipping __init__) is no longer allowed at all.
    (
        "copyreg-reconstructor",
        lambda m: pickle.dumps(
            Reduce(importlib.import_module("copyreg")._reconstructor, (subprocess.Popen, object, ["touch", str(m)]))
        ),
        "copyreg",
        "_reconstructor",
    ),
    # Bytes below protocol 3 are a call of _codecs.encode, whose encoding names a codec to import.
    ("bytes-value-protocol-2", lambda m: pickle.dumps(b"\x00abc", protocol=2, fix_imports=False), "_codecs", "encode"),
    # Loops or allocates in proportion to an argument's value, not to the pickle's length.
    ("range", lambda m: pickle.dumps(range(10**12)), "builtins", "range"),
    ("deque-of-range", lambda m: pickle.dumps(Reduce(collections.deque, (range(10**12), 1))), "collections", "deque"),
    ("list-of-range", lambda m: pickle.dumps(Reduce(list, (range(10**10),))), "builtins", "range"),
    ("bytes-10**11", lambda m: pickle.dumps(Reduce(bytes, (10**11,))), "builtins", "bytes"),
    ("deque-value", lambda m: pickle.dumps(collections.deque([1, 2], maxlen=5)), "collections", "deque"),
    # numpy builds C objects from raw bytes and unvalidated state: no array, scalar or dtype loads.
    ("numpy-array", lambda m: pickle.dumps(np.arange(3)), np.arange(3).__reduce__()[0].__module__, "_reconstruct"),
    (
        "numpy-array-protocol-5",
        lambda m: dpickle.dumps(np.arange(3.0)),
        np.arange(3.0).__reduce_ex__(5)[0].__module__,
        "_frombuffer",
    ),
    ("numpy-scalar", lambda m: pickle.dumps(np.float32(1.5)), np.float32(1).__reduce__()[0].__module__, "scalar"),
    ("numpy-dtype", lambda m: pickle.dumps(np.dtype("float32")), "numpy", "dtype"),
    ("numpy-1.x-spelling", lambda m: b"\x80\x02cnumpy.core.multiarray\nscalar\n)R.", "numpy.core.multiarray", "scalar"),
    # UnicodeDecodeError's __str__ reads object[start] with an unchecked start (gh-123378).
    (
        "UnicodeDecodeError",
        lambda m: pickle.dumps(UnicodeDecodeError("utf-8", b"abc", -(10**12), -(10**12) + 1, "x")),
        "builtins",
        "UnicodeDecodeError",
    ),
    (
        "UnicodeEncodeError",
        lambda m: pickle.dumps(UnicodeEncodeError("utf-8", "abc", 0, 1, "x")),
        "builtins",
        "UnicodeEncodeError",
    ),
    # Dask task graphs and distributed's wrappers of serialized objects: no hardened network sends them.
    ("a-task-of-len", lambda m: dpickle.dumps(Task("k", len, "abc")), "dask._task_spec", "Task"),
    ("an-expert-task", lambda m: dpickle.dumps(Task("expert-3-7", serve_expert_call, b"x")), "dask._task_spec", "Task"),
    ("a-data-node", lambda m: dpickle.dumps(DataNode("d", {"a": 1})), "dask._task_spec", "DataNode"),
    ("WrappedKey", lambda m: dpickle.dumps(WrappedKey("k")), "dask._task_spec", "TaskRef"),
    ("ToPickle", lambda m: dpickle.dumps(ToPickle(1)), "distributed.protocol.serialize", "ToPickle"),
    ("Serialize", lambda m: dpickle.dumps(Serialize(1)), "distributed.protocol.serialize", "Serialize"),
    (
        "expr-reconstruct-dotted",
        lambda m: _stack_global("dask._expr", "Expr._reconstruct"),
        "dask._expr",
        "Expr._reconstruct",
    ),
    # A dotted name under an allowed module is not that module's attribute: never allowed.
    ("dotted-under-builtins", lambda m: _stack_global("builtins", "dict.fromkeys"), "builtins", "dict.fromkeys"),
    (
        "serve_expert_call-called",
        lambda m: pickle.dumps(Reduce(serve_expert_call, (b"\x80",))),
        "neuro_dask.client.dispatch.tasks",
        "serve_expert_call",
    ),
]


@pytest.mark.parametrize("make, module, name", [pytest.param(*case[1:], id=case[0]) for case in REFUSED])
def test_dangerous_pickles_are_refused_before_anything_runs(tmp_path, make, module, name):
    marker = tmp_path / "marker"
    data = make(marker)
    with pytest.raises(PickleRefusedError) as info:
        hardened(data, peer="tcp://10.0.0.7:4000")
    assert not marker.exists()
    err = info.value
    assert (err.module, err.name if name is not None else None) == (module, name)
    assert err.peer == "tcp://10.0.0.7:4000" and "tcp://10.0.0.7:4000" in str(err)
    # distributed's error paths treat these as "cannot load this payload".
    assert isinstance(err, pickle.UnpicklingError) and isinstance(err, TypeError)
    with pytest.raises(PickleRefusedError):
        hardened(bytearray(data))
    with pytest.raises(PickleRefusedError):
        hardened(memoryview(data))
    assert not marker.exists()


def test_the_open_payload_does_create_the_marker_under_plain_pickle(tmp_path):
    # The control for the test above: the marker check can fail.
    marker = tmp_path / "marker"
    pickle.loads(pickle.dumps(Payload(marker))).close()
    assert marker.exists()


# ---- crafted attacks, in a child process ----------------------------------------------------------
#
# Each of these crashes or exhausts a process under a plain loader (and most under the previous,
# allow-list-only one). A child process loads them all through the hardened loader and reports what
# happened, so a regression shows as a failed test, not as a dead test run; the child also reports
# whether numpy was ever imported (it never imports it itself).


def _body(obj) -> bytes:
    """The opcodes of one value at protocol 2, without PROTO and STOP."""
    return pickle.dumps(obj, protocol=2, fix_imports=False)[2:-1]


def _numpy_void_pickle(
    *, fields: bytes, names: tuple, flags: int, scalar_first: bool, scalar_module: str = "numpy.core.multiarray"
) -> bytes:
    """numpy.dtype('V8') with BUILD state describing the given fields and flags, then
    numpy's scalar(dtype, b'AAAAAAAA'): the scalar copies the bytes into the void's memory."""
    state = b"(K\x03" + _body("|") + b"N" + _body(names) + fields + _body(8) + b"K\x01" + _body(flags) + b"t"
    dtype = b"cnumpy\ndtype\n" + _body(("V8", False, True)) + b"R" + state + b"b"
    scalar = f"c{scalar_module}\nscalar\n".encode()
    if scalar_first:
        return b"\x80\x02" + scalar + b"(" + dtype + _body(b"AAAAAAAA") + b"tR."
    # GLOBAL numpy.dtype, REDUCE, BUILD, memoized; then GLOBAL ...scalar, REDUCE (dtype, bytes)
    return b"\x80\x02" + dtype + b"q\x00" + b"0" + scalar + b"(h\x00" + _body(b"AAAAAAAA") + b"tR."


def _object_field(name: str, offset: int) -> bytes:
    return _body(name) + _body(np.dtype("O")) + b"K" + bytes([offset]) + b"\x86s"


def _type_confusion(scalar_first: bool = False, scalar_module: str = "numpy.core.multiarray") -> bytes:
    # One object field, flags 0: numpy does not know the void holds a pointer, so scalar() copies
    # the bytes in; repr() of the value then dereferences 0x4141414141414141.
    return _numpy_void_pickle(
        fields=b"}" + _object_field("a", 0),
        names=("a",),
        flags=0,
        scalar_first=scalar_first,
        scalar_module=scalar_module,
    )


def _overlapping_fields() -> bytes:
    # Two object fields overlapping (offsets 0 and 4) and NPY_USE_GETITEM: crashes inside pickle.loads.
    return _numpy_void_pickle(
        fields=b"}" + _object_field("a", 0) + _object_field("b", 4), names=("a", "b"), flags=0x20, scalar_first=False
    )


M64 = 2**64
P1, P2, P5 = 11400714785074694791, 14029467366897019727, 2870177450012600261


@functools.lru_cache
def colliding_pairs(n: int) -> list[tuple[int, int]]:
    """n distinct (a, b) tuples of ints with one and the same hash (CPython's tuple hash is
    xxHash-like and invertible; int hashes are the ints mod 2**61 - 1)."""

    def rotl(x):
        return ((x << 31) | (x >> 33)) & (M64 - 1)

    def rotr(x):
        return ((x >> 31) | (x << 33)) & (M64 - 1)

    prime = 2**61 - 1
    target = rotr(12345 * pow(P1, -1, M64) % M64)
    inverse_p2 = pow(P2, -1, M64)
    pairs, a = [], 0
    while len(pairs) < n:
        acc = rotl((P5 + (hash(a) % M64) * P2) % M64) * P1 % M64
        lane = (target - acc) * inverse_p2 % M64
        b = lane if lane < prime else (-(M64 - lane) if M64 - lane < prime and M64 - lane != 1 else None)
        if b is not None:
            pairs.append((a, b))
        a += 1
    assert len({hash(p) for p in pairs}) == 1
    return pairs


def _setitem_one_by_one(keys) -> bytes:
    """An empty dict, then one SETITEM per key: the bound must hold across opcodes."""
    return b"\x80\x02}" + b"".join(_body(k) + b"N" + b"s" for k in keys) + b"."


def _opcodes_of(keys, *, opener: bytes, per_key: bytes, closer: bytes) -> bytes:
    """A container's pickle written opcode by opcode (building the real dict or set of colliding keys
    in this process would take as long as the attack)."""
    return b"\x80\x04" + opener + b"(" + b"".join(_body(k) + per_key for k in keys) + closer + b"."


CRASHERS = {
    # name: (pickle, expected outcome: ("refused", module, name) / ("limit", what) / ("malformed",))
    "numpy-dtype-build-type-confusion": (_type_confusion(), ("refused", "numpy", "dtype")),
    "numpy-scalar-first-type-confusion": (
        _type_confusion(scalar_first=True),
        ("refused", "numpy.core.multiarray", "scalar"),
    ),
    "numpy-2-spelling-type-confusion": (
        _type_confusion(scalar_first=True, scalar_module="numpy._core.multiarray"),
        ("refused", "numpy._core.multiarray", "scalar"),
    ),
    "numpy-overlapping-object-fields": (_overlapping_fields(), ("refused", "numpy", "dtype")),
    "deque(range(10**12), 1)": (
        pickle.dumps(Reduce(collections.deque, (range(10**12), 1))),
        ("refused", "collections", "deque"),
    ),
    "list(range(10**10))": (pickle.dumps(Reduce(list, (range(10**10),))), ("refused", "builtins", "range")),
    "bytes(10**11)": (pickle.dumps(Reduce(bytes, (10**11,))), ("refused", "builtins", "bytes")),
    "2,000,000 opcodes": (b"\x80\x05" + b"N0" * 1_000_000 + b"N.", ("limit", "opcodes")),
    "200,000 memo entries": (b"\x80\x04" + b"N\x94" * 200_000 + b".", ("limit", "memo")),
    # A million TUPLE1s: hash() of the result recurses a million times in C (a dict key here).
    "a tuple nested 900,000 deep as a dict key": (b"\x80\x02}N" + b"\x85" * 900_000 + b"Ns.", ("limit", "tuples")),
    "BYTEARRAY8 of 2**40 bytes": (b"\x80\x05\x96" + struct.pack("<Q", 2**40) + b".", ("malformed",)),
    # 20,000 distinct keys with one hash: plain pickle spends minutes comparing them.
    "dict of colliding tuples (SETITEMS)": (
        _opcodes_of(colliding_pairs(20_000), opener=b"}", per_key=b"N", closer=b"u"),
        ("limit", "hash"),
    ),
    "dict of colliding tuples (DICT)": (
        _opcodes_of(colliding_pairs(20_000), opener=b"", per_key=b"N", closer=b"d"),
        ("limit", "hash"),
    ),
    "set of colliding tuples (ADDITEMS)": (
        _opcodes_of(colliding_pairs(20_000), opener=b"\x8f", per_key=b"", closer=b"\x90"),
        ("limit", "hash"),
    ),
    "frozenset of colliding tuples": (
        _opcodes_of(colliding_pairs(20_000), opener=b"", per_key=b"", closer=b"\x91"),
        ("limit", "hash"),
    ),
    "set(list) of colliding tuples (REDUCE)": (
        pickle.dumps(Reduce(set, (colliding_pairs(20_000),)), protocol=5),
        ("limit", "hash"),
    ),
    "dict(list of pairs) of colliding keys": (
        pickle.dumps(Reduce(dict, ([(p, 0) for p in colliding_pairs(20_000)],)), protocol=5),
        ("limit", "hash"),
    ),
    "frozenset through tblib's unpickle_exception": (
        pickle.dumps(
            Reduce(tblib.pickling_support.unpickle_exception, (frozenset, (colliding_pairs(20_000),), None, None)),
            protocol=5,
        ),
        ("limit", "hash"),
    ),
    "colliding keys one SETITEM at a time": (
        _setitem_one_by_one(colliding_pairs(MAX_EQUAL_HASHES + 1)),
        ("limit", "hash"),
    ),
}

_CHILD = textwrap.dedent("""
    import json, sys, time
    from neuro_dask.security.allowlist import SUBSTITUTES, is_allowed, is_named_only
    from neuro_dask.security.errors import PickleLimitError, PickleRefusedError
    from neuro_dask.security.unpickle import restricted_loads
    import pickle
    cases = json.load(sys.stdin)
    out = {}
    for name, hexdata in cases.items():
        started = time.perf_counter()
        try:
            value = restricted_loads(bytes.fromhex(hexdata), allowed=is_allowed, named_only=is_named_only,
                                     substitutes=SUBSTITUTES)
            result = ["loaded", repr(value)[:200]]
        except PickleLimitError as exc:
            result = ["limit", exc.what]
        except PickleRefusedError as exc:
            result = ["refused", exc.module, exc.name]
        except pickle.UnpicklingError as exc:
            result = ["malformed", str(exc)[:200]]
        out[name] = result + [round(time.perf_counter() - started, 3)]
    out["numpy imported"] = "numpy" in sys.modules
    print(json.dumps(out))
""")


@pytest.fixture(scope="module")
def crashers() -> dict:
    cases = json.dumps({name: data.hex() for name, (data, _) in CRASHERS.items()})
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD], input=cases, capture_output=True, text=True, cwd=ROOT, timeout=300
    )
    assert proc.returncode == 0, f"the loader's child process died ({proc.returncode}):\n{proc.stderr[-4000:]}"
    return json.loads(proc.stdout)


@pytest.mark.parametrize("name", list(CRASHERS))
def test_crafted_crashers_and_bombs_are_refused_in_a_child_process(crashers, name):
    _data, expected = CRASHERS[name]
    outcome = crashers[name]
    if expected[0] == "limit":
        assert outcome[0] == "limit" and expected[1] in outcome[1], outcome
    elif expected[0] == "malformed":
        assert outcome[0] == "malformed", outcome
    else:
        assert outcome[:3] == list(expected), outcome


def test_no_crafted_pickle_reaches_numpy(crashers):
    assert crashers["numpy imported"] is False


def _plain_load_in_child(data: bytes, then: str = "") -> subprocess.CompletedProcess:
    code = f"import pickle, sys\nvalue = pickle.loads(sys.stdin.buffer.read())\n{then}\n"
    return subprocess.run([sys.executable, "-c", code], input=data, capture_output=True, timeout=120)


@pytest.mark.parametrize(
    "name, then", [("numpy-dtype-build-type-confusion", "repr(value)"), ("numpy-overlapping-object-fields", "")]
)
def test_the_numpy_pickles_do_crash_a_plain_loader(name, then):
    # The control for the refusals above: these are real attacks on this numpy, not malformed bytes.
    proc = _plain_load_in_child(CRASHERS[name][0], then)
    if proc.returncode >= 0:
        pytest.skip(f"this numpy ({np.__version__}) now refuses {name} cleanly: {proc.stderr[-300:]!r}")
    assert proc.returncode < 0  # killed by a signal (SIGSEGV)


def test_colliding_keys_are_what_make_a_plain_load_slow():
    # Calibrates the hash-flooding cases: the keys really share one hash, and honest keys do not.
    pairs = colliding_pairs(100)
    assert len(set(pairs)) == 100 and len({hash(p) for p in pairs}) == 1
    honest = {(f"x-{i}", i): i for i in range(1000)}
    assert hardened(pickle.dumps(honest, protocol=5)) == honest


def test_colliding_keys_count_across_a_call_and_later_opcodes():
    # set(list of 32) through REDUCE, then ADDITEMS of one more: 33 members on one hash
    keys = colliding_pairs(MAX_EQUAL_HASHES + 1)
    called = pickle.dumps(Reduce(set, (keys[:-1],)), protocol=4)[:-1]  # without STOP
    with pytest.raises(PickleLimitError, match="one hash"):
        hardened(called + b"(" + _body(keys[-1]) + b"\x90.")
    assert hardened(called + b".") == set(keys[:-1])


def test_colliding_keys_up_to_the_bound_still_load():
    keys = colliding_pairs(MAX_EQUAL_HASHES)
    assert hardened(_setitem_one_by_one(keys)) == {k: None for k in keys}
    assert hardened(pickle.dumps(set(keys), protocol=5)) == set(keys)


# ---- bounds, in this process (each refusal happens before the expensive step) ---------------------


def test_the_opcode_bound():
    just_under = b"\x80\x05" + b"N0" * ((MAX_OPCODES - 3) // 2) + b"N."
    assert hardened(just_under) is None
    with pytest.raises(PickleLimitError) as info:
        hardened(b"\x80\x05" + b"N0" * (MAX_OPCODES // 2 + 1) + b"N.", peer="tls://10.0.0.9:1")
    assert info.value.limit == MAX_OPCODES and "opcodes" in info.value.what
    assert isinstance(info.value, PickleRefusedError) and info.value.module == "<pickle>"
    assert "tls://10.0.0.9:1" in str(info.value)


def test_the_memo_bound():
    assert hardened(b"\x80\x04" + b"N\x94" * MAX_MEMO_ENTRIES + b".") is None
    with pytest.raises(PickleLimitError, match="memo"):
        hardened(b"\x80\x04" + b"N\x94" * (MAX_MEMO_ENTRIES + 1) + b".")


def test_the_tuple_depth_bound():
    at_bound = hardened(b"\x80\x02N" + b"\x85" * MAX_HASHABLE_DEPTH + b".")
    assert hash(at_bound) is not None
    for past in (
        b"\x80\x02N" + b"\x85" * (MAX_HASHABLE_DEPTH + 1) + b".",  # TUPLE1
        b"\x80\x02(N" + b"\x85" * MAX_HASHABLE_DEPTH + b"t.",  # TUPLE
        b"\x80\x02NN" + b"\x85" * MAX_HASHABLE_DEPTH + b"\x86.",  # TUPLE2
        b"\x80\x02(N" + b"\x85" * MAX_HASHABLE_DEPTH + b"\x85t.",  # TUPLE1 past it inside a MARK
    ):
        with pytest.raises(PickleLimitError, match="tuples"):
            hardened(past)
    # tuple(list-of-tall-tuple), through an allowed constructor: measured too
    tall = b"N" + b"\x85" * MAX_HASHABLE_DEPTH
    with pytest.raises(PickleLimitError, match="tuples"):
        hardened(b"\x80\x02cbuiltins\ntuple\n]" + tall + b"a\x85R.")
    # frozensets and slices count as levels too (their hash recurses as well)
    with pytest.raises(PickleLimitError, match="tuples"):
        hardened(b"\x80\x04(" + tall + b"\x91.")
    with pytest.raises(PickleLimitError, match="tuples"):
        hardened(b"\x80\x02cbuiltins\nslice\n" + tall + b"\x85R.")


def test_a_bytearray8_longer_than_the_pickle_is_refused_before_allocating():
    with pytest.raises(pickle.UnpicklingError, match="more than the pickle holds"):
        hardened(b"\x80\x05\x96" + struct.pack("<Q", 2**62) + b".")
    assert hardened(pickle.dumps(bytearray(b"abc"), protocol=5)) == bytearray(b"abc")


def test_malformed_pickles_are_unpickling_errors():
    for data in (
        b"",
        b"\x80",
        b"\x80\x05",
        b"\x80\x05N",
        b"0.",
        b"\x80\x05\xff.",
        b"\x80\x04h\x07.",
        b"(a.",
        b"\x80\x02cbuiltins\ncomplex\nK\x01K\x02K\x03\x87R.",  # an allowed call with wrong arguments
        b"\x80\x02cbuiltins\nValueError\nU\x01x\x85R]b.",
    ):  # an exception's state that is no dict
        with pytest.raises(pickle.UnpicklingError) as info:
            hardened(data)
        assert not isinstance(info.value, PickleRefusedError), data


def test_state_is_applied_only_to_exceptions_and_plain_classes():
    # an OrderedDict (a C type) with state, and a list: refused
    ordered = b"\x80\x02ccollections\nOrderedDict\n)R}U\x01aK\x01sb."
    with pytest.raises(PickleRefusedError, match="state applied to an instance"):
        hardened(ordered)
    with pytest.raises(PickleRefusedError, match="state applied to an instance"):
        hardened(b"\x80\x02]}b.")
    # an exception's attributes travel as state: loaded
    err = hardened(b"\x80\x02cbuiltins\nValueError\nU\x01x\x85R}U\x04codeK\x07sb.")
    assert type(err) is ValueError and err.code == 7
    assert BUILDABLE_CLASSES and all(not issubclass(c, BaseException) for c in BUILDABLE_CLASSES)


def test_an_invalid_datetime_is_malformed_and_a_valid_one_loads():
    # Year 0 through the bytes form the datetime class accepts unchecked: its ctime() reads out of bounds.
    year_zero = b"\x80\x02cdatetime\ndatetime\nC\n\x00\x00\x01\x01\x00\x00\x00\x00\x00\x00\x85R."
    with pytest.raises(pickle.UnpicklingError, match="ValueError"):
        hardened(year_zero)
    for value in (
        datetime.datetime(2030, 1, 2, 3, 4, 5, 6),
        datetime.datetime(2030, 1, 2, tzinfo=datetime.UTC),
        datetime.datetime(1, 1, 1),
        datetime.datetime(9999, 12, 31, 23, 59, 59, 999999),
    ):
        loaded = hardened(pickle.dumps(value, protocol=5))
        assert type(loaded) is datetime.datetime and loaded == value


# ---- pickles that must load ----------------------------------------------------------------------


LOADABLE = {
    "dict": {"a": [1, 2.5, None], "b": ("x", "y"), 3: {"nested": True}},  # bytes: see below
    "list": [1, "two", 3.0, None, True],
    "tuple": (1, (2, (3,))),
    "set": {1, 2, 3},
    "frozenset": frozenset({"a", "b"}),
    "complex": 3 + 4j,
    "slice": slice(1, 10, 2),
    "OrderedDict": collections.OrderedDict([("b", 1), ("a", 2)]),
    "defaultdict": collections.defaultdict(list, {"k": [1]}),
    "datetime": datetime.datetime(2030, 1, 2, 3, 4, 5, tzinfo=datetime.UTC),
    "timedelta": datetime.timedelta(days=2, seconds=3),
    "timezone": datetime.timezone(datetime.timedelta(hours=2), "X"),
    "Status": Status.running,
    "big-int": 2**200,
    "task-keys": {("x-1", 0), ("x-1", 1), "y"},
}


# Values whose pickle carries bytes (a datetime's state): refused at protocol 2, where bytes are a
# call of _codecs.encode; distributed pickles with protocol 5.
BYTES_STATE = {"datetime"}


def _same(a, b) -> bool:
    return type(a) is type(b) and a == b


# Protocol 2 with fix_imports=False: the REDUCE forms (builtins.set, ...). distributed pickles with
# the highest protocol; see test_python2_module_names_are_refused.
@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
@pytest.mark.parametrize("name", list(LOADABLE))
def test_data_a_network_sends_loads(name, protocol):
    value = LOADABLE[name]
    data = pickle.dumps(value, protocol=protocol, fix_imports=False)
    if protocol == 2 and name in BYTES_STATE:  # bytes below protocol 3 are a call of _codecs.encode
        with pytest.raises(PickleRefusedError, match="_codecs.encode"):
            hardened(data)
        return
    assert _same(value, hardened(data))


@pytest.mark.parametrize("protocol", [3, 4, 5])
def test_bytes_values_load_from_protocol_3(protocol):
    assert hardened(pickle.dumps(b"\x00\x01abc", protocol=protocol)) == b"\x00\x01abc"
    assert hardened(pickle.dumps({"b": (b"y", [b"four"])}, protocol=protocol)) == {"b": (b"y", [b"four"])}


def test_python2_module_names_are_refused():
    # Below protocol 3 pickle writes Python 2's "__builtin__" by default; the allow-list is checked
    # on the name as sent (and no translation happens after it), so such a pickle is refused.
    data = pickle.dumps({1, 2}, protocol=2)
    assert b"__builtin__" in data
    with pytest.raises(PickleRefusedError) as info:
        hardened(data)
    assert (info.value.module, info.value.name) == ("__builtin__", "set")


def test_defaultdict_keeps_its_factory():
    loaded = hardened(pickle.dumps(LOADABLE["defaultdict"], protocol=2, fix_imports=False))
    assert loaded.default_factory is list and loaded["new"] == []


def test_bytearray_value_loads_at_protocol_5():
    # BYTEARRAY8 builds it without naming (or calling) builtins.bytearray.
    assert hardened(pickle.dumps(bytearray(b"ab"), protocol=5)) == bytearray(b"ab")


def test_out_of_band_buffers_still_load_as_buffers():
    # PickleBuffer values (what protocol 5 sends out of band) come back as the buffers given.
    bufs: list[pickle.PickleBuffer] = []
    data = pickle.dumps([pickle.PickleBuffer(b"raw bytes")], protocol=5, buffer_callback=bufs.append)
    [loaded] = hardened(data, buffers=[b"raw bytes"])
    assert bytes(loaded) == b"raw bytes"


def _distributed_exception_pickle(make_exc) -> bytes:
    """An exception pickled the way distributed pickles a task's error: raised (so it has a
    traceback), tblib installed on it, distributed.protocol.pickle.dumps."""
    try:
        raise make_exc()
    except Exception as exc:
        tblib.pickling_support.install(exc)
        assert exc.__traceback__ is not None
        return dpickle.dumps(exc)


def _chained_neuro_error():
    try:
        raise KeyError("missing")
    except KeyError as cause:
        try:
            raise ConfigFieldError("model.yaml", "experts", "must be positive") from cause
        except ConfigFieldError as exc:
            return exc


EXCEPTIONS = [
    ("ValueError", lambda: ValueError("x"), ValueError, ("x",), {}),
    ("KeyError", lambda: KeyError("k"), KeyError, ("k",), {}),
    (
        "OSError",
        lambda: FileNotFoundError(2, "No such file", "/x"),
        FileNotFoundError,
        (2, "No such file"),
        {"filename": "/x", "errno": 2},
    ),
    (
        "neuro-config-error",
        lambda: ConfigFieldError("model.yaml", "experts", "must be positive"),
        ConfigFieldError,
        ("model.yaml: field 'experts' must be positive",),
        {"path": "model.yaml", "field": "experts", "problem": "must be positive"},
    ),
    (
        "neuro-security-error",
        lambda: RequestRefusedError("run", "client", "tcp://1.2.3.4:5", "never"),
        RequestRefusedError,
        None,
        {"op": "run", "role": "client", "peer": "tcp://1.2.3.4:5", "why": "never"},
    ),
    (
        "neuro-pickle-limit-error",
        lambda: PickleLimitError("opcodes", 10, "tls://x:1"),
        PickleLimitError,
        None,
        {"what": "opcodes", "limit": 10, "peer": "tls://x:1"},
    ),
]


@pytest.mark.parametrize("make, cls, args, attrs", [pytest.param(*c[1:], id=c[0]) for c in EXCEPTIONS])
def test_exceptions_load_without_their_traceback(make, cls, args, attrs):
    data = _distributed_exception_pickle(make)
    assert b"unpickle_traceback" in data  # the traceback was pickled ...
    loaded = hardened(data)
    assert type(loaded) is cls
    assert loaded.__traceback__ is None  # ... and dropped
    assert loaded.args == (args if args is not None else make().args)
    for key, value in attrs.items():
        assert getattr(loaded, key) == value
    # The traceback is dropped by the substitutes, not merely ignored: without them it is refused.
    with pytest.raises(PickleRefusedError) as info:
        restricted_loads(data, allowed=is_allowed, named_only=is_named_only)
    assert info.value.module == "tblib.pickling_support"


def test_a_chained_neuro_error_keeps_its_cause_without_tracebacks():
    data = _distributed_exception_pickle(_chained_neuro_error)
    loaded = hardened(data)
    assert isinstance(loaded, ConfigFieldError) and isinstance(loaded, NeuroDaskError)
    assert loaded.field == "experts"
    assert type(loaded.__cause__) is KeyError and loaded.__cause__.args == ("missing",)
    assert loaded.__traceback__ is None and loaded.__cause__.__traceback__ is None


@pytest.mark.parametrize("named", [bytes, bytearray, str, int, float, bool, memoryview])
def test_named_only_types_load_when_merely_named(named):
    assert hardened(pickle.dumps(named)) is named
    assert hardened(dpickle.dumps(named)) is named  # the `dask` family's "type-serialized" header
    assert hardened(pickle.dumps([named, 1, "x"])) == [named, 1, "x"]


def test_bytes_named_loads_but_bytes_called_is_refused():
    assert hardened(pickle.dumps(bytes)) is bytes
    with pytest.raises(PickleRefusedError):
        hardened(pickle.dumps(Reduce(bytes, (10**6,))))


def test_naming_a_type_many_times_scans_the_pickle_once(monkeypatch):
    # The named-only rule reads the whole pickle; done per name it would be quadratic.
    import neuro_dask.security.unpickle as unpickle

    calls = []
    real = unpickle.calls_anything
    monkeypatch.setattr(unpickle, "calls_anything", lambda data: calls.append(1) or real(data))
    assert hardened(pickle.dumps([bytes, str, int] * 500, protocol=2, fix_imports=False)) == [bytes, str, int] * 500
    assert len(calls) == 1


@pytest.mark.parametrize(
    "data, calls",
    [
        (pickle.dumps(bytes), False),
        (pickle.dumps({"a": [1, (2, 3)]}), False),
        (pickle.dumps(np.int64(1)), True),
        (pickle.dumps(Reduce(len, ("x",)), protocol=0), True),
        (b"\x80\x05not a pickle", True),  # unreadable counts as dangerous
        (b"", True),
    ],
)
def test_calls_anything(data, calls):
    assert calls_anything(data) is calls


# ---- globals_named -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value, expected",
    [
        (
            Task("k", serve_expert_call, b"x"),
            [("dask._task_spec", "Task"), ("neuro_dask.client.dispatch.tasks", "serve_expert_call")],
        ),
        (
            [np.int64(1), ValueError("x")],
            # distributed installs tblib's pickling for every exception class when it is imported
            [
                (np.int64(1).__reduce__()[0].__module__, "scalar"),
                ("numpy", "dtype"),
                ("tblib.pickling_support", "unpickle_exception_with_attrs"),
                ("builtins", "ValueError"),
            ],
        ),
        ({"a": [1, 2]}, []),
        (bytes, [("builtins", "bytes")]),
    ],
    ids=["task", "scalar-then-exception", "plain", "bytes"],
)
def test_globals_named_lists_the_globals_in_order(value, expected):
    assert globals_named(dpickle.dumps(value)) == expected


# ---- allow-list hygiene --------------------------------------------------------------------------

DANGEROUS_BUILTINS = frozenset(
    {
        "eval",
        "exec",
        "compile",
        "getattr",
        "setattr",
        "delattr",
        "__import__",
        "open",
        "input",
        "breakpoint",
        "globals",
        "vars",
        "locals",
        "exit",
        "quit",
        "help",
        "memoryview",
        "bytes",
        "bytearray",
        "type",
        "object",
        "SystemExit",
        "KeyboardInterrupt",
        "BaseException",
        "GeneratorExit",
        # value-proportional cost, or a C layout read unchecked
        "range",
        "str",
        "int",
        "float",
        "iter",
        "map",
        "filter",
        "zip",
        "enumerate",
        "reversed",
        "sorted",
        "sum",
        "UnicodeDecodeError",
        "UnicodeEncodeError",
        "UnicodeTranslateError",
    }
)
DANGEROUS_MODULES = (
    "os",
    "posix",
    "nt",
    "subprocess",
    "_posixsubprocess",
    "sys",
    "operator",
    "_operator",
    "importlib",
    "pickle",
    "_pickle",
    "shutil",
    "marshal",
    "types",
    "ctypes",
    "runpy",
    "code",
    "pty",
    "socket",
    "cloudpickle",
    "builtins.__import__",
    # C objects from raw bytes, codecs by name, task graphs and serialized objects
    "numpy",
    "_codecs",
    "codecs",
    "copyreg",
    "itertools",
    "dask._task_spec",
    "dask._expr",
    "distributed.protocol",
    "distributed.utils_comm",
    "torch",
)
DANGEROUS_EXACT = frozenset(
    {
        ("functools", "partial"),
        ("functools", "reduce"),
        ("io", "open"),
        ("_io", "open"),
        ("codecs", "open"),
        ("dask.utils", "apply"),
        ("dask.core", "get"),
        ("dask.local", "get_sync"),
        ("copyreg", "__newobj__"),
        ("collections", "deque"),
        ("datetime", "datetime"),
        ("datetime", "date"),
        ("datetime", "time"),
    }
)


def _dangerous(module: str, name: str) -> bool:
    if module == "builtins" and name in DANGEROUS_BUILTINS:
        return True
    if any(module == m or module.startswith(m + ".") for m in DANGEROUS_MODULES):
        return True
    return (module, name) in DANGEROUS_EXACT


@pytest.mark.parametrize(
    "entry",
    [
        ("builtins", "eval"),
        ("os", "system"),
        ("posix", "system"),
        ("sys", "exit"),
        ("functools", "partial"),
        ("operator", "attrgetter"),
        ("importlib", "reload"),
        ("types", "FunctionType"),
        ("ctypes", "CDLL"),
        ("io", "open"),
        ("dask.utils", "apply"),
        ("marshal", "loads"),
        ("numpy", "dtype"),
        ("numpy._core.multiarray", "scalar"),
        ("builtins", "range"),
        ("collections", "deque"),
        ("_codecs", "encode"),
        ("copyreg", "_reconstructor"),
        ("dask._task_spec", "Task"),
        ("distributed.protocol.serialize", "ToPickle"),
        ("distributed.utils_comm", "WrappedKey"),
        ("builtins", "UnicodeDecodeError"),
    ],
)
def test_the_hygiene_check_recognises_dangerous_names(entry):
    assert _dangerous(*entry)
    assert not is_allowed(*entry)


def test_no_allowed_global_is_dangerous():
    bad = sorted(entry for entry in ALLOWED_GLOBALS if _dangerous(*entry))
    assert bad == []


def test_named_only_globals_are_not_allowed_outright():
    # Otherwise the named-only rule (bytes(10**12) never called) would not apply to them.
    assert not (NAMED_ONLY_GLOBALS & ALLOWED_GLOBALS)
    assert all(not is_allowed(*entry) for entry in NAMED_ONLY_GLOBALS)


def _resolve(module: str, name: str):
    obj = importlib.import_module(module)
    for part in name.split("."):
        obj = getattr(obj, part)
    return obj


@pytest.mark.parametrize("entry", [pytest.param(e, id=":".join(e)) for e in sorted(ALLOWED_GLOBALS | set(SUBSTITUTES))])
def test_every_allowed_global_resolves_here(entry):
    assert callable(_resolve(*entry))
    assert "." not in entry[1]


def test_no_numpy_global_is_allowed_in_either_spelling():
    assert [e for e in ALLOWED_GLOBALS if e[0].split(".")[0] == "numpy"] == []
    for module in (
        "numpy",
        "numpy.core.multiarray",
        "numpy._core.multiarray",
        "numpy.core.numeric",
        "numpy._core.numeric",
    ):
        for name in ("dtype", "ndarray", "_reconstruct", "scalar", "_frombuffer"):
            assert not is_allowed(module, name)


@pytest.mark.parametrize(
    "module, name, expected",
    [
        ("neuro_dask.errors", "ConfigFieldError", True),
        ("neuro_dask.errors", "_rebuild", True),
        ("neuro_dask.security.errors", "PickleRefusedError", True),
        ("neuro_dask.security.errors", "PlainDataRefusedError", True),
        ("neuro_dask.errors", "NeuroDaskError.__subclasses__", False),
        ("neuro_dask.errors", "Iterable", False),  # imported into the module, not an error
        ("neuro_dask.security.errors", "pickle", False),  # a module imported there
        ("neuro_dask.settings", "SecuritySettings", False),  # not an error module
        ("neuro_dask.client.dispatch.tasks", "serve_expert_call", False),  # no task graphs: never called by a pickle
        ("neuro_dask.client.dispatch.tasks", "msgpack", False),
    ],
)
def test_neuro_dask_entries(module, name, expected):
    assert is_allowed(module, name) is expected


def test_the_task_functions_are_still_listed_for_the_worker_guard():
    assert is_task_function("neuro_dask.client.dispatch.tasks", "serve_expert_call")
    assert TASK_FUNCTIONS and not (TASK_FUNCTIONS & ALLOWED_GLOBALS)


def test_allowed_builtins_are_the_data_constructors_and_exceptions():
    names = {name for module, name in ALLOWED_GLOBALS if module == "builtins"}
    for name in names:
        obj = getattr(builtins, name)
        assert isinstance(obj, type), name
        assert not issubclass(obj, BaseException) or issubclass(obj, Exception), name


def _build_on_global(module: str, name: str, attributes: dict) -> bytes:
    """GLOBAL module.name, then BUILD with (None, attributes): setattr on the global object itself."""
    state = pickle.dumps(attributes, protocol=2)[2:-1]  # the dict's opcodes, without PROTO and STOP
    return b"\x80\x02c" + module.encode() + b"\n" + name.encode() + b"\n" + b"N" + state + b"\x86b."


def test_a_pickle_cannot_rewrite_an_allowed_class():
    before = (TaskRefusedError.__module__, TaskRefusedError.__qualname__)
    assert before == ("neuro_dask.security.errors", "TaskRefusedError")
    data = _build_on_global(
        "neuro_dask.security.errors",
        "TaskRefusedError",
        {"__module__": "neuro_dask.client.dispatch.tasks", "__qualname__": "serve_expert_call"},
    )
    try:
        with pytest.raises(PickleRefusedError, match="state applied to it"):
            hardened(data)
        # Otherwise any peer may rename (or re-method) an allowed class for the whole process.
        assert (TaskRefusedError.__module__, TaskRefusedError.__qualname__) == before
    finally:
        TaskRefusedError.__module__, TaskRefusedError.__qualname__ = before
