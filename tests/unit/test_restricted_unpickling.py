"""Restricted unpickling (neuro_dask/security/unpickle.py with the allow-list of allowlist.py).

Attacks: each pickle below would run code, open a file, allocate without bound or end the process
if plain `pickle.loads` read it; the restricted loader must refuse it before calling anything, and
the marker file each one aims at must never appear. What must still load: numpy arrays (with
protocol 5 out-of-band buffers too), numpy scalars, Dask task specs as distributed pickles them,
plain containers and exceptions as distributed pickles them (their tracebacks dropped, not refused).
Hygiene: the allow-list names nothing that imports, runs or opens by name, and each of its entries
exists in this environment.
"""

from __future__ import annotations

import builtins
import collections
import copyreg
import datetime
import functools
import importlib
import io
import os
import pickle
import shlex
import subprocess
import warnings

import cloudpickle
import numpy as np
import pytest
import tblib.pickling_support
from dask._task_spec import DataNode, Task
from distributed.protocol import pickle as dpickle

from neuro_dask.dispatch.tasks import serve_expert_call
from neuro_dask.errors import ConfigFieldError, NeuroDaskError
from neuro_dask.security.allowlist import (
    ALLOWED_GLOBALS,
    NAMED_ONLY_GLOBALS,
    SUBSTITUTES,
    TASK_FUNCTIONS,
    is_allowed,
    is_named_only,
)
from neuro_dask.security.errors import PickleRefusedError, RequestRefusedError
from neuro_dask.security.unpickle import calls_anything, globals_named, restricted_loads


def hardened(data, buffers=None, peer=None):
    """Exactly the call hardened mode makes (hardening._restricted)."""
    return restricted_loads(data, allowed=is_allowed, buffers=buffers, peer=peer, named_only=is_named_only,
                            substitutes=SUBSTITUTES)


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


def _allowed_rebuilder_of_forbidden(marker) -> bytes:
    return pickle.dumps(Reduce(copyreg._reconstructor, (subprocess.Popen, object, ["touch", str(marker)])))


REFUSED = [
    # (id, pickle maker taking the marker path, refused module, refused name)
    ("open", lambda m: pickle.dumps(Payload(m)), "io", "open"),
    ("open-protocol-0", lambda m: pickle.dumps(Payload(m), protocol=0), "io", "open"),
    ("os.system", lambda m: pickle.dumps(Reduce(os.system, (_touch(m),))), os.system.__module__, "system"),
    ("builtins.eval", lambda m: pickle.dumps(Reduce(eval, (f"open({str(m)!r}, 'w').close()",))), "builtins", "eval"),
    ("builtins.exec", lambda m: pickle.dumps(Reduce(exec, (f"open({str(m)!r}, 'w').close()",))), "builtins", "exec"),
    ("builtins.getattr", lambda m: pickle.dumps(Reduce(getattr, (str(m), "upper"))), "builtins", "getattr"),
    ("builtins.__import__", lambda m: pickle.dumps(Reduce(__import__, ("os",))), "builtins", "__import__"),
    ("importlib.import_module", lambda m: pickle.dumps(Reduce(importlib.import_module, ("os",))),
     "importlib", "import_module"),
    ("subprocess.Popen", lambda m: pickle.dumps(Reduce(subprocess.Popen, (["touch", str(m)],))),
     "subprocess", "Popen"),
    ("functools.partial", lambda m: pickle.dumps(functools.partial(os.system, _touch(m))), "functools", "partial"),
    ("cloudpickle-lambda", lambda m: cloudpickle.dumps(lambda: open(str(m), "w")),
     "cloudpickle.cloudpickle", None),  # whichever of its helpers comes first
    ("bytes-called", lambda m: pickle.dumps(Reduce(bytes, (10**6,))), "builtins", "bytes"),
    ("bytearray-called", lambda m: pickle.dumps(Reduce(bytearray, (10**6,))), "builtins", "bytearray"),
    # A bytearray *value* below protocol 5 is pickled as a call of bytearray: refused like any call.
    ("bytearray-value-protocol-4", lambda m: pickle.dumps(bytearray(b"ab"), protocol=4), "builtins", "bytearray"),
    # named_only is a property of the whole pickle: a type named next to any call is refused.
    ("bytes-named-beside-a-call", lambda m: pickle.dumps([bytes, np.float32(1)]), "builtins", "bytes"),
    ("SystemExit", lambda m: pickle.dumps(SystemExit(1)), "builtins", "SystemExit"),
    ("KeyboardInterrupt", lambda m: pickle.dumps(KeyboardInterrupt()), "builtins", "KeyboardInterrupt"),
    ("persistent-id", _with_persistent_id, "<persistent id>", None),
    ("raw-GLOBAL-os.system", _raw_protocol0_global, "os", "system"),
    ("raw-INST-os.system", _raw_protocol0_inst, "os", "system"),
    ("allowed-caller-of-os.system", _allowed_caller_of_forbidden, os.system.__module__, "system"),
    ("allowed-rebuilder-of-Popen", _allowed_rebuilder_of_forbidden, "subprocess", "Popen"),
    ("a-task-of-len", lambda m: dpickle.dumps(Task("k", len, "abc")), "builtins", "len"),
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


# ---- pickles that must load ----------------------------------------------------------------------

RNG = np.random.default_rng(20260801)
FLOAT32_2D = RNG.standard_normal((5, 7)).astype(np.float32)
INT64 = RNG.integers(-(2**40), 2**40, size=11, dtype=np.int64)


def _same(a, b) -> bool:
    if isinstance(a, np.ndarray):
        return isinstance(b, np.ndarray) and a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b)
    if isinstance(a, np.generic):
        return type(a) is type(b) and a == b
    return type(a) is type(b) and a == b


LOADABLE = {
    "float32-2d": FLOAT32_2D,
    "int64": INT64,
    "fortran-order": np.asfortranarray(FLOAT32_2D),
    "non-contiguous-view": FLOAT32_2D[::2, 1::3],
    "bool-array": INT64 > 0,
    "float32-scalar": np.float32(1.5),
    "int64-scalar": np.int64(-(2**40)),
    "bool-scalar": np.bool_(True),
    "complex128-scalar": np.complex128(1 - 2j),
    "dict": {"a": [1, 2.5, None], "b": ("x", b"y"), 3: {"nested": True}},
    "list": [1, "two", 3.0, b"four", None, True],
    "tuple": (1, (2, (3,))),
    "set": {1, 2, 3},
    "frozenset": frozenset({"a", "b"}),
    "bytes-value": b"\x00\x01abc",
    "complex": 3 + 4j,
    "range": range(2, 20, 3),
    "slice": slice(1, 10, 2),
    "OrderedDict": collections.OrderedDict([("b", 1), ("a", 2)]),
    "defaultdict": collections.defaultdict(list, {"k": [1]}),
    "deque": collections.deque([1, 2, 3], maxlen=5),
    "datetime": datetime.datetime(2030, 1, 2, 3, 4, 5, tzinfo=datetime.UTC),
    "timedelta": datetime.timedelta(days=2, seconds=3),
}


# Protocol 2 with fix_imports=False: the REDUCE forms (builtins.set, _codecs.encode for bytes, ...).
# distributed pickles with the highest protocol; see test_python2_module_names_are_refused.
@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
@pytest.mark.parametrize("name", list(LOADABLE))
def test_data_a_network_sends_loads(name, protocol):
    value = LOADABLE[name]
    assert _same(value, hardened(pickle.dumps(value, protocol=protocol, fix_imports=False)))


def test_python2_module_names_are_refused():
    # Below protocol 3 pickle writes Python 2's "__builtin__" by default; the allow-list is checked
    # on the name as sent, so such a pickle is refused (safe; no peer of this network sends one).
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


@pytest.mark.parametrize("array", [FLOAT32_2D, INT64, np.asfortranarray(FLOAT32_2D)], ids=["float32-2d", "int64", "F"])
def test_numpy_arrays_with_out_of_band_buffers_load(array):
    bufs: list[pickle.PickleBuffer] = []
    data = pickle.dumps(array, protocol=5, buffer_callback=bufs.append)
    assert len(bufs) == 1  # the data really travelled out of band
    assert array.tobytes() not in data
    assert _same(array, hardened(data, buffers=bufs))


def test_numpy_arrays_as_distributed_pickles_them():
    bufs: list = []
    data = dpickle.dumps(FLOAT32_2D, buffer_callback=bufs.append)
    assert _same(FLOAT32_2D, hardened(data, buffers=bufs))


def test_a_numpy_object_array_loads_only_from_allowed_elements(tmp_path):
    ok = np.array([1, "a", None], dtype=object)
    assert list(hardened(pickle.dumps(ok))) == [1, "a", None]
    bad = np.array([1, Payload(tmp_path / "marker")], dtype=object)
    with pytest.raises(PickleRefusedError) as info:
        hardened(pickle.dumps(bad))
    assert (info.value.module, info.value.name) == ("io", "open")
    assert not (tmp_path / "marker").exists()


def test_an_expert_task_loads_as_distributed_pickles_it():
    task = Task("expert-3-7", serve_expert_call, b"\x81\xa1x\x01")
    loaded = hardened(dpickle.dumps(task))
    assert isinstance(loaded, Task)
    assert loaded.key == "expert-3-7" and loaded.func is serve_expert_call and loaded.args == (b"\x81\xa1x\x01",)


def test_a_data_node_loads():
    loaded = hardened(dpickle.dumps(DataNode("d", {"a": 1})))
    assert isinstance(loaded, DataNode) and loaded.value == {"a": 1}


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
    ("neuro-config-error", lambda: ConfigFieldError("model.yaml", "experts", "must be positive"), ConfigFieldError,
     ("model.yaml: field 'experts' must be positive",),
     {"path": "model.yaml", "field": "experts", "problem": "must be positive"}),
    ("neuro-security-error", lambda: RequestRefusedError("run", "client", "tcp://1.2.3.4:5", "never"),
     RequestRefusedError, None, {"op": "run", "role": "client", "peer": "tcp://1.2.3.4:5", "why": "never"}),
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


@pytest.mark.parametrize("data, calls", [
    (pickle.dumps(bytes), False),
    (pickle.dumps({"a": [1, (2, 3)]}), False),
    (pickle.dumps(np.int64(1)), True),
    (pickle.dumps(Reduce(len, ("x",)), protocol=0), True),
    (b"\x80\x05not a pickle", True),  # unreadable counts as dangerous
    (b"", True),
])
def test_calls_anything(data, calls):
    assert calls_anything(data) is calls


# ---- globals_named -------------------------------------------------------------------------------


@pytest.mark.parametrize("value, expected", [
    (Task("k", serve_expert_call, b"x"), [("dask._task_spec", "Task"), ("neuro_dask.dispatch.tasks", "serve_expert_call")]),
    ([np.int64(1), ValueError("x")],
     # distributed installs tblib's pickling for every exception class when it is imported
     [(np.int64(1).__reduce__()[0].__module__, "scalar"), ("numpy", "dtype"),
      ("tblib.pickling_support", "unpickle_exception_with_attrs"), ("builtins", "ValueError")]),
    ({"a": [1, 2]}, []),
    (bytes, [("builtins", "bytes")]),
], ids=["task", "scalar-then-exception", "plain", "bytes"])
def test_globals_named_lists_the_globals_in_order(value, expected):
    assert globals_named(dpickle.dumps(value)) == expected


# ---- allow-list hygiene --------------------------------------------------------------------------

DANGEROUS_BUILTINS = frozenset({
    "eval", "exec", "compile", "getattr", "setattr", "delattr", "__import__", "open", "input", "breakpoint",
    "globals", "vars", "locals", "exit", "quit", "help", "memoryview", "bytes", "bytearray", "type", "object",
    "SystemExit", "KeyboardInterrupt", "BaseException", "GeneratorExit",
})
DANGEROUS_MODULES = ("os", "posix", "nt", "subprocess", "_posixsubprocess", "sys", "operator", "_operator",
                     "importlib", "pickle", "_pickle", "shutil", "marshal", "types", "ctypes", "runpy", "code",
                     "pty", "socket", "cloudpickle", "builtins.__import__")
DANGEROUS_EXACT = frozenset({
    ("functools", "partial"), ("functools", "reduce"), ("io", "open"), ("_io", "open"), ("codecs", "open"),
    ("dask.utils", "apply"), ("dask.core", "get"), ("dask.local", "get_sync"), ("copyreg", "__newobj__"),
})


def _dangerous(module: str, name: str) -> bool:
    if module == "builtins" and name in DANGEROUS_BUILTINS:
        return True
    if any(module == m or module.startswith(m + ".") for m in DANGEROUS_MODULES):
        return True
    return (module, name) in DANGEROUS_EXACT


@pytest.mark.parametrize("entry", [("builtins", "eval"), ("os", "system"), ("posix", "system"), ("sys", "exit"),
                                   ("functools", "partial"), ("operator", "attrgetter"), ("importlib", "reload"),
                                   ("types", "FunctionType"), ("ctypes", "CDLL"), ("io", "open"),
                                   ("dask.utils", "apply"), ("marshal", "loads")])
def test_the_hygiene_check_recognises_dangerous_names(entry):
    assert _dangerous(*entry)
    assert not is_allowed(*entry)


def test_no_allowed_global_is_dangerous():
    bad = sorted(entry for entry in ALLOWED_GLOBALS | TASK_FUNCTIONS if _dangerous(*entry))
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


def _pair_key(module: str, name: str) -> tuple[str, str]:
    """numpy 1.x has numpy.core, 2.x numpy._core: both spellings of one global are one group."""
    return (module.replace("numpy.core", "numpy._core", 1) if module.startswith("numpy.core.") else module), name


def _groups() -> dict[tuple[str, str], list[tuple[str, str]]]:
    groups: dict[tuple[str, str], list[tuple[str, str]]] = collections.defaultdict(list)
    for entry in sorted(ALLOWED_GLOBALS):
        groups[_pair_key(*entry)].append(entry)
    return dict(groups)


def _group_param(key, entries):
    return pytest.param(entries, id=":".join(key))


@pytest.mark.parametrize("entries", [_group_param(key, entries) for key, entries in _groups().items()])
def test_every_allowed_global_resolves_here(entries):
    resolved = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # numpy 2 warns on numpy.core
        for module, name in entries:
            try:
                resolved.append(_resolve(module, name))
            except (ImportError, AttributeError):
                continue
    # One spelling of a numpy pair may be missing (numpy 2's numpy.core shim lacks _frombuffer), never both.
    assert resolved, f"none of {entries} exists here"
    assert all(callable(obj) for obj in resolved)


def test_numpy_globals_come_in_both_spellings():
    groups = _groups()
    numpy_groups = [entries for (module, _), entries in groups.items() if module.startswith("numpy._core.")]
    assert numpy_groups and all(len(entries) == 2 for entries in numpy_groups)


@pytest.mark.parametrize("module, name, expected", [
    ("neuro_dask.errors", "ConfigFieldError", True),
    ("neuro_dask.errors", "_rebuild", True),
    ("neuro_dask.security.errors", "PickleRefusedError", True),
    ("neuro_dask.errors", "NeuroDaskError.__subclasses__", False),
    ("neuro_dask.errors", "Iterable", False),            # imported into the module, not an error
    ("neuro_dask.security.errors", "pickle", False),     # a module imported there
    ("neuro_dask.settings", "SecuritySettings", False),  # not an error module
    ("neuro_dask.dispatch.tasks", "serve_expert_call", True),
    ("neuro_dask.dispatch.tasks", "msgpack", False),
])
def test_neuro_dask_entries(module, name, expected):
    assert is_allowed(module, name) is expected


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
    from distributed.protocol.serialize import ToPickle

    from neuro_dask.security.guards import refused_function

    before = (ToPickle.__module__, ToPickle.__qualname__)
    assert before == ("distributed.protocol.serialize", "ToPickle")
    data = _build_on_global("distributed.protocol.serialize", "ToPickle",
                            {"__module__": "neuro_dask.dispatch.tasks", "__qualname__": "serve_expert_call"})
    try:
        with pytest.raises(PickleRefusedError, match="state applied to it"):
            hardened(data)
        # Otherwise any peer may rename (or re-method) an allowed class, e.g. past guards.refused_function.
        assert (ToPickle.__module__, ToPickle.__qualname__) == before
        assert refused_function(Task("k", ToPickle, "x")) == "distributed.protocol.serialize.ToPickle"
    finally:
        ToPickle.__module__, ToPickle.__qualname__ = before
