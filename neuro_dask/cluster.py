"""A local Dask cluster with neuro_dask's scheduler and worker plugins: the embedded default."""

from __future__ import annotations

from distributed import Client, LocalCluster


def local_cluster(n_workers: int = 3, processes: bool = True, replicas: int | None = None,
                  worker_args: list[str] | None = None, dashboard_address: str | None = ":0",
                  scheduler_args: list[str] | None = None, **kwargs) -> LocalCluster:
    """Scheduler with `--preload neuro_scheduler`, workers with `--preload neuro_worker`.

    One thread per worker: expert calls run in the plugin's own thread, and two workers on one
    core would only fight over it.
    """
    scheduler_argv = (["--neuro-replicas", str(replicas)] if replicas else []) + list(scheduler_args or [])
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


def connect(scheduler: str | None = None, tls: str | None = None,
            **cluster_options) -> tuple[Client, LocalCluster | None]:
    """A client to `scheduler`, or to a new local cluster (returned so the caller can close it).

    `tls`: a folder from `neuro-dask certs` holding a client certificate. Talking to a network
    over TLS means talking to strangers, so this process is hardened too (docs/security.md).
    """
    if scheduler:
        if not tls:
            return Client(scheduler), None
        from neuro_dask.security.hardening import harden
        from neuro_dask.security.tls import security_for

        harden()
        return Client(scheduler, security=security_for("client", tls)), None
    cluster = local_cluster(**cluster_options)
    client = Client(cluster)
    # Publish only once every worker is in: placement spreads experts over the workers it sees.
    client.wait_for_workers(len(cluster.worker_spec), timeout=120)
    return client, cluster
