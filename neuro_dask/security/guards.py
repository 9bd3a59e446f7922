"""Hardened mode, server side: every operation of a scheduler, worker or nanny is checked first.

`guard_scheduler`, `guard_worker` and `guard_nanny` put a checking layer in front of a server's
request handlers and of its stream operations. For each message, in this order:

1. the role (roles.py): the peer's certificate, bound to the connection, decides; an operation
   no table lists is refused to everyone;
2. identity: a worker certificate speaks only for the worker registered under its own name (the
   address or worker a message names must be its own), a worker's name and owner are its
   certificate's whatever it asks, and on a stream the connection's own `worker`/`client` wins:
   a message that names someone else is refused, never merged in;
3. shape (schemas.py): every field typed and bounded, unknown fields refused;
4. rate: a token bucket per peer and class of operation (schemas.RATE_CLASSES).

Each refusal is a security event with the peer's address and `role:name` (events.py), and the
peer gets a plain-text error. `guard_worker` also checks every task the scheduler hands the
worker (only neuro_dask's own task functions run). Thin: the decisions are roles.py's,
schemas.py's and allowlist.py's.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable
from inspect import iscoroutinefunction
from typing import Any

from distributed.core import _expects_comm

from neuro_dask.protocol import schemas
from neuro_dask.security.allowlist import is_task_function
from neuro_dask.security.errors import RequestRefusedError, SecurityError, TaskRefusedError
from neuro_dask.security.hardening import check_listeners, comm_identity, plain_error_message, report
from neuro_dask.security.identity import PeerIdentity, describe, peer_key
from neuro_dask.security.limits import RateLimiter
from neuro_dask.security.roles import (
    NANNY_HANDLERS,
    NANNY_STREAMS,
    OWN_NAME_OPS,
    SCHEDULER_HANDLERS,
    SCHEDULER_SELF_FIELDS,
    SCHEDULER_STREAMS,
    WORKER_HANDLERS,
    WORKER_STREAMS,
    Decision,
    decide,
    stream_decision,
)

log = logging.getLogger(__name__)

# A peer's first refusal of a kind is logged at WARNING; a flood of the same is counted, not logged.
Check = Callable[[str, "PeerIdentity | None", dict], "str | None"]  # (op, identity, msg) -> why refused, or None


class RateBook:
    """Token buckets per (peer, class of operation); the operator and the scheduler are exempt."""

    # Requests per minute per class, as multiples of neuro.security.requests-per-minute (the
    # `requests` class); `control` covers cheap reads (routes every refresh, heartbeats).
    MULTIPLES = {"requests": 1, "reports": 1, "disputes": 0.1, "control": 10}

    def __init__(self, requests_per_minute: int, clock: Callable[[], float] = time.monotonic):
        self.limiters = {
            cls: RateLimiter(max(1, int(requests_per_minute * m)) if requests_per_minute else 0, clock)
            for cls, m in self.MULTIPLES.items()
        }

    def wait(self, op: str, identity: PeerIdentity | None, peer: str) -> float:
        if identity is not None and identity.role in ("operator", "scheduler"):
            return 0.0
        return self.limiters[schemas.rate_class(op)].take(peer_key(identity, peer))


class GuardedHandlers(dict):
    """A server's handler table whose lookups return a checking wrapper.

    Wrapping at lookup, not at install, covers the handlers plugins add later (ours add
    theirs once the worker has benchmarked itself) without a second pass.
    """

    def __init__(
        self,
        handlers: dict,
        decide: Callable[[str, str | None], Decision],
        check: Check | None = None,
        rates: RateBook | None = None,
    ):
        super().__init__(handlers)
        self.decide = decide
        self.check = check
        self.rates = rates
        # op -> (handler, its checking wrapper). One wrapper per handler, not one per message:
        # distributed caches per function (inspect.signature, ~10 us, in _expects_comm and
        # has_keyword), and its _expects_comm cache never forgets a function.
        self._wrappers: dict[str, tuple[Callable, Callable]] = {}

    def __getitem__(self, op: str) -> Callable:
        handler = dict.get(self, op) if isinstance(op, str) else None
        if handler is None:  # one wrapper for every op this server lacks: a peer names what it likes
            return self._unknown
        cached = self._wrappers.get(op)
        if cached is None or cached[0] is not handler:
            cached = self._wrappers[op] = (handler, self._wrap(op, handler))
        return cached[1]

    @functools.cached_property
    def _unknown(self) -> Callable:
        def unknown(comm, **_msg):
            why = "not an operation this hardened server offers (deny by default)"
            identity = comm_identity(comm)
            report("refused-op", comm.peer_address, f"?: {why}", describe(identity))
            return _refusal("?", identity.role if identity else None, comm.peer_address, why)

        return unknown

    def _wrap(self, op: str, handler: Callable) -> Callable:
        wants_comm = _expects_comm(handler)

        def guarded(comm, **msg):
            identity = comm_identity(comm)
            why = self._refusal(op, identity, comm.peer_address, msg)
            if why is not None:
                report("refused-op", comm.peer_address, f"{op}: {why}", describe(identity))
                refusal = _refusal(op, identity.role if identity else None, comm.peer_address, why)
                if op in WRITES_ITS_OWN_REPLY:
                    return _write_and_close(comm, WRITES_ITS_OWN_REPLY[op](refusal))
                return refusal
            return handler(comm, **msg) if wants_comm else handler(**msg)

        guarded.__name__ = getattr(handler, "__name__", op)
        return guarded

    def __contains__(self, op: object) -> bool:
        return dict.__contains__(self, op)

    def _refusal(self, op: str, identity: PeerIdentity | None, peer: str, msg: dict) -> str | None:
        decision = self.decide(op, identity.role if identity else None)
        if not decision.allowed:
            return decision.why
        privileged = identity is not None and identity.role in ("operator", "scheduler")
        if self.check is not None:
            why = self.check(op, identity, msg)
            if why:
                return why
        if not privileged:
            try:
                schemas.check(op, msg)
            except schemas.SchemaError as exc:
                return exc.detail
        if self.rates is not None:
            wait = self.rates.wait(op, identity, peer)
            if wait:
                return f"too many requests: retry in {wait:.1f} s (neuro.security.requests-per-minute)"
        return None


# Registrations are sent with reply=False: their handler answers on the comm itself, so a refusal
# must be written there too, in the shape the peer reads, or it would wait for an answer that
# never comes. A Client raises the stream-start's error; a Worker logs the message and stops.
WRITES_ITS_OWN_REPLY: dict[str, Callable[[dict], Any]] = {
    "register-client": lambda refusal: [{"op": "stream-start", "error": refusal["exception_text"]}],
    "register-worker": lambda refusal: {**refusal, "message": refusal["exception_text"]},
}


async def _write_and_close(comm, refusal: dict):
    from distributed.core import Status

    try:
        await comm.write(refusal)
    finally:
        await comm.close()
    return Status.dont_reply


def _refusal(op: str, role: str | None, peer: str, why: str) -> dict[str, Any]:
    # "uncaught-error" is the status distributed's rpc re-raises in the caller; plain text, no pickle.
    return plain_error_message(RequestRefusedError(op, role, peer, why), status="uncaught-error")


# ---- streams -------------------------------------------------------------------------------------


def guard_streams(
    server,
    streams: dict,
    name: str,
    kind_of: Callable[[Any, dict], str],
    rates: RateBook | None = None,
    check: Check | None = None,
) -> None:
    """Replace `server.handle_stream` (and its `connection_stream` handler) with distributed's loop
    plus a check of every stream message: the stream kind's table (roles.py), its shape
    (schemas.py), and the connection's own `worker`/`client` winning over the message's."""

    async def handle_stream(comm, extra: dict | None = None) -> None:
        extra = dict(extra or {})
        kind = kind_of(comm, extra)
        identity = comm_identity(comm)
        role = identity.role if identity else None
        required = roles_required_for(server)
        closed = False
        try:
            while not closed:
                try:
                    msgs = await comm.read()
                except OSError:  # CommClosedError among them: the peer went away
                    break
                except SecurityError:  # refused whole (and reported) before decoding: the stream goes on
                    continue
                if not isinstance(msgs, (tuple, list)):
                    msgs = (msgs,)
                for msg in msgs:
                    if msg == "OK":
                        break
                    if not isinstance(msg, dict):
                        _refuse_stream(comm, identity, "?", "a stream message must be a map")
                        continue
                    op = msg.pop("op", None)
                    if op == "close-stream":
                        closed = True
                        break
                    why = _stream_refusal(streams, kind, op, role, required, name, extra, msg, identity, check)
                    if why is None and rates is not None and isinstance(op, str):
                        wait = rates.wait(op, identity, comm.peer_address)
                        why = f"too many stream messages: slow down for {wait:.1f} s" if wait else None
                    if why is not None:
                        _refuse_stream(comm, identity, op, why)
                        continue
                    handler = server.stream_handlers[op]
                    kwargs = {**msg, **extra}  # the connection's worker/client, never the message's
                    if iscoroutinefunction(handler):
                        await handler(**kwargs)
                    else:
                        handler(**kwargs)
                await asyncio.sleep(0)
        finally:
            await comm.close()

    server.handle_stream = handle_stream
    if "connection_stream" in server.handlers:
        dict.__setitem__(server.handlers, "connection_stream", handle_stream)


def _stream_refusal(
    streams: dict,
    kind: str,
    op: Any,
    role: str | None,
    required: bool,
    name: str,
    extra: dict,
    msg: dict,
    identity: PeerIdentity | None,
    check: Check | None,
) -> str | None:
    decision = stream_decision(streams, kind, op, role, roles_required=required, server=name)
    if not decision.allowed:
        return decision.why
    spoofed = sorted(k for k in extra if k in msg and msg[k] != extra[k])
    if spoofed:
        return f"the message names {spoofed[0]} {msg[spoofed[0]]!r:.80}, but this stream is {extra[spoofed[0]]!r:.80}'s"
    for k in extra:
        msg.pop(k, None)
    if kind != "scheduler" and (identity is None or identity.role not in ("operator", "scheduler")):
        try:
            schemas.check(op, msg, stream=True)
        except schemas.SchemaError as exc:
            return exc.detail
    if check is not None:
        return check(f"stream:{op}", identity, msg)
    return None


def _refuse_stream(comm, identity: PeerIdentity | None, op: Any, why: str) -> None:
    report("refused-op", comm.peer_address, f"stream {op!s:.60}: {why}", describe(identity))


# ---- the scheduler ---------------------------------------------------------------------------------

# Topics a worker may write to the scheduler's event log: its own, neuro's, and the refusals it
# forwards. Never neuro-trust or neuro-ledger, which only the scheduler's evidence writes.
WORKER_EVENT_TOPICS = frozenset({"neuro", "neuro-security"})


def _scheduler_check(scheduler) -> Check:
    def check(op: str, identity: PeerIdentity | None, msg: dict) -> str | None:
        _bind_worker_name(op, identity, msg)
        _without_task_state(op, identity, msg)
        why = _names_itself(scheduler, op, identity, msg)
        if why is None and op in ("log_event", "stream:log-event"):
            why = _event_topic(scheduler, identity, msg)
        return why

    return check


def _names_itself(scheduler, op: str, identity: PeerIdentity | None, msg: dict) -> str | None:
    """Why a worker certificate may not do `op` for the worker it names (None: it names itself)."""
    if identity is None or identity.role != "worker" or op not in SCHEDULER_SELF_FIELDS:
        return None
    named = msg.get(SCHEDULER_SELF_FIELDS[op])
    ws = scheduler.workers.get(named) if isinstance(named, str) else None
    if ws is None and op == "neuro_volunteer":  # worker-status may name the worker by its name
        ws = next((w for w in scheduler.workers.values() if str(w.name) == named), None)
    if ws is None and op in HARMLESS_WHEN_UNKNOWN and isinstance(named, str):
        # No worker holds that address: the scheduler answers "already-removed" or "missing" and
        # changes nothing. A nanny unregisters its worker after the scheduler already removed it
        # (its router dropped the connection); refusing that stopped the nanny restarting it.
        return None
    if ws is None or str(ws.name) != identity.name:
        return "a worker certificate may speak only for its own worker"
    return None


HARMLESS_WHEN_UNKNOWN = frozenset({"unregister", "heartbeat_worker"})


def _event_topic(scheduler, identity: PeerIdentity | None, msg: dict) -> str | None:
    if identity is None or identity.role != "worker":
        return None
    topic = msg.get("topic")
    own = {a for a, ws in scheduler.workers.items() if str(ws.name) == identity.name}
    if topic not in WORKER_EVENT_TOPICS and topic not in own:
        return f"a worker may log events to {', '.join(sorted(WORKER_EVENT_TOPICS))} or its own address only"
    if isinstance(msg.get("msg"), dict):
        msg["msg"] = {**msg["msg"], "reported_by": identity.name}  # whoever wrote it, on its face
    return None


def _without_task_state(op: str, identity: PeerIdentity | None, msg: dict) -> None:
    """A hardened worker runs no Dask tasks, so what only tasks fill in its registration and
    heartbeats (bandwidth per peer and per type, fine performance digests, executing tasks,
    extension heartbeats) is emptied: each entry would otherwise add to the scheduler's state
    for good (bandwidth_workers, cumulative_worker_metrics), one heartbeat after another."""
    if op not in ("register-worker", "heartbeat_worker") or (identity is not None and identity.role != "worker"):
        return
    metrics = msg.get("metrics")
    if isinstance(metrics, dict):
        bandwidth = metrics.get("bandwidth")
        if isinstance(bandwidth, dict):
            metrics["bandwidth"] = {**bandwidth, "workers": {}, "types": {}}
        if "digests_total_since_heartbeat" in metrics:
            metrics["digests_total_since_heartbeat"] = {}
    if op == "heartbeat_worker":
        msg.pop("executing", None)
        msg.pop("extensions", None)


def _bind_worker_name(op: str, identity: PeerIdentity | None, msg: dict) -> None:
    """A worker's name (its reputation and ledger identity) is the name on its certificate, and
    its owner the certificate's owner, or its name when the certificate names none: a volunteer
    cannot pose as several owners (the private tier's non-collusion rests on owners)."""
    if op == "register-worker" and identity is not None and identity.role == "worker":
        if msg.get("name") not in (identity.name, None):
            log.info(
                "worker at %s asked to be called %r; its certificate names it %r",
                msg.get("address"),
                msg.get("name"),
                identity.name,
            )
        msg["name"] = identity.name
        neuro = (msg.get("extra") or {}).get("neuro")
        if isinstance(neuro, dict):
            owner = identity.owner or identity.name
            if neuro.get("owner") not in ("", None, owner):
                log.info(
                    "worker %s declared owner %r; its certificate makes it %r", identity.name, neuro.get("owner"), owner
                )
            neuro["owner"] = owner


def _bind_signing_key(comm, op: str, identity: PeerIdentity | None, msg: dict) -> None:
    """On TLS a worker signs its answers with its certificate's key: whatever key it announces,
    the scheduler records the one in the certificate on this connection."""
    if op != "register-worker" or identity is None:
        return
    from neuro_dask.security.signing import SigningError, public_der_from_certificate

    der = peer_certificate(comm)
    neuro = (msg.get("extra") or {}).get("neuro")
    if der is not None and isinstance(neuro, dict):
        try:
            neuro["signing_key"] = public_der_from_certificate(der)
        except SigningError as exc:  # not an EC P-256 certificate: its answers verify with nothing
            log.warning(
                "worker %s: its certificate's key cannot sign receipts (%s); it will not be paid", identity.name, exc
            )
            neuro["signing_key"] = b""


def peer_certificate(comm) -> bytes | None:
    """The DER certificate the peer presented on a TLS comm (None on TCP or in-process comms)."""
    stream = getattr(comm, "stream", None)
    sock = getattr(stream, "socket", None)
    try:
        return sock.getpeercert(binary_form=True) if sock is not None and hasattr(sock, "getpeercert") else None
    except (ValueError, OSError):  # not connected any more
        return None


def roles_required_for(server) -> bool:
    """Roles are enforced whenever the server listens with TLS: every peer then has a certificate.
    (The listener's kind, not its address: a stopping listener has none.) A listener of a kind
    hardened mode does not read (ws://, ucx://) fails every operation closed."""
    listeners = getattr(server, "listeners", []) or []
    check_listeners(server)
    return any(
        getattr(listener, "prefix", "") == "tls://" or getattr(listener, "encrypted", False) is True
        for listener in listeners
    )


def _scheduler_stream_kind(_comm, extra: dict) -> str:
    return "worker" if "worker" in extra else "client" if "client" in extra else "any"


def guard_scheduler(scheduler, requests_per_minute: int = 0, clock: Callable[[], float] = time.monotonic) -> None:
    if isinstance(scheduler.handlers, GuardedHandlers):
        return
    rates = RateBook(requests_per_minute, clock)
    check = _scheduler_check(scheduler)
    # Decided per call: the scheduler's listeners (tls:// or not) exist only once it has started.
    handlers = GuardedHandlers(
        scheduler.handlers,
        lambda op, role: decide(
            SCHEDULER_HANDLERS, op, role, roles_required=roles_required_for(scheduler), server="scheduler"
        ),
        check=check,
        rates=rates,
    )
    register = dict.get(handlers, "register-worker")
    if register is not None:  # the certificate's key, bound before the handler reads the message

        async def register_worker(comm, **msg):
            _bind_signing_key(comm, "register-worker", comm_identity(comm), msg)
            return await register(comm, **msg)

        dict.__setitem__(handlers, "register-worker", register_worker)
    scheduler.handlers = handlers
    guard_streams(scheduler, SCHEDULER_STREAMS, "scheduler", _scheduler_stream_kind, rates, check)


# ---- workers and nannies -------------------------------------------------------------------------


def own_name(server) -> str | None:
    """The name on this process's own certificate (a worker's and its nanny's), or None without TLS."""
    cached = getattr(server, "_neuro_own_name", False)
    if cached is not False:
        return cached
    name = None
    security = getattr(server, "security", None)
    path = getattr(security, "tls_worker_cert", None) if security is not None else None
    if path:
        from neuro_dask.security.certs import describe

        try:
            name = describe(path).get("name")
        except Exception:  # an unreadable certificate names nobody
            name = None
    server._neuro_own_name = name
    return name


def _own_name_check(server) -> Check:
    """A worker certificate may read a worker's status, or close a nanny, only for its own name."""

    def check(op: str, identity: PeerIdentity | None, msg: dict) -> str | None:
        if identity is None or identity.role != "worker" or op not in OWN_NAME_OPS:
            return None
        if own_name(server) != identity.name:
            return "a worker certificate may do this only for its own worker"
        return None

    return check


def _worker_stream_kind(worker) -> Callable[[Any, dict], str]:
    def kind(comm, _extra: dict) -> str:
        # The connection this worker opened to its scheduler carries the scheduler's instructions.
        own = getattr(getattr(worker, "batched_stream", None), "comm", None)
        return "scheduler" if comm is own else "any"

    return kind


def guard_worker(worker) -> None:
    """A volunteer's worker: neuro_dask's expert calls for clients, control from the scheduler,
    and only neuro_dask's own task functions run."""
    if _guard_volunteer(worker, WORKER_HANDLERS, WORKER_STREAMS, "worker", _worker_stream_kind(worker)):
        compute = worker.stream_handlers["compute-task"]
        worker.stream_handlers["compute-task"] = _checked_compute_task(worker, compute)


def guard_nanny(nanny) -> None:
    """The nanny of a volunteer's worker: no `run`, no plugins, control from the scheduler (and
    `close_gracefully` from its own worker) only."""
    _guard_volunteer(nanny, NANNY_HANDLERS, NANNY_STREAMS, "nanny", lambda _comm, _extra: "any")


def _guard_volunteer(server, handlers: dict, streams: dict, name: str, kind_of: Callable) -> bool:
    """A worker's or nanny's handlers and streams behind their tables, and no remote plugins;
    False when it was guarded already."""
    if isinstance(server.handlers, GuardedHandlers):
        return False
    server.handlers = GuardedHandlers(
        server.handlers,
        lambda op, role: decide(handlers, op, role, roles_required=roles_required_for(server), server=name),
        check=_own_name_check(server),
    )
    guard_streams(server, streams, name, kind_of)
    server.plugin_add = _refusing_plugin_add(server, server.plugin_add)
    return True


def _refusing_plugin_add(worker, original: Callable) -> Callable:
    """Plugins from the scheduler arrive pickled at registration (an ordinary scheduler sends
    Dask's shuffle plugin): refuse them without loading, so the worker still starts. Plugin
    objects handed to Worker(...) in this process are not remote and pass."""

    async def plugin_add(plugin, name: str | None = None, **kwargs):
        if isinstance(plugin, (bytes, bytearray, memoryview)):
            scheduler = getattr(getattr(worker, "scheduler", None), "address", None)
            report("plugin", scheduler, f"{type(worker).__name__.lower()} plugin {name!r} not loaded")
            return {
                "status": "error",
                "exception": None,
                "traceback": None,
                "exception_text": "hardened workers and nannies load no plugins",
                "traceback_text": "",
            }
        return await original(plugin=plugin, name=name, **kwargs)

    return plugin_add


def _checked_compute_task(worker, original: Callable) -> Callable:
    def compute_task(**msg):
        spec = msg.get("run_spec")
        refused = refused_function(spec)
        if refused is not None:
            key = msg.get("key")
            report("task", getattr(worker.scheduler, "address", None), f"task {key!r} calls {refused}")
            msg["run_spec"] = _refusing_task(key, refused)
        return original(**msg)

    return compute_task


def refused_function(spec: Any) -> str | None:
    """The name of the first function in a task spec that is not neuro_dask's, or None."""
    from dask._task_spec import Task

    if not isinstance(spec, Task):
        return f"a {type(spec).__name__} (not a task)"
    func = spec.func
    module, name = getattr(func, "__module__", None), getattr(func, "__qualname__", None)
    if not (isinstance(module, str) and isinstance(name, str) and is_task_function(module, name)):
        return f"{module}.{name}"
    for arg in (*spec.args, *spec.kwargs.values()):
        if isinstance(arg, Task):
            inner = refused_function(arg)
            if inner is not None:
                return inner
    return None


def _refusing_task(key, function: str):
    from dask._task_spec import Task

    return Task(key, refuse_task, str(key), function)


def refuse_task(key: str, function: str):
    raise TaskRefusedError(key, function)
