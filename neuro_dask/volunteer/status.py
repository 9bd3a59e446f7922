"""`neuro-dask worker-status` (also `neuro-dask worker status`): what a volunteer's worker is doing.

From the worker itself (its `neuro_status` handler): models and experts hosted, calls and rows
served, bytes downloaded vs found in the expert cache, paused or running. From the scheduler
(`neuro_volunteer` handler): reputation score and record and, when it runs a NEURO ledger,
stake, spendable balance (earnings) and credited work units.
"""

from __future__ import annotations

import socket
from typing import Any

from neuro_dask.errors import NeuroDaskError
from neuro_dask.protocol.messages import VolunteerStatus, WorkerStatus


class WorkerNotFoundError(NeuroDaskError):
    def __init__(self, wanted: str | None, scheduler: str, known: list[str]):
        self.wanted, self.scheduler, self.known = wanted, scheduler, known
        what = f"no worker {wanted!r}" if wanted else "no single worker of this machine"
        super().__init__(
            f"{what} on the scheduler {scheduler} (workers: {', '.join(known) or 'none'}); "
            "pass --worker NAME or --worker ADDRESS"
        )


# ---- scheduler side (called by the neuro_scheduler plugin's `neuro_volunteer` handler) ---------


async def scheduler_report(plugin, worker: str) -> dict[str, Any]:
    """One worker's reputation and ledger figures, by address or name."""
    address = next((a for a, n in plugin.identity.items() if worker in (a, n)), None)
    name = plugin.identity.get(address, worker) if address else worker
    if address is None and name not in plugin.reputation:
        return {"status": "error", "message": f"no worker {worker!r} on this scheduler"}
    r = plugin.reputation.record(name)
    reputation = {
        "score": r.score,
        "correctness": r.correctness,
        "timeliness": r.timeliness,
        "speed": r.speed,
        "uptime": r.uptime,
        "trusted": r.trusted,
        "established": r.established,
        "consecutive_valid": r.consecutive_valid,
        "owner": r.owner,
        "routable": r.routable,
    }
    ledger = None
    if plugin.ledger is not None:
        from neuro_dask.ledger.books import provider

        def read() -> dict[str, int]:
            books = plugin.ledger.ledger
            credits = dict(books.leaderboard("worker", limit=1_000_000))
            balances = books.balances()
            return {
                "stake": books.stake_of(name),
                "balance": int(balances.get(provider(name), 0)),
                "credits": int(credits.get(name, 0)),
            }

        ledger = await plugin._in_ledger(read)
    serving = sorted(list(k) for k in plugin.coordinator.serving.get(address, ())) if address else []
    return {
        "status": "OK",
        "address": address,
        "name": name,
        "connected": address is not None,
        "reputation": reputation,
        "serving": serving,
        "ledger": ledger,
    }


# ---- client side ----------------------------------------------------------------------------


def _local_hosts() -> set[str]:
    hosts = {"127.0.0.1", "localhost", socket.gethostname()}
    try:
        hosts.update(socket.gethostbyname_ex(socket.gethostname())[2])
    except OSError:
        pass
    return hosts


def _host_of(address: str) -> str:
    return address.split("://", 1)[-1].rsplit(":", 1)[0].strip("[]")


def collect(client, worker: str | None = None) -> dict[str, Any]:
    """Everything `worker-status` shows, through a connected distributed.Client. `worker`: a
    name or an address; None: this machine's only worker. On a hardened network the worker's
    own certificate asks for itself (its name is the default) and the operator's for anyone."""
    if worker is None:
        return collect_all(client)[0]
    try:
        sched = client.sync(VolunteerStatus(worker).send, client.scheduler)
    except Exception as exc:  # refused (a client certificate) or an older plugin
        sched = {"status": "error", "message": str(exc)}
    address = sched.get("address") if sched.get("status") == "OK" else None
    if address is None:
        address = next((a for a, n in _names(client).items() if worker in (a, n)), None)
    if address is None:
        raise WorkerNotFoundError(worker, client.scheduler.address, sorted(_names(client).values()))
    own = client.sync(WorkerStatus().send, client.rpc(address))
    paused = own.get("paused") or ""
    if isinstance(paused, bool):
        paused = own.get("pause_reason") or ("paused" if paused else "")
    return {
        "address": address,
        "name": sched.get("name") or _names(client).get(address, worker),
        "scheduler": client.scheduler.address,
        "state": f"paused: {paused}" if paused else "running",
        "hosted": own.get("hosted", {}),
        "calls_served": own.get("calls_served", 0),
        "rows_served": own.get("rows_served", 0),
        "bytes_fetched": own.get("bytes_fetched", 0),
        "bytes_cached": own.get("bytes_cached", 0),
        "files_fetched": own.get("files_fetched", 0),
        "files_cached": own.get("files_cached", 0),
        "device": own.get("device"),
        "backend": own.get("backend"),
        "memory_bytes": own.get("memory_bytes", 0),
        "memory_budget": own.get("memory_budget", 0),
        "owner": own.get("owner", ""),
        "reputation": sched.get("reputation") if sched.get("status") == "OK" else None,
        "ledger": sched.get("ledger") if sched.get("status") == "OK" else None,
        "scheduler_note": None if sched.get("status") == "OK" else sched.get("message"),
    }


def _names(client) -> dict[str, str]:
    """address -> name of every neuro worker, where this certificate may list them (the operator's;
    any client on an ordinary network); {} where it may not."""
    try:
        return {a: w["name"] for a, w in client.sync(client.scheduler.neuro_status)["workers"].items()}
    except Exception:  # a worker's certificate may not list the others
        return {}


def _own_worker_name(client) -> str | None:
    """The worker name on this client's certificate, when it holds a worker's."""
    security = getattr(client, "security", None)
    path = getattr(security, "tls_client_cert", None) if security is not None else None
    if not path:
        return None
    from neuro_dask.security.certs import describe

    info = describe(path)
    return info["name"] if info.get("role") == "worker" else None


def _local_workers(client) -> list[str]:
    """This machine's workers (a volunteer may run several), else every worker the certificate
    may list: a volunteer asking without --worker wants to see what runs, not an error."""
    names = _names(client)
    local = sorted(a for a in names if _host_of(a) in _local_hosts())
    if local or names:
        return local or sorted(names)
    raise WorkerNotFoundError(None, client.scheduler.address, [])


def collect_all(client, worker: str | None = None) -> list[dict[str, Any]]:
    """`collect` for `worker`, or, without one, for this certificate's worker or every worker of
    this machine."""
    if worker is not None:
        return [collect(client, worker)]
    own = _own_worker_name(client)
    return [collect(client, w) for w in ([own] if own else _local_workers(client))]


def _security_for_status(tls: str):
    """The certificate worker-status speaks with: a volunteer's folder holds its worker's (which
    may ask only about itself), an operator's the operator's, anyone else's a client's."""
    from neuro_dask.security.certs import role_certificates
    from neuro_dask.security.tls import security_for

    for role in ("worker", "operator", "client"):
        if len(role_certificates(tls, role)) == 1:
            return security_for(role, tls)
    return security_for("client", tls)


def worker_status(scheduler: str, worker: str | None = None, tls: str | None = None, timeout: float = 30) -> list[dict]:
    """The status of `worker`, or of this machine's workers (one entry each)."""
    from neuro_dask.client.cluster import open_client

    security = _security_for_status(tls) if tls else None
    with open_client(scheduler, security, timeout=timeout) as client:
        return collect_all(client, worker)


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def format_status(s: dict[str, Any]) -> str:
    lines = [f"worker {s['name']} at {s['address']} (scheduler {s['scheduler']}): {s['state']}"]
    for model, experts in s["hosted"].items():
        lines.append(f"  hosts {len(experts)} experts of {model}")
    if not s["hosted"]:
        lines.append("  hosts no experts yet")
    lines.append(
        f"  served {s['calls_served']} calls, {s['rows_served']} rows; device {s['device']}, "
        f"{s['backend']}; {_mib(s['memory_bytes'])} of {_mib(s['memory_budget'])} budget in use"
    )
    lines.append(
        f"  expert files since start: {s['files_fetched']} downloaded ({_mib(s['bytes_fetched'])}), "
        f"{s['files_cached']} from the cache ({_mib(s['bytes_cached'])})"
    )
    rep = s["reputation"]
    if rep:
        lines.append(
            f"  reputation {rep['score']:.3f} (correctness {rep['correctness']:.2f}, timeliness "
            f"{rep['timeliness']:.2f}, uptime {rep['uptime']:.2f}); trusted: {rep['trusted']}, established: "
            f"{rep['established']}, routable: {rep['routable']}, valid in a row: {rep['consecutive_valid']}"
        )
    else:
        lines.append(f"  reputation: unknown ({s['scheduler_note']})")
    led = s["ledger"]
    if led:
        lines.append(
            f"  NEURO: stake {led['stake']}, balance (earnings) {led['balance']}, "
            f"credited work {led['credits']} units (smallest units)"
        )
    else:
        lines.append("  NEURO: the scheduler runs no ledger")
    return "\n".join(lines)


def status_for(args) -> list[dict]:
    """The workers' status for the CLI's arguments (--scheduler, --worker, --tls)."""
    scheduler = args.scheduler
    if not scheduler:
        if not args.worker or "://" not in args.worker:
            raise NeuroDaskError("worker-status needs --scheduler ADDRESS, or --worker ADDRESS of a running worker")
        scheduler = _scheduler_of(args.worker, args.tls)
    return worker_status(scheduler, args.worker, args.tls)


def _scheduler_of(worker_address: str, tls: str | None) -> str:
    """Ask a worker which scheduler it reports to (Dask's `identity` handler)."""
    import asyncio

    from distributed.core import rpc

    connection_args = {}
    if tls:
        connection_args = _security_for_status(tls).get_connection_args("client")

    async def ask() -> str:
        async with rpc(worker_address, connection_args=connection_args) as r:
            return (await r.identity())["scheduler"]

    try:
        return asyncio.run(ask())
    except Exception as exc:
        raise NeuroDaskError(
            f"could not ask the worker {worker_address} for its scheduler: {exc}; pass --scheduler ADDRESS"
        ) from exc
