"""The thin Dask shell: each participant is a Dask actor pinned to one worker.

The participant's data is produced or read *on its worker* (a path in that worker's config,
Dask config key `neuro.federated.data-path`, or a callable run there), so only model parameters go
out to workers and masked updates come back.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from neuro_dask.federated.rounds import FederatedCoordinator, Participant, RoundResult

CONFIG_DATA_PATH = "neuro.federated.data-path"


def _data_from_worker_config() -> str:
    import dask

    path = dask.config.get(CONFIG_DATA_PATH, None)
    if not path:
        from neuro_dask.federated.errors import FederatedError

        raise FederatedError(
            f"this worker has no local data: set Dask config {CONFIG_DATA_PATH!r} to a file of "
            f"[a, b] lines, or pass data= to start_participants"
        )
    return path


def start_participants(
    client: Any,
    workers: Mapping[str, str],
    store_path: str,
    data: Mapping[str, Callable[[], Any] | str] | None = None,
    **participant_kwargs: Any,
) -> dict:
    """participant id -> actor handle on `workers[id]` (a worker address). `data[id]` is a path or a
    zero-argument callable evaluated on that worker; without it the worker's own config names the path."""
    futures = {}
    for pid, address in workers.items():
        source = (data or {}).get(pid) or _data_from_worker_config
        futures[pid] = client.submit(
            Participant,
            pid,
            store_path,
            source,
            actor=True,
            workers=[address],
            allow_other_workers=False,
            key=f"federated-participant-{pid}",
            **participant_kwargs,
        )
    return {pid: fut.result() for pid, fut in futures.items()}


def run_federated(
    client: Any,
    workers: Mapping[str, str],
    store_path: str,
    global_flat: np.ndarray,
    rounds: int,
    data: Mapping[str, Callable[[], Any] | str] | None = None,
    coordinator_kwargs: dict | None = None,
    evaluate: Callable[[np.ndarray], Mapping[str, float]] | None = None,
    on_round: Callable[[RoundResult], None] | None = None,
    **participant_kwargs: Any,
) -> FederatedCoordinator:
    """Federated fine-tuning on a Dask cluster, the public entry point (`neuro_dask.federated.run_federated`).

    Starts one participant per entry of `workers` (participant id -> worker address) as a Dask
    actor on that worker, loading the model from `store_path` there; its data is `data[id]` (a
    path or a zero-argument callable evaluated on the worker) or, without it, the file named by
    the worker's Dask config `neuro.federated.data-path`. Relays the participants' public keys,
    then runs `rounds` rounds of FedAvg with secure aggregation from `global_flat` (`get_flat`
    of the base model). `participant_kwargs` go to each Participant (`local=LocalSteps(...)`,
    `dp=DPSettings(...)`, `seed=`); `coordinator_kwargs` to the FederatedCoordinator.

    evaluate: optional, global vector -> {metric: value}, run in this process before the first
    round and after each (`evaluator(model, held_out)` gives loss and accuracy); the values land
    in `coordinator.initial_metrics` and each `RoundResult.metrics`, and `coordinator.table()`
    lists them per round. on_round: called with each RoundResult as it completes (to print progress).

    Returns the coordinator: `.global_flat` is the result (`set_flat(model, ...)`, then
    `write_version`), `.history` the rounds.
    """
    handles = start_participants(client, workers, store_path, data, **participant_kwargs)
    kwargs = dict(coordinator_kwargs or {})
    if evaluate is not None:
        kwargs["evaluate"] = evaluate
    coordinator = FederatedCoordinator(handles, global_flat, **kwargs)
    coordinator.setup_keys()
    for _ in range(rounds):
        result = coordinator.run_round()
        if on_round is not None:
            on_round(result)
    return coordinator
