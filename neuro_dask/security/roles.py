"""Who may ask a hardened scheduler or worker for what. Pure: operation names in, decisions out.

A peer's role comes from its TLS certificate (neuro_dask/security/identity.py): scheduler,
worker, client or operator. Without TLS there is no role; hardened mode then still refuses
the operations no one may use (remote code, plugins, raw data uploads), and the deployment
guide (docs/security.md) says to turn TLS on before opening the port to strangers.
"""

from __future__ import annotations

from dataclasses import dataclass

# Remote code execution, plugins and arbitrary data: no peer of a hardened network uses them.
SCHEDULER_NEVER = frozenset({
    "run_function",                      # client.run_on_scheduler
    "broadcast",                         # client.run, and any message to every worker
    "register_scheduler_plugin", "unregister_scheduler_plugin",
    "register_worker_plugin", "unregister_worker_plugin",
    "register_nanny_plugin", "unregister_nanny_plugin",
    "dump_cluster_state_to_url",         # writes wherever the URL says
    "proxy",                             # relays arbitrary messages to a worker
    "scatter", "update_data", "replicate", "rebalance",
    "shuffle_barrier", "shuffle_get", "shuffle_get_or_create", "shuffle_restrict_task",
    "benchmark_hardware", "memory_sampler_start", "memory_sampler_stop",
})

# What a volunteer's worker (or its nanny) needs from the scheduler. A worker certificate
# cannot do anything else: it cannot register as a client, submit work or read others' data.
SCHEDULER_WORKER_OPS = frozenset({
    "register-worker", "heartbeat_worker", "unregister", "register_nanny", "log_event",
    "identity", "echo", "versions", "who_has", "neuro_experts_loaded", "connection_stream",
    "neuro_pause", "neuro_volunteer",
})

# Worker ops that name a worker: a worker certificate may name only its own worker.
SCHEDULER_WORKER_SELF_OPS = frozenset({"neuro_pause", "neuro_experts_loaded"})

# A peer with one of these ops is a worker, so a client certificate may not use them.
SCHEDULER_WORKER_ONLY = frozenset({"register-worker", "heartbeat_worker", "register_nanny", "unregister",
                                   "neuro_experts_loaded", "neuro_pause"})

# Cluster-wide control and other people's logs: the operator's certificate only.
SCHEDULER_OPERATOR_ONLY = frozenset({
    "restart", "restart_workers", "retire_workers", "workers_to_close", "terminate", "adaptive_target",
    "set_resources", "set_restrictions", "dump_state", "get_cluster_state", "get_logs", "logs",
    "worker_logs", "call_stack", "profile", "neuro_publish", "neuro_adopt",
})

WORKER_NEVER = frozenset({
    "run", "run_coroutine", "plugin-add", "plugin-remove", "plugin_add", "plugin_remove", "upload_file", "actor_execute", "actor_attribute",
    "update_data", "benchmark_disk", "benchmark_memory", "benchmark_network", "shuffle_inputs_done",
    "shuffle_receive",
})

# What anyone with a certificate of this network may ask a worker: expert calls and their data.
WORKER_ANYONE = frozenset({"neuro_expert", "neuro_expert_share", "neuro_cancel", "neuro_status", "get_data",
                           "identity", "echo", "ping", "versions", "connection_stream"})


# A volunteer's nanny (the process that starts and restarts its worker): code and plugins from
# no one; start, stop and logs for the scheduler only.
NANNY_NEVER = frozenset({"run", "plugin_add", "plugin_remove", "plugin-add", "plugin-remove"})
NANNY_ANYONE = frozenset({"identity", "echo", "connection_stream"})


@dataclass(frozen=True)
class Decision:
    allowed: bool
    why: str = ""


ALLOW = Decision(True)


def _never_or_no_role(op: str, role: str | None, never: frozenset[str], never_why: str, server: str,
                      roles_required: bool) -> Decision | None:
    """What every server decides before looking at roles; None when the role decides."""
    if op in never:
        return Decision(False, never_why)
    if role is None:
        return Decision(False, f"this {server} requires a certificate from its network's CA") if roles_required \
            else ALLOW
    return None


def scheduler_decision(op: str, role: str | None, *, roles_required: bool) -> Decision:
    early = _never_or_no_role(op, role, SCHEDULER_NEVER, "hardened mode never runs remote code, plugins or raw "
                              "data uploads", "scheduler", roles_required)
    if early is not None:
        return early
    if role == "worker":
        if op in SCHEDULER_WORKER_OPS:
            return ALLOW
        return Decision(False, "a worker certificate may only register and report as a worker")
    if op in SCHEDULER_WORKER_ONLY:
        return Decision(False, f"only a worker certificate may {op}")
    if op in SCHEDULER_OPERATOR_ONLY and role not in ("operator", "scheduler"):
        return Decision(False, "only the operator's certificate may do this")
    return ALLOW


def worker_decision(op: str, role: str | None, *, roles_required: bool) -> Decision:
    early = _never_or_no_role(op, role, WORKER_NEVER, "a hardened worker runs neuro_dask's expert work only",
                              "worker", roles_required)
    if early is not None:
        return early
    if op in WORKER_ANYONE:
        return ALLOW
    if role == "scheduler":
        return ALLOW
    return Decision(False, "only the scheduler may ask a worker for this")


def nanny_decision(op: str, role: str | None, *, roles_required: bool) -> Decision:
    early = _never_or_no_role(op, role, NANNY_NEVER, "a hardened nanny runs no remote code and loads no plugins",
                              "nanny", roles_required)
    if early is not None:
        return early
    if op in NANNY_ANYONE or role == "scheduler":
        return ALLOW
    return Decision(False, "only the scheduler may ask a nanny for this")
