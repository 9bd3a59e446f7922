"""Hardened mode, server side: every handler of a scheduler or worker asks roles.py first.

`guard_scheduler` and `guard_worker` swap the server's handler table for one that checks the
caller's role (from its TLS certificate) before each operation, refuses the operations no one
may use, and reports each refusal with the peer's address. `guard_worker` also checks every
task the scheduler hands the worker: only neuro_dask's own task functions run. Thin: the
decisions are roles.py's and allowlist.py's.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from distributed.core import _expects_comm, error_message

from neuro_dask.security.allowlist import is_task_function
from neuro_dask.security.errors import RequestRefusedError, TaskRefusedError
from neuro_dask.security.hardening import comm_identity, report
from neuro_dask.security.identity import PeerIdentity
from neuro_dask.security.limits import RateLimiter
from neuro_dask.security.roles import (
    SCHEDULER_WORKER_SELF_OPS,
    Decision,
    nanny_decision,
    scheduler_decision,
    worker_decision,
)

log = logging.getLogger(__name__)

Decide = Callable[[str, "str | None"], Decision]


def _describe(identity: PeerIdentity | None) -> str | None:
    return f"{identity.role}:{identity.name}" if identity else None


class GuardedHandlers(dict):
    """A server's handler table whose lookups return a role-checking wrapper.

    Wrapping at lookup, not at install, covers the handlers plugins add later (ours add
    theirs once the worker has benchmarked itself) without a second pass.
    """

    def __init__(self, handlers: dict, decide: Decide, rewrite: Callable | None = None,
                 limiter: RateLimiter | None = None, limited: frozenset[str] = frozenset()):
        super().__init__(handlers)
        self.decide = decide
        self.rewrite = rewrite
        self.limiter = limiter
        self.limited = limited
        self._expects_comm: dict[str, tuple[Callable, bool]] = {}  # op -> (handler, wants comm)

    def _wants_comm(self, op: str, handler: Callable) -> bool:
        # inspect.signature costs ~10 us: once per handler, not once per expert call.
        cached = self._expects_comm.get(op)
        if cached is None or cached[0] is not handler:
            cached = self._expects_comm[op] = (handler, _expects_comm(handler))
        return cached[1]

    def __getitem__(self, op: str) -> Callable:
        handler = dict.__getitem__(self, op)
        decide, rewrite = self.decide, self.rewrite
        wants_comm = self._wants_comm(op, handler)
        limiter = self.limiter if op in self.limited else None

        def guarded(comm, **msg):
            identity = comm_identity(comm)
            role = identity.role if identity else None
            decision = decide(op, role)
            if decision.allowed and limiter is not None and role not in ("operator", "scheduler"):
                wait = limiter.take(_rate_key(identity, comm.peer_address))
                if wait:
                    decision = Decision(False, f"too many requests: retry in {wait:.1f} s "
                                               "(neuro.security.requests-per-minute)")
            if not decision.allowed:
                report("refused-op", comm.peer_address, f"{op}: {decision.why}", _describe(identity))
                return _refusal(op, role, comm.peer_address, decision.why)
            if rewrite is not None:
                why = rewrite(op, identity, msg)
                if why:
                    report("refused-op", comm.peer_address, f"{op}: {why}", _describe(identity))
                    return _refusal(op, role, comm.peer_address, why)
            return handler(comm, **msg) if wants_comm else handler(**msg)

        guarded.__name__ = getattr(handler, "__name__", op)
        return guarded


def _rate_key(identity: PeerIdentity | None, peer: str) -> str:
    """A client is its certificate; without one, its host (its port changes per connection)."""
    if identity is not None:
        return f"{identity.role}:{identity.name}"
    return peer.rsplit(":", 1)[0]


def _refusal(op: str, role: str | None, peer: str, why: str) -> dict[str, Any]:
    try:
        raise RequestRefusedError(op, role, peer, why)
    except RequestRefusedError as exc:
        # "uncaught-error" is the status distributed's rpc re-raises in the caller.
        return error_message(exc, status="uncaught-error")


def _scheduler_rewrite(scheduler) -> Callable:
    def rewrite(op: str, identity: PeerIdentity | None, msg: dict) -> str | None:
        _bind_worker_name(op, identity, msg)
        return _names_itself(scheduler, op, identity, msg)

    return rewrite


def _names_itself(scheduler, op: str, identity: PeerIdentity | None, msg: dict) -> str | None:
    """Why a worker certificate may not do `op` for the worker it names (None: it names itself)."""
    if identity is None or identity.role != "worker" or op not in SCHEDULER_WORKER_SELF_OPS:
        return None
    ws = scheduler.workers.get(msg.get("worker"))
    if ws is None or str(ws.name) != identity.name:
        return "a worker certificate may speak only for its own worker"
    return None


def _bind_worker_name(op: str, identity: PeerIdentity | None, msg: dict) -> None:
    """A worker's name (its reputation and ledger identity) is the name on its certificate, and
    its owner the certificate's owner, or its name when the certificate names none: a volunteer
    cannot pose as several owners (the private tier's non-collusion rests on owners)."""
    if op == "register-worker" and identity is not None and identity.role == "worker":
        if msg.get("name") not in (identity.name, None):
            log.info("worker at %s asked to be called %r; its certificate names it %r", msg.get("address"),
                     msg.get("name"), identity.name)
        msg["name"] = identity.name
        neuro = (msg.get("extra") or {}).get("neuro")
        if isinstance(neuro, dict):
            owner = identity.owner or identity.name
            if neuro.get("owner") not in ("", None, owner):
                log.info("worker %s declared owner %r; its certificate makes it %r", identity.name,
                         neuro.get("owner"), owner)
            neuro["owner"] = owner


def roles_required_for(server) -> bool:
    """Roles are enforced whenever the server listens with TLS: every peer then has a certificate.
    (The listener's kind, not its address: a stopping listener has none.)"""
    return any(getattr(listener, "prefix", "") == "tls://" for listener in getattr(server, "listeners", []))


# A client's requests at the scheduler: one registration per connection, one request start per
# generation request (with a ledger), publications.
RATE_LIMITED_SCHEDULER_OPS = frozenset({"register-client", "neuro_request_begin", "neuro_publish"})


def guard_scheduler(scheduler, requests_per_minute: int = 0, clock: Callable[[], float] = time.monotonic) -> None:
    if isinstance(scheduler.handlers, GuardedHandlers):
        return
    # Decided per call: the scheduler's listeners (tls:// or not) exist only once it has started.
    scheduler.handlers = GuardedHandlers(
        scheduler.handlers,
        lambda op, role: scheduler_decision(op, role, roles_required=roles_required_for(scheduler)),
        rewrite=_scheduler_rewrite(scheduler), limiter=RateLimiter(requests_per_minute, clock),
        limited=RATE_LIMITED_SCHEDULER_OPS)


def guard_worker(worker) -> None:
    if isinstance(worker.handlers, GuardedHandlers):
        return
    worker.handlers = GuardedHandlers(
        worker.handlers, lambda op, role: worker_decision(op, role, roles_required=roles_required_for(worker)))
    compute = worker.stream_handlers["compute-task"]
    worker.stream_handlers["compute-task"] = _checked_compute_task(worker, compute)
    worker.plugin_add = _refusing_plugin_add(worker, worker.plugin_add)


def _refusing_plugin_add(worker, original: Callable) -> Callable:
    """Plugins from the scheduler arrive pickled at registration (an ordinary scheduler sends
    Dask's shuffle plugin): refuse them without loading, so the worker still starts. Plugin
    objects handed to Worker(...) in this process are not remote and pass."""

    async def plugin_add(plugin, name: str | None = None, **kwargs):
        if isinstance(plugin, (bytes, bytearray, memoryview)):
            scheduler = getattr(getattr(worker, "scheduler", None), "address", None)
            report("plugin", scheduler, f"{type(worker).__name__.lower()} plugin {name!r} not loaded")
            return {"status": "error", "exception": None, "traceback": None,
                    "exception_text": "hardened workers and nannies load no plugins", "traceback_text": ""}
        return await original(plugin=plugin, name=name, **kwargs)

    return plugin_add


def guard_nanny(nanny) -> None:
    """The nanny of a volunteer's worker: no `run`, no plugins, control from the scheduler only."""
    if isinstance(nanny.handlers, GuardedHandlers):
        return
    nanny.handlers = GuardedHandlers(
        nanny.handlers, lambda op, role: nanny_decision(op, role, roles_required=roles_required_for(nanny)))
    nanny.plugin_add = _refusing_plugin_add(nanny, nanny.plugin_add)


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
