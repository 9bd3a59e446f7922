"""A local Dask cluster with neuro_dask's scheduler and worker plugins: the embedded default."""

from __future__ import annotations

import dask.config
from distributed import Client, LocalCluster
from distributed.comm.core import CommClosedError

from neuro_dask.errors import NeuroDaskError


def local_cluster(
    n_workers: int = 3,
    processes: bool = True,
    replicas: int | None = None,
    worker_args: list[str] | None = None,
    dashboard_address: str | None = ":0",
    scheduler_args: list[str] | None = None,
    **kwargs,
) -> LocalCluster:
    """Scheduler with `--preload neuro_scheduler`, workers with `--preload neuro_worker`.

    One thread per worker: expert calls run in the plugin's own thread, and two workers on one
    core would only fight over it.
    """
    scheduler_argv = (["--neuro-replicas", str(replicas)] if replicas else []) + list(scheduler_args or [])
    with dask.config.set({"neuro.console": False}):  # the caller's output stays its own (nannies copy the config)
        return LocalCluster(
            n_workers=n_workers,
            threads_per_worker=1,
            processes=processes,
            host="127.0.0.1",
            protocol="tcp://",
            dashboard_address=dashboard_address,
            scheduler_kwargs={"preload": ["neuro_scheduler"], "preload_argv": [scheduler_argv]},
            preload=["neuro_worker"],
            preload_argv=[list(worker_args or [])],
            **kwargs,
        )


def connect(
    scheduler: str | None = None, tls: str | None = None, **cluster_options
) -> tuple[Client, LocalCluster | None]:
    """A client to `scheduler`, or to a new local cluster (returned so the caller can close it).

    `tls`: a folder from `neuro-dask certs` holding a client certificate. Talking to a network
    over TLS means talking to strangers, so this process is hardened too (docs/security.md).
    """
    if scheduler:
        if not tls:
            return open_client(scheduler), None
        from neuro_dask.security.hardening import harden
        from neuro_dask.security.tls import security_for

        harden()
        return open_client(scheduler, security_for("client", tls)), None
    cluster = local_cluster(**cluster_options)
    client = Client(cluster)
    # Publish only once every worker is in: placement spreads experts over the workers it sees.
    client.wait_for_workers(len(cluster.worker_spec), timeout=120)
    return client, cluster


class SchedulerConnectionError(NeuroDaskError):
    """A client could not talk to a scheduler, with the likeliest reason in words."""


def open_client(address: str, security=None, timeout: float | None = None) -> Client:
    """distributed.Client(address), whose failures say what to change: a TLS scheduler refuses a
    plain connection by closing it, and the reason ("no valid certificate") is only in its log."""
    tls = address.startswith("tls://")
    if tls and security is None:
        raise SchedulerConnectionError(
            f"{address} is a TLS address: pass --tls DIR, a folder with ca.pem and "
            "your certificate (`neuro-dask certs`), or set neuro.security.tls-dir"
        )
    try:
        return Client(address, security=security, **({"timeout": timeout} if timeout else {}))
    except (OSError, CommClosedError) as exc:  # TimeoutError is an OSError
        raise SchedulerConnectionError(_connection_advice(address, tls, exc)) from exc


def _connection_advice(address: str, tls: bool, exc: BaseException) -> str:
    said = f"could not connect to the scheduler at {address} ({type(exc).__name__}: {exc})"
    if "refused" in str(exc).lower() or "timed out" in str(exc).lower():
        return f"{said}: nothing answered there; is the scheduler running, and are the host and port right?"
    if not tls:
        return (
            f"{said}. If this network uses TLS (a hardened network), connect to tls://{address.split('://')[-1]} "
            "with --tls DIR (a client certificate from `neuro-dask certs`)"
        )
    return (
        f"{said}. The scheduler may have refused this certificate (check that DIR holds a certificate signed "
        "by the network's CA, for the right role) or it may not use TLS (try tcp://)"
    )
