"""Hardened mode's process side (neuro_dask/security/hardening.py): the version gate, what install()
replaces and uninstall() restores, and a scan of distributed's own source that fails when a pickle
loader is called anywhere PICKLE_SITES (or the small documented table below) does not explain.

install() patches distributed process-wide: every test that installs does it through the
`hardened` fixture, whose teardown uninstalls even when the test fails.
"""

from __future__ import annotations

import ast
import asyncio
import contextvars
import importlib
import io
import pickle
import re
import tokenize
from dataclasses import dataclass
from pathlib import Path

import distributed
import distributed.protocol
import numpy as np
import pytest
import tblib.pickling_support
from distributed.comm import tcp
from distributed.protocol import pickle as dpickle
from distributed.protocol.serialize import ToPickle, deserialize, serialize

from neuro_dask.security import hardening
from neuro_dask.security.errors import PickleRefusedError, UnverifiedDistributedError
from neuro_dask.security.events import security_log
from neuro_dask.security.hardening import (
    CLEAN_EXCEPTION_SITES,
    PICKLE_SITES,
    VERIFIED_DISTRIBUTED,
    check_distributed_version,
    hardened_clean_exception,
    hardened_loads,
)


class Payload:
    """Plain pickle.loads of this opens (creates) the marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _snapshot() -> dict[tuple[str, str], object]:
    """Every object install() replaces, by where it lives."""
    saved = {(m, a): getattr(importlib.import_module(m), a) for m, a in PICKLE_SITES}
    saved.update({(m, "clean_exception"): importlib.import_module(m).clean_exception for m in CLEAN_EXCEPTION_SITES})
    saved["distributed.comm.tcp", "read_bytes_rw"] = tcp.read_bytes_rw
    saved["distributed.comm.tcp", "TCP.read"] = tcp.TCP.__dict__["read"]
    saved["distributed.comm.tcp", "TLSListener._prepare_stream"] = tcp.TLSListener.__dict__["_prepare_stream"]
    return saved


def _same_objects(a: dict, b: dict) -> list:
    assert a.keys() == b.keys()
    return [key for key in a if a[key] is not b[key]]


@pytest.fixture
def events():
    security_log.clear()
    yield security_log
    security_log.clear()


@pytest.fixture
def originals():
    assert not hardening.is_installed(), "an earlier test left hardened mode installed"
    limit = hardening._max_message_bytes[0]
    saved = _snapshot()
    try:
        yield saved
    finally:
        hardening.uninstall()
        hardening._max_message_bytes[0] = limit


@pytest.fixture
def hardened(originals, events):
    hardening.install()
    return originals


# ---- the version gate ----------------------------------------------------------------------------


def test_an_unverified_distributed_is_refused():
    with pytest.raises(UnverifiedDistributedError) as info:
        check_distributed_version("2099.1.0")
    err = info.value
    assert err.found == "2099.1.0" and err.verified == VERIFIED_DISTRIBUTED
    assert "2099.1.0" in str(err) and f"distributed=={VERIFIED_DISTRIBUTED[-1]}" in str(err)


def test_the_installed_distributed_is_verified():
    assert distributed.__version__ in VERIFIED_DISTRIBUTED
    assert check_distributed_version() is None
    assert check_distributed_version(distributed.__version__) is None


def test_install_refuses_an_unverified_distributed_and_patches_nothing(originals, monkeypatch):
    monkeypatch.setattr(hardening.distributed, "__version__", "2099.1.0")
    with pytest.raises(UnverifiedDistributedError):
        hardening.install()
    assert not hardening.is_installed()
    assert _same_objects(originals, _snapshot()) == []


# ---- install and uninstall -----------------------------------------------------------------------


def test_install_replaces_every_pickle_site(hardened):
    shims = set()
    for module_name, attribute in PICKLE_SITES:
        value = getattr(importlib.import_module(module_name), attribute)
        if attribute == "pickle":
            assert isinstance(value, hardening._PickleModule), module_name
            shims.add(id(value))
        else:
            assert value is hardened_loads, (module_name, attribute)
    assert len(shims) == 1  # one stand-in module shared by every site
    for module_name in CLEAN_EXCEPTION_SITES:
        assert importlib.import_module(module_name).clean_exception is hardened_clean_exception
    assert tcp.read_bytes_rw.__wrapped__ is hardened[("distributed.comm.tcp", "read_bytes_rw")]
    assert tcp.TCP.read.__wrapped__ is hardened[("distributed.comm.tcp", "TCP.read")]
    assert (
        tcp.TLSListener._prepare_stream.__wrapped__ is hardened[("distributed.comm.tcp", "TLSListener._prepare_stream")]
    )
    assert hardening.is_installed()
    assert _same_objects(hardened, _snapshot()) == list(hardened)  # every one replaced


def test_the_pickle_shim_refuses_loads_and_keeps_the_rest(hardened, tmp_path, events):
    shim = importlib.import_module("distributed.client").pickle
    marker = tmp_path / "marker"
    with pytest.raises(PickleRefusedError):
        shim.loads(pickle.dumps(Payload(marker)))
    with pytest.raises(PickleRefusedError):
        shim.load(io.BytesIO(pickle.dumps(Payload(marker))))
    assert not marker.exists()
    assert [(e.kind, e.detail) for e in events.events()] == [("pickle", "io.open")] * 2
    # Everything but loading is the stdlib's.
    assert shim.HIGHEST_PROTOCOL == pickle.HIGHEST_PROTOCOL
    assert shim.PickleBuffer is pickle.PickleBuffer and shim.UnpicklingError is pickle.UnpicklingError
    value = {"a": [1, 2.5], "b": ("x", None)}
    assert shim.loads(shim.dumps(value)) == value
    assert shim.load(io.BytesIO(shim.dumps(value, protocol=shim.HIGHEST_PROTOCOL))) == value
    # numpy's reconstructors are off the bounded loader's list (the type confusion): even the
    # scheduler's and the operator's pickles carry no arrays (arrays travel as raw frames).
    array = np.random.default_rng(7).standard_normal((3, 4)).astype(np.float32)
    bufs: list = []
    with pytest.raises(PickleRefusedError):
        shim.loads(shim.dumps(array, protocol=5, buffer_callback=bufs.append), buffers=bufs)


def test_distributed_loads_refuses_and_reports_the_peer(hardened, tmp_path, events):
    marker = tmp_path / "marker"

    def from_peer():
        hardening.current_peer.set("tls://198.51.100.7:4444")
        hardening.current_identity.set("client:mallory")
        return distributed.protocol.pickle.loads(pickle.dumps(Payload(marker)))

    with pytest.raises(PickleRefusedError) as info:
        contextvars.copy_context().run(from_peer)
    assert info.value.peer == "tls://198.51.100.7:4444"
    assert not marker.exists()
    [event] = events.events()
    assert (event.kind, event.peer, event.detail, event.identity) == (
        "pickle",
        "tls://198.51.100.7:4444",
        "io.open",
        "client:mallory",
    )
    # Without a peer in the context the refusal is still recorded.
    with pytest.raises(PickleRefusedError):
        distributed.protocol.pickle.loads(pickle.dumps(Payload(marker)))
    assert [e.peer for e in events.events("pickle")] == ["tls://198.51.100.7:4444", None]


def test_allowed_data_still_loads_through_distributed(hardened):
    value = {"keys": ("a", "b"), "sizes": [1, 2], "when": None}
    assert distributed.protocol.pickle.loads(dpickle.dumps(value)) == value
    assert distributed.protocol.pickle.loads(dpickle.dumps(bytes)) is bytes
    with pytest.raises(PickleRefusedError):  # arrays are raw frames on a hardened network, never pickles
        distributed.protocol.pickle.loads(dpickle.dumps(np.arange(12, dtype=np.int64)))


@pytest.mark.parametrize("path", ["message", "pickle-family", "dask-family-type-header"])
def test_distributeds_message_paths_refuse_a_payload(hardened, tmp_path, events, path):
    marker = tmp_path / "marker"
    with pytest.raises(PickleRefusedError):
        if path == "message":  # a ToPickle inside a message: the comm's own decoder
            frames = distributed.protocol.dumps({"op": "x", "data": ToPickle(Payload(marker))})
            distributed.protocol.loads(frames)
        elif path == "pickle-family":
            header, frames = serialize(Payload(marker), serializers=["pickle"])
            deserialize(header, frames)
        else:
            header, frames = serialize(np.arange(3), serializers=["dask"])
            header["type-serialized"] = pickle.dumps(Payload(marker))
            deserialize(header, frames)
    assert not marker.exists()
    assert [e.kind for e in events.events()] == ["pickle"]


def _pickled_error() -> bytes:
    try:
        raise ValueError("remote failure")
    except ValueError as exc:
        tblib.pickling_support.install(exc)
        return dpickle.dumps(exc)


@pytest.mark.parametrize("module_name", CLEAN_EXCEPTION_SITES)
def test_clean_exception_loads_errors_and_drops_tracebacks(hardened, tmp_path, module_name):
    clean_exception = importlib.import_module(module_name).clean_exception
    typ, exc, tb = clean_exception(exception=_pickled_error(), traceback=b"ignored")
    assert (typ, exc.args, tb) == (ValueError, ("remote failure",), None)
    marker = tmp_path / "marker"
    typ, exc, tb = clean_exception(exception=pickle.dumps(Payload(marker)), traceback=None)
    assert typ is Exception and "would not unpickle" in str(exc) and tb is None
    assert not marker.exists()
    typ, exc, _ = clean_exception(exception="plain text")
    assert typ is Exception and exc.args == ("plain text",)


def test_install_is_idempotent_and_uninstall_restores_everything(originals, events):
    hardening.install(max_message_bytes=1 << 20)
    hardening.install(max_message_bytes=1 << 10)  # updates the limit, wraps nothing twice
    assert hardening._max_message_bytes[0] == 1 << 10
    assert tcp.TCP.read.__wrapped__ is originals[("distributed.comm.tcp", "TCP.read")]
    hardening.uninstall()
    assert not hardening.is_installed()
    assert _same_objects(originals, _snapshot()) == []
    # The stdlib loaders are back where they were, so a plain pickle would load again.
    for module_name, attribute in PICKLE_SITES:
        if attribute == "pickle":
            assert importlib.import_module(module_name).pickle is pickle
    assert distributed.protocol.pickle.loads is originals[("distributed.protocol.pickle", "loads")]
    assert distributed.protocol.pickle.loads is not hardened_loads


def test_uninstall_without_install_changes_nothing(originals):
    hardening.uninstall()
    hardening.uninstall()
    assert _same_objects(originals, _snapshot()) == []


def test_a_message_over_the_limit_is_refused_before_it_is_read(originals, events):
    hardening.install(max_message_bytes=100)

    class Stream:
        def __init__(self):
            self.asked = 0

        async def read_into(self, buf):
            self.asked += len(buf)
            buf[:] = b"x" * len(buf)
            return len(buf)

    stream = Stream()
    with pytest.raises(ValueError, match="exceeds"):
        asyncio.run(tcp.read_bytes_rw(stream, 1000))
    assert stream.asked == 0
    assert [(e.kind, e.detail) for e in events.events()] == [("message-size", "1000 bytes announced, limit 100")]
    assert bytes(asyncio.run(tcp.read_bytes_rw(stream, 100))) == b"x" * 100


def test_reads_are_tagged_with_the_peer_and_its_certificate():
    cert = {
        "subject": ((("organizationalUnitName", "neuro-dask-client"),), (("commonName", "alice"),)),
        "subjectAltName": (("URI", "neuro-dask://client/alice"),),
    }

    class Comm:
        peer_address = "tls://192.0.2.1:999"
        extra_info = {"peercert": cert}

    async def original(self, deserializers=None):
        return hardening.current_peer.get(), hardening.current_identity.get(), deserializers

    read = hardening._peer_tagging_read(original)
    assert read.__wrapped__ is original
    assert asyncio.run(read(Comm(), "d")) == ("tls://192.0.2.1:999", "client:alice", "d")
    Comm.extra_info = {}
    assert asyncio.run(read(Comm(), None)) == ("tls://192.0.2.1:999", None, None)


def test_a_failed_handshake_is_reported(events):
    async def original(self, stream, address):
        return None  # what distributed's listener returns when the handshake fails

    prepare = hardening._reporting_prepare_stream(original)
    assert asyncio.run(prepare(object(), object(), "192.0.2.5:1234")) is None
    assert [(e.kind, e.peer) for e in events.events()] == [("tls-handshake", "192.0.2.5:1234")]


# ---- every pickle loader distributed calls is covered -------------------------------------------

PACKAGE = Path(distributed.__file__).parent

# The loader calls the scan must find (the brief regexes); comments are stripped first.
HIT_PATTERNS = [
    re.compile(p)
    for p in (r"\bpickle\.loads\(", r"\bcloudpickle\.loads\(", r"\bpickle\.load\(", r"\bUnpickler\(", r"\bloads\(")
]
# Calls that are not pickle loaders at all.
NOT_HITS = re.compile(r"\b(json|msgpack)\.loads\(|\bdef\s+loads\(")
# One call: an optional dotted receiver, then the loader.
CALL = re.compile(r"(?<![\w.])((?:[A-Za-z_]\w*\.)*)(loads|load|Unpickler)\(")

# Local variables named `loads` that hold a deserializer from a registry, not a pickle loader:
# (file, enclosing function) -> why that is not a pickle path of its own.
REGISTRY_LOADS = {
    (
        "protocol/serialize.py",
        "dask_loads",
    ): "loads = dask_deserialize.dispatch(typ): the deserializer registered for a type the restricted "
    "loader already let through (header['type-serialized']); registered ones live in scanned modules",
    (
        "protocol/serialize.py",
        "deserialize",
    ): "dumps, loads, wants_context = families[name]: a serialization family's loader (pickle_loads, "
    "dask_loads, msgpack), each scanned in serialize.py",
    ("protocol/cuda.py", "cuda_loads"): "loads = cuda_deserialize.dispatch(typ): as dask_loads, for the cuda family",
}

# Loaders by full name that do not unpickle themselves.
NOT_PICKLE_LOADERS = {
    "distributed.protocol.loads": "the comm's msgpack frame decoder (protocol/core.py); its pickle calls are "
    "scanned in protocol/core.py",
}


@dataclass(frozen=True)
class Hit:
    file: str
    line: int
    code: str
    explanation: str | None  # None: not explained


def _strip_comments(source: str) -> list[str]:
    lines = source.splitlines()
    try:
        for tok in tokenize.generate_tokens(io.StringIO(source).readline):
            if tok.type == tokenize.COMMENT:
                row, col = tok.start
                lines[row - 1] = lines[row - 1][:col]
    except (tokenize.TokenError, IndentationError):
        pass
    return lines


def _import_target(node: ast.Import | ast.ImportFrom, alias: ast.alias, module_name: str) -> tuple[str, str]:
    """(local name, dotted name it is bound to)."""
    if isinstance(node, ast.Import):
        local = alias.asname or alias.name.split(".")[0]
        return local, (alias.name if alias.asname else alias.name.split(".")[0])
    base = node.module or ""
    if node.level:
        package = module_name.rsplit(".", node.level)[0]
        base = f"{package}.{base}" if base else package
    return alias.asname or alias.name, f"{base}.{alias.name}"


def _bindings(nodes, module_name: str) -> dict[str, list[tuple[str, str | None]]]:
    """name -> [(kind, dotted target)] for imports and assignments among `nodes` (not nested defs)."""
    found: dict[str, list[tuple[str, str | None]]] = {}
    stack = list(nodes)
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            for alias in node.names:
                local, target = _import_target(node, alias, module_name)
                found.setdefault(local, []).append(("import", target))
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            found.setdefault(node.id, []).append(("assign", None))
        elif isinstance(node, ast.arg):
            found.setdefault(node.arg, []).append(("assign", None))
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            found.setdefault(node.name, []).append(("assign", None))
            continue  # a nested scope binds its own names
        if isinstance(node, ast.Lambda):
            continue
        stack.extend(ast.iter_child_nodes(node))
    return found


def _enclosing_functions(tree: ast.Module, line: int) -> list[ast.FunctionDef | ast.AsyncFunctionDef]:
    """Functions containing `line`, innermost first."""
    chain = [
        node
        for node in ast.walk(tree)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        and node.lineno <= line <= (node.end_lineno or node.lineno)
    ]
    return sorted(chain, key=lambda node: node.lineno, reverse=True)


def _explain_call(rel: str, module_name: str, tree: ast.Module, line: int, receiver: str, func: str) -> str | None:
    parts = [p for p in receiver.split(".") if p]
    root = parts[0] if parts else func
    functions = _enclosing_functions(tree, line)
    sites = set(PICKLE_SITES)
    # distributed.protocol.pickle.loads itself calls the stdlib: it is the function install() replaces.
    if module_name == "distributed.protocol.pickle" and functions and functions[-1].name == "loads":
        if ("distributed.protocol.pickle", "loads") in sites and parts == ["pickle"]:
            return "the loads install() replaces"
    scope, bound = "module", None
    for function in functions:
        args = function.args
        arguments = [*args.posonlyargs, *args.args, *args.kwonlyargs, *filter(None, (args.vararg, args.kwarg))]
        local = _bindings([*arguments, *function.body], module_name).get(root)
        if local:
            scope, bound = "function", local
            break
    if bound is None:
        bound = _bindings(tree.body, module_name).get(root)
    if not bound:
        return None
    if any(kind == "assign" for kind, _ in bound):
        if not parts and scope == "function" and (rel, functions[0].name) in REGISTRY_LOADS:
            return "registry: " + REGISTRY_LOADS[rel, functions[0].name]
        return None
    targets = {target for _, target in bound}
    if len(targets) != 1:
        return None
    target = targets.pop()
    full = ".".join([target, *parts[1:], func]) if parts else target
    if full.startswith("cloudpickle.") or func == "Unpickler":
        return None  # neither is ever covered: no site replaces them
    if full in NOT_PICKLE_LOADERS:
        return "not a pickle loader: " + NOT_PICKLE_LOADERS[full]
    if full == "distributed.protocol.pickle.loads" and (parts or scope == "function"):
        # looked up on the module at call time (or imported at call time): the patched function
        return "distributed.protocol.pickle.loads" if ("distributed.protocol.pickle", "loads") in sites else None
    if full in ("pickle.loads", "pickle.load", "distributed.protocol.pickle.loads") and scope == "module":
        # the module holds its own reference: install() must replace it in this module
        name = root
        if parts and target == "pickle" and (module_name, name) in sites:
            return f"PICKLE_SITES ({module_name}, {name!r}): the restricted pickle module"
        if not parts and (module_name, name) in sites:
            return f"PICKLE_SITES ({module_name}, {name!r}): hardened_loads"
    return None


def scan_source(rel: str, module_name: str, source: str) -> list[Hit]:
    if not any(pattern.search(source) for pattern in HIT_PATTERNS):
        return []  # the quick path for most of distributed's files
    tree = ast.parse(source)
    hits = []
    for number, line in enumerate(_strip_comments(source), start=1):
        code = NOT_HITS.sub("", line)
        if not any(pattern.search(code) for pattern in HIT_PATTERNS):
            continue
        calls = [
            m
            for m in CALL.finditer(code)
            if m.group(2) != "load" or m.group(1).rstrip(".").split(".")[-1] in ("pickle", "cloudpickle")
        ]
        explanations = [_explain_call(rel, module_name, tree, number, m.group(1), m.group(2)) for m in calls]
        explained = None if not calls or None in explanations else "; ".join(sorted(set(explanations)))
        hits.append(Hit(rel, number, line.strip(), explained))
    return hits


def scan_distributed() -> list[Hit]:
    hits = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).as_posix()
        if "tests" in path.relative_to(PACKAGE).parts:
            continue
        module_name = "distributed." + rel[:-3].replace("/", ".").removesuffix(".__init__")
        hits += scan_source(rel, module_name, path.read_text(encoding="utf-8"))
    return hits


@pytest.fixture(scope="module")
def distributed_hits() -> list[Hit]:
    return scan_distributed()


def test_every_pickle_loader_in_distributed_is_covered(distributed_hits):
    unexplained = [f"{h.file}:{h.line}: {h.code}" for h in distributed_hits if h.explanation is None]
    assert unexplained == [], (
        "pickle loaders that hardened mode does not cover (add a PICKLE_SITES entry, "
        "or document why not):\n" + "\n".join(unexplained)
    )


def test_the_scan_finds_the_known_loaders(distributed_hits):
    # A broken pattern must not make the coverage test pass by finding nothing.
    files = {h.file for h in distributed_hits}
    assert {
        "worker.py",
        "scheduler.py",
        "client.py",
        "core.py",
        "nanny.py",
        "protocol/core.py",
        "protocol/numpy.py",
        "protocol/pickle.py",
        "protocol/serialize.py",
        "shuffle/_core.py",
        "shuffle/_pickle.py",
    } <= files
    assert len(distributed_hits) >= 20
    assert not any("/tests/" in h.file or h.file.startswith("tests/") for h in distributed_hits)
    kinds = {h.explanation.split(":")[0].split(" (")[0] for h in distributed_hits if h.explanation}
    assert {
        "distributed.protocol.pickle.loads",
        "PICKLE_SITES",
        "registry",
        "the loads install() replaces",
        "not a pickle loader",
    } <= kinds


def test_every_pickle_site_and_documented_exception_is_used(distributed_hits):
    explanations = " | ".join(h.explanation for h in distributed_hits if h.explanation)
    for module_name, attribute in PICKLE_SITES:
        if (module_name, attribute) == ("distributed.protocol.pickle", "loads"):
            assert "distributed.protocol.pickle.loads" in explanations
        else:
            assert f"PICKLE_SITES ({module_name}, {attribute!r})" in explanations, (module_name, attribute)
    for why in (*REGISTRY_LOADS.values(), *NOT_PICKLE_LOADERS.values()):
        assert why in explanations


@pytest.mark.parametrize(
    "dropped, file, line_text",
    [
        (("distributed.shuffle._core", "pickle"), "shuffle/_core.py", "pickle.loads(data)"),
        (("distributed.client", "loads"), "client.py", "exc = loads(resp)"),
        (("distributed.protocol.pickle", "loads"), "worker.py", "function = pickle.loads(function)"),
    ],
)
def test_a_site_missing_from_pickle_sites_is_reported(monkeypatch, dropped, file, line_text):
    monkeypatch.setitem(globals(), "PICKLE_SITES", tuple(site for site in PICKLE_SITES if site != dropped))
    module_name = "distributed." + file[:-3].replace("/", ".")
    hits = scan_source(file, module_name, (PACKAGE / file).read_text(encoding="utf-8"))
    unexplained = [h.code for h in hits if h.explanation is None]
    assert any(line_text in code for code in unexplained), unexplained


SYNTHETIC = [
    # (id, module, source, explained)
    (
        "stdlib-pickle-unpatched-module",
        "distributed.fake",
        "import pickle\ndef f(x):\n    return pickle.loads(x)\n",
        False,
    ),
    ("stdlib-pickle-in-a-site", "distributed.client", "import pickle\ndef f(x):\n    return pickle.loads(x)\n", True),
    (
        "stdlib-pickle.load-in-a-site",
        "distributed.client",
        "import pickle\ndef f(x):\n    return pickle.load(x)\n",
        True,
    ),
    ("stdlib-pickle-aliased", "distributed.client", "import pickle as p\ndef f(x):\n    return p.loads(x)\n", False),
    (
        "stdlib-pickle-imported-in-the-function",
        "distributed.client",
        "def f(x):\n    import pickle\n    return pickle.loads(x)\n",
        False,
    ),
    ("cloudpickle", "distributed.client", "import cloudpickle\ndef f(x):\n    return cloudpickle.loads(x)\n", False),
    ("Unpickler", "distributed.client", "import pickle\ndef f(x):\n    return pickle.Unpickler(x).load()\n", False),
    ("marshal", "distributed.client", "import marshal\ndef f(x):\n    return marshal.loads(x)\n", False),
    (
        "bound-loads-unpatched-module",
        "distributed.fake",
        "from distributed.protocol.pickle import loads\ndef f(x):\n    return loads(x)\n",
        False,
    ),
    (
        "bound-loads-in-a-site",
        "distributed.scheduler",
        "from distributed.protocol.pickle import loads\ndef f(x):\n    return loads(x)\n",
        True,
    ),
    (
        "bound-loads-imported-in-the-function",
        "distributed.fake",
        "def f(x):\n    from distributed.protocol.pickle import loads\n    return loads(x)\n",
        True,
    ),
    (
        "protocol-pickle-module",
        "distributed.fake",
        "from distributed.protocol import pickle\ndef f(x):\n    return pickle.loads(x)\n",
        True,
    ),
    (
        "protocol-attribute",
        "distributed.fake",
        "from distributed import protocol\ndef f(x):\n    return protocol.pickle.loads(x)\n",
        True,
    ),
    (
        "relative-import",
        "distributed.protocol.fake",
        "from . import pickle\ndef f(x):\n    return pickle.loads(x)\n",
        True,
    ),
    (
        "undocumented-local-loads",
        "distributed.fake",
        "def f(typ, x):\n    loads = registry.dispatch(typ)\n    return loads(x)\n",
        False,
    ),
    ("unbound-name", "distributed.fake", "def f(x):\n    return loads(x)\n", False),
    (
        "shadowed-by-a-nested-def",
        "distributed.scheduler",
        "from distributed.protocol.pickle import loads\ndef f(x):\n    def loads(y):\n        return y\n"
        "    return loads(x)\n",
        False,
    ),
    (
        "a-parameter-named-pickle",
        "distributed.client",
        "import pickle\ndef f(pickle, x):\n    return pickle.loads(x)\n",
        False,
    ),
    (
        "two-calls-one-bad",
        "distributed.client",
        "import pickle, marshal\ndef f(x):\n    return pickle.loads(x), marshal.loads(x)\n",
        False,
    ),
]


@pytest.mark.parametrize("module_name, source, explained", [pytest.param(*c[1:], id=c[0]) for c in SYNTHETIC])
def test_the_scan_classifies(module_name, source, explained):
    [hit] = scan_source(module_name.removeprefix("distributed.").replace(".", "/") + ".py", module_name, source)
    assert (hit.explanation is not None) is explained, hit


@pytest.mark.parametrize(
    "source",
    [
        "import json\ndef f(x):\n    return json.loads(x)  # pickle.loads(x) in a comment\n",
        "import msgpack\ndef f(x):\n    return msgpack.loads(x)\n",
        "def loads(x):\n    return x\n",
        "# cloudpickle.loads(x)\n",
    ],
)
def test_the_scan_ignores_what_is_not_a_pickle_loader(source):
    assert scan_source("fake.py", "distributed.fake", source) == []
