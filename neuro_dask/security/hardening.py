"""Hardened mode, process side: plain data from workers and clients, a bounded loader for the rest.

Two layers. First, the read path: every message a tcp:// or tls:// comm reads is decoded by
plain_wire.py unless the peer's certificate says scheduler or operator, so a worker, a client
or a peer without a certificate cannot get a single pickle opcode parsed, whatever op it sends
(`_plain_unless_trusted`, in distributed's `from_frames`); errors go out as text
(`plain_error_message`), and an error a non-trusted peer sends as a pickle is never loaded
(`hardened_clean_exception`). Second, for what trusted peers may still pickle:

distributed loads pickles in a handful of places (dask/distributed#9283): the comm protocol's
`__Pickled__` frames and pickle serialization family, the `dask` family's type headers, numpy's
object arrays, exceptions and tracebacks, plugins, `run`/`run_on_scheduler`, warnings forwarded
to clients, P2P shuffles. Almost all of them call `distributed.protocol.pickle.loads`; the rest
call the stdlib `pickle` module that client.py, scheduler.py and the shuffle modules import.
`install()` replaces exactly those names (PICKLE_SITES) with the bounded restricted loader, caps the
size of a message before its bytes are allocated, and remembers which peer each message came
from so that a refusal is reported with its address. tests/unit/test_hardening_install.py re-reads
distributed's source and fails when a loads call appears anywhere this list does not cover,
and `install()` refuses to run on a distributed version it was not verified against.

Process-wide by nature (it patches modules), so one switch per process: `neuro-dask
scheduler|worker` and `neuro_dask.harden()` turn it on; `uninstall()` exists for tests.
"""

from __future__ import annotations

import contextvars
import importlib
import logging
import pickle as stdlib_pickle
import types
from collections.abc import Callable
from typing import Any

import distributed

from neuro_dask.security import mode
from neuro_dask.security.allowlist import SUBSTITUTES, is_allowed, is_named_only
from neuro_dask.security.errors import PickleRefusedError, UnverifiedDistributedError
from neuro_dask.security.events import SecurityEvent, security_log

log = logging.getLogger(__name__)

VERIFIED_DISTRIBUTED: tuple[str, ...] = ("2026.8.0",)

# (module, attribute) pairs that hold a pickle loader: a function named `loads`, or the module
# `pickle` whose `.loads` the module calls.
PICKLE_SITES: tuple[tuple[str, str], ...] = (
    ("distributed.protocol.pickle", "loads"),  # protocol, serialize, numpy, cuda, core, worker, nanny
    ("distributed.client", "loads"),
    ("distributed.client", "pickle"),  # warnings forwarded from workers
    ("distributed.scheduler", "loads"),
    ("distributed.scheduler", "pickle"),  # run_on_scheduler, keys of stimulus messages
    ("distributed.shuffle._core", "pickle"),
    ("distributed.shuffle._pickle", "pickle"),
)

# Where distributed turns an error message back into an exception. Hardened mode loads the
# exception through the allow-list and drops the remote traceback: tblib rebuilds tracebacks
# by compiling code objects, and distributed's own fallback (a traceback as text) trips an
# assert in the original.
CLEAN_EXCEPTION_SITES: tuple[str, ...] = (
    "distributed.core",
    "distributed.client",
    "distributed.shuffle._worker_plugin",
    "distributed.shuffle._comms",
)

current_peer: contextvars.ContextVar[str | None] = contextvars.ContextVar("neuro_current_peer", default=None)
# "role:name" from the peer's certificate, on TLS comms.
current_identity: contextvars.ContextVar[str | None] = contextvars.ContextVar("neuro_current_identity", default=None)
# The comm whose message is being decoded: from_frames has no comm argument, the read sets this.
_reading_comm: contextvars.ContextVar[Any] = contextvars.ContextVar("neuro_reading_comm", default=None)

# Certificates whose messages may still carry pickles (through the bounded loader). Everyone
# else, workers, clients and peers without a certificate, sends plain data (plain_wire.py).
PICKLE_ROLES = frozenset({"scheduler", "operator"})
# The comm kinds hardened mode covers; a server listening on another kind would bypass the checks.
# relay:// comms are distributed's own TCP and TLS comms over a relayed stream (relay/comm.py).
COVERED_PREFIXES = ("tcp://", "tls://", "inproc://", "relay://")

_installed: dict[tuple[str, str], Any] = {}
_max_message_bytes: list[int] = [0]


def check_distributed_version(version: str | None = None) -> None:
    found = version or distributed.__version__
    if found not in VERIFIED_DISTRIBUTED:
        raise UnverifiedDistributedError(found, VERIFIED_DISTRIBUTED)


def hardened_loads(x, *, buffers=()) -> Any:
    """Drop-in for distributed.protocol.pickle.loads and pickle.loads."""
    peer = current_peer.get()
    try:
        if buffers:
            return _restricted(x, buffers, peer)
        return _restricted(x, None, peer)
    except PickleRefusedError as exc:
        report("pickle", peer, f"{exc.module}.{exc.name}", current_identity.get())
        raise


def _restricted(x, buffers, peer):
    from neuro_dask.security.unpickle import restricted_loads

    return restricted_loads(
        x, allowed=is_allowed, buffers=buffers, peer=peer, named_only=is_named_only, substitutes=SUBSTITUTES
    )


def hardened_clean_exception(exception=None, traceback=None, **_ignored):
    """Drop-in for distributed.core.clean_exception: (type, exception, None). An error a worker,
    a client or a peer without a certificate sends as a pickle is never loaded (it is refused
    and reported, and stands as a plain Exception); hardened peers send errors as text."""
    if isinstance(exception, (bytes, bytearray, memoryview)):
        comm = _reading_comm.get()
        if comm is not None and not pickles_trusted(comm):
            report("plain-data", getattr(comm, "peer_address", None), "an error sent as a pickle", _comm_identity(comm))
            exception = Exception("a remote error sent as a pickle, which hardened mode does not load")
        else:
            try:
                exception = hardened_loads(exception)
            except Exception:
                exception = Exception("a remote error that hardened mode would not unpickle")
    elif isinstance(exception, str):
        exception = Exception(exception)
    if exception is not None and not isinstance(exception, Exception):
        exception = Exception(repr(exception)[:2000])
    return type(exception), exception, None


def report(kind: str, peer: str | None, detail: str, identity: str | None = None) -> SecurityEvent:
    event = security_log.record(kind, peer, detail, identity)
    log.warning(
        "security: refused %s from %s%s: %s",
        kind,
        peer or "an unknown peer",
        f" ({identity})" if identity else "",
        detail,
    )
    return event


class _PickleModule(types.ModuleType):
    """Stands in for the stdlib `pickle` inside one distributed module: loads is restricted."""

    def __init__(self) -> None:
        super().__init__("pickle", "the stdlib pickle with hardened mode's restricted loads")

    @staticmethod
    def loads(data, /, *, buffers=(), **_ignored):
        return hardened_loads(data, buffers=buffers)

    def load(self, file, /, **_ignored):
        return hardened_loads(file.read())

    def __getattr__(self, name: str) -> Any:
        return getattr(stdlib_pickle, name)


def _limited_read_bytes_rw(original: Callable) -> Callable:
    async def read_bytes_rw(stream, n: int):
        limit = _max_message_bytes[0]
        if limit and n > limit:
            # Refuse before allocating: the frame size is the peer's claim, not data we hold.
            report("message-size", current_peer.get(), f"{n} bytes announced, limit {limit}", current_identity.get())
            raise ValueError(f"message of {n} bytes exceeds neuro.security.max-message-bytes ({limit})")
        return await original(stream, n)

    read_bytes_rw.__wrapped__ = original
    return read_bytes_rw


def _peer_tagging_read(original: Callable) -> Callable:
    async def read(self, deserializers=None):
        # Set in the reading task's context, so the handler that runs next sees it too.
        current_peer.set(self.peer_address)
        current_identity.set(_comm_identity(self))
        _reading_comm.set(self)
        return await original(self, deserializers)

    read.__wrapped__ = original
    return read


def pickles_trusted(comm) -> bool:
    """Whether this comm's peer may send pickles at all: a scheduler or operator certificate."""
    identity = comm_identity(comm)
    return identity is not None and identity.role in PICKLE_ROLES


def _plain_unless_trusted(original: Callable) -> Callable:
    """distributed.comm.tcp's from_frames: a message from a worker, a client or a peer without a
    certificate is decoded as plain data, refused before anything in it is parsed as a pickle or
    a serialized object; only scheduler and operator certificates reach distributed's loader,
    and through it the bounded one (allowlist.py)."""

    async def from_frames(frames, deserialize=True, deserializers=None, allow_offload=True):
        comm = _reading_comm.get()
        if comm is not None and pickles_trusted(comm):
            return await original(
                frames, deserialize=deserialize, deserializers=deserializers, allow_offload=allow_offload
            )
        # No comm known (a read path that did not go through TCP.read): plain, failing closed.
        from neuro_dask.security.errors import PlainDataRefusedError
        from neuro_dask.security.plain_wire import decode_plain_frames

        try:
            return decode_plain_frames(frames)
        except PlainDataRefusedError as exc:
            report("plain-data", getattr(comm, "peer_address", None), exc.reason, _comm_identity(comm))
            raise

    from_frames.__wrapped__ = original
    return from_frames


def _one_frame_unless_trusted(original: Callable) -> Callable:
    """distributed.comm.tcp's unpack_frames, which reads a message's preamble: a peer that may
    not send pickles may not announce sub-frames either, so they are refused before their bytes
    are allocated (TCP.read aborts the comm: the unread bytes would desynchronise it)."""

    def unpack_frames(b, partial=False):
        frames, buffers = original(b, partial=partial)
        if len(frames) + len(buffers) > 1:
            comm = _reading_comm.get()
            if comm is None or not pickles_trusted(comm):
                from neuro_dask.security.errors import PlainDataRefusedError

                reason = f"{len(frames) + len(buffers)} frames announced (a plain message is one msgpack frame)"
                report(
                    "plain-data",
                    getattr(comm, "peer_address", None),
                    reason,
                    _comm_identity(comm) if comm is not None else None,
                )
                raise PlainDataRefusedError(reason)
        return frames, buffers

    unpack_frames.__wrapped__ = original
    return unpack_frames


def plain_error_message(e: BaseException, status: str = "error") -> dict[str, Any]:
    """distributed.core.error_message without pickles: a hardened process tells its peers what
    went wrong as text (their hardened decoders would refuse a pickled exception, and a plain
    peer would load it); distributed's clean_exception turns the text back into an Exception."""
    text = f"{type(e).__name__}: {e}"[:4000]
    return {"status": status, "exception": text, "traceback": None, "exception_text": text, "traceback_text": ""}


def check_listeners(server) -> None:
    """Hardened mode reads tcp:// and tls:// comms (and in-process ones, which carry objects):
    a listener of another kind (ws://, ucx://) would bypass every check, so it is refused."""
    for listener in getattr(server, "listeners", []) or []:
        prefix = getattr(listener, "prefix", "") or ""
        if prefix and prefix not in COVERED_PREFIXES:
            raise RuntimeError(
                f"hardened mode covers {', '.join(COVERED_PREFIXES)} comms, not {prefix}: "
                "listen on tls:// (or tcp://) instead"
            )


def comm_identity(comm):
    """The PeerIdentity a comm's certificate states (None without TLS), parsed once per comm:
    hardened handlers ask on every message, expert calls included."""
    try:
        return comm._neuro_identity
    except AttributeError:
        from neuro_dask.security.identity import identity_from_peercert

        identity = identity_from_peercert((getattr(comm, "extra_info", None) or {}).get("peercert"))
        try:
            comm._neuro_identity = identity
        except AttributeError:  # a comm class with __slots__: parse again next time
            pass
        return identity


def _comm_identity(comm) -> str | None:
    from neuro_dask.security.identity import describe

    return describe(comm_identity(comm))


def _reporting_prepare_stream(original: Callable) -> Callable:
    async def _prepare_stream(self, stream, address):
        prepared = await original(self, stream, address)
        if prepared is None:
            report("tls-handshake", str(address), "no valid certificate from this network's CA")
        return prepared

    _prepare_stream.__wrapped__ = original
    return _prepare_stream


def _patch(module_name: str, attribute: str, value: Any) -> None:
    module = importlib.import_module(module_name)
    key = (module_name, attribute)
    if key not in _installed:
        _installed[key] = getattr(module, attribute)
    setattr(module, attribute, value)


def install(*, max_message_bytes: int = 0) -> None:
    """Turn hardened loading on in this process (idempotent)."""
    check_distributed_version()
    _max_message_bytes[0] = int(max_message_bytes)
    if is_installed():
        return
    shim = _PickleModule()
    for module_name, attribute in PICKLE_SITES:
        _patch(module_name, attribute, shim if attribute == "pickle" else hardened_loads)
    for module_name in CLEAN_EXCEPTION_SITES:
        _patch(module_name, "clean_exception", hardened_clean_exception)
    from distributed.comm import tcp

    _patch("distributed.comm.tcp", "read_bytes_rw", _limited_read_bytes_rw(tcp.read_bytes_rw))
    _patch("distributed.comm.tcp", "from_frames", _plain_unless_trusted(tcp.from_frames))
    _patch("distributed.comm.tcp", "unpack_frames", _one_frame_unless_trusted(tcp.unpack_frames))
    try:  # a hardened process that dials ws:// decodes plain too (its reads set no comm: closed)
        from distributed.comm import ws

        _patch("distributed.comm.ws", "from_frames", _plain_unless_trusted(ws.from_frames))
    except ImportError:  # pragma: no cover - tornado without websockets
        pass
    _patch("distributed.core", "error_message", plain_error_message)
    tcp.TCP.read = _peer_tagging_read(tcp.TCP.read)
    tcp.TLSListener._prepare_stream = _reporting_prepare_stream(tcp.TLSListener._prepare_stream)
    mode.set_hardened(True)
    log.info("hardened mode: restricted unpickling on (distributed %s)", distributed.__version__)


def harden(*, max_message_bytes: int | None = None) -> None:
    """Hardened mode in this process: what a data scientist calls before talking to a network of
    strangers (nd.load does it when neuro.security.hardened is set)."""
    if max_message_bytes is None:
        from neuro_dask.settings import SecuritySettings

        max_message_bytes = SecuritySettings.load().max_message_bytes
    install(max_message_bytes=max_message_bytes)


def uninstall() -> None:
    """Undo install() (tests run hardened and ordinary clusters in one process)."""
    from distributed.comm import tcp

    for (module_name, attribute), original in _installed.items():
        setattr(importlib.import_module(module_name), attribute, original)
    _installed.clear()
    mode.set_hardened(False)
    for cls, name in ((tcp.TCP, "read"), (tcp.TLSListener, "_prepare_stream")):
        method = getattr(cls, name)
        if hasattr(method, "__wrapped__"):
            setattr(cls, name, method.__wrapped__)


def is_installed() -> bool:
    return bool(_installed)
