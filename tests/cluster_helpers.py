"""Helpers for tests that run neuro_dask on a Dask cluster."""

from __future__ import annotations

import contextlib

import dask
from distributed import Client

from neuro_dask.client.cluster import local_cluster


@contextlib.contextmanager
def neuro_cluster(n_workers=3, replicas=None, tmp_path=None, worker_args=(), scheduler_args=()):
    """In-process cluster over TCP with both plugins; each worker gets its own expert cache."""
    args = ["--neuro-no-benchmark", *worker_args]
    with dask.config.set({"neuro.worker.cache-dir": str(tmp_path / "cache") if tmp_path else None}):
        with (
            local_cluster(
                n_workers=n_workers,
                processes=False,
                replicas=replicas,
                worker_args=args,
                scheduler_args=list(scheduler_args),
                dashboard_address="127.0.0.1:0",
            ) as cluster,
            Client(cluster) as client,
        ):
            yield cluster, client


def scheduler_status(client):
    return client.sync(client.scheduler.neuro_status)


def worker_status(client, address):
    return client.sync(client.rpc(address).neuro_status)


def add_worker(client, scheduler_address, name, *args):
    """Start one more in-process worker with the neuro_worker preload and extra preload args."""
    from distributed import Worker

    async def start():
        return await Worker(
            scheduler_address,
            nthreads=1,
            name=name,
            preload=["neuro_worker"],
            preload_argv=[["--neuro-no-benchmark", *args]],
        )

    return client.sync(start)


def trust_events(client):
    return [e for _, e in client.get_events("neuro-trust")]


def make_certs(folder, workers=3, owners=None):
    """A CA with scheduler, client, operator and worker-1..N certificates (neuro-dask certs);
    `owners`: worker number -> the owner its certificate names (default: none)."""
    from neuro_dask.security.certs import create_ca, issue

    create_ca(folder)
    for role, name in (("scheduler", "scheduler"), ("client", "client"), ("operator", "operator")):
        issue(folder, role, name)
    for i in range(1, workers + 1):
        issue(folder, "worker", f"worker-{i}", owner=(owners or {}).get(i, ""))
    return folder


@contextlib.contextmanager
def hardened_tls_cluster(tmp_path, n_workers=3, worker_args=(), client_role="client", owners=None, processes=False):
    """Hardened network over mutual TLS: each worker with its own certificate (naming `owners[i]`
    as worker-i's owner, if given), the client with a client certificate; the workers in this
    process, or each in its own (`processes`, through a nanny). Undoes the process-wide
    hardening afterwards."""
    from distributed import Nanny, Scheduler, SpecCluster, Worker

    from neuro_dask.security.hardening import uninstall
    from neuro_dask.security.tls import security_for

    certs = make_certs(tmp_path / "certs", n_workers, owners)
    scheduler = {
        "cls": Scheduler,
        "options": {
            "host": "127.0.0.1",
            "protocol": "tls",
            "dashboard_address": "127.0.0.1:0",
            "security": security_for("scheduler", certs),
            "preload": ["neuro_scheduler"],
            "preload_argv": [["--neuro-hardened"]],
        },
    }
    workers = {
        f"worker-{i}": {
            "cls": Nanny if processes else Worker,
            "options": {
                "nthreads": 1,
                "host": "127.0.0.1",
                "dashboard": False,
                "security": security_for("worker", certs, f"worker-{i}"),
                "preload": ["neuro_worker"],
                "preload_argv": [["--neuro-no-benchmark", "--neuro-hardened", *worker_args]],
            },
        }
        for i in range(1, n_workers + 1)
    }
    try:
        with dask.config.set({"neuro.worker.cache-dir": str(tmp_path / "cache")}):
            with (
                SpecCluster(workers=workers, scheduler=scheduler, security=security_for("operator", certs)) as cluster,
                Client(cluster.scheduler_address, security=security_for(client_role, certs)) as client,
            ):
                client.wait_for_workers(n_workers, timeout=60)
                yield cluster, client, certs
    finally:
        uninstall()


def publish_as_operator(scheduler_address, certs, path):
    """On a hardened network only the operator's certificate publishes a model."""
    from neuro_dask.client.dispatch.session import publish
    from neuro_dask.security.tls import security_for

    with Client(scheduler_address, security=security_for("operator", certs)) as operator:
        return publish(operator, str(path))["model"]
