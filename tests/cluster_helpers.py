"""Helpers for tests that run neuro_dask on a Dask cluster."""

from __future__ import annotations

import contextlib

import dask
from distributed import Client

from neuro_dask.cluster import local_cluster


@contextlib.contextmanager
def neuro_cluster(n_workers=3, replicas=None, tmp_path=None, worker_args=(), scheduler_args=()):
    """In-process cluster over TCP with both plugins; each worker gets its own expert cache."""
    args = ["--neuro-no-benchmark", *worker_args]
    with dask.config.set({"neuro.worker.cache-dir": str(tmp_path / "cache") if tmp_path else None}):
        with local_cluster(n_workers=n_workers, processes=False, replicas=replicas, worker_args=args,
                           scheduler_args=list(scheduler_args), dashboard_address=None) as cluster, Client(cluster) as client:
            yield cluster, client


def scheduler_status(client):
    return client.sync(client.scheduler.neuro_status)


def worker_status(client, address):
    return client.sync(client.rpc(address).neuro_status)


def add_worker(client, scheduler_address, name, *args):
    """Start one more in-process worker with the neuro_worker preload and extra preload args."""
    from distributed import Worker

    async def start():
        return await Worker(scheduler_address, nthreads=1, name=name, preload=["neuro_worker"],
                            preload_argv=[["--neuro-no-benchmark", *args]])

    return client.sync(start)


def trust_events(client):
    return [e for _, e in client.get_events("neuro-trust")]
