"""Federated fine-tuning: FedAvg rounds over participants that keep their data, with secure
aggregation (secure_aggregation.py) and optional differential privacy (dp.py). See
docs/privacy.md, "Federated fine-tuning".

The public API is what this package exports (imported on first use, so that importing
`neuro_dask.federated.errors` alone never loads torch):

    from neuro_dask.federated import LocalSteps, evaluator, get_flat, run_federated, set_flat, write_version

    coordinator = run_federated(client, {"p0": addr0, "p1": addr1, ...}, store, get_flat(model), rounds=5,
                                data={...}, local=LocalSteps(steps=10), evaluate=evaluator(model, held_out))
    coordinator.table()          # one row per round: survivors, dropped, loss, accuracy, ...
    set_flat(model, coordinator.global_flat)
    write_version(model, store, new_store, {"rounds": 5})
"""

from __future__ import annotations

import importlib

_LAZY = {
    # running rounds on a Dask cluster
    "run_federated": "neuro_dask.federated.dask_rounds",
    "start_participants": "neuro_dask.federated.dask_rounds",
    "CONFIG_DATA_PATH": "neuro_dask.federated.dask_rounds",
    # the rounds themselves (pure of Dask)
    "FederatedCoordinator": "neuro_dask.federated.rounds",
    "Participant": "neuro_dask.federated.rounds",
    "RoundResult": "neuro_dask.federated.rounds",
    "read_problems": "neuro_dask.federated.rounds",
    "write_problems": "neuro_dask.federated.rounds",
    # local training, measuring, and the result as a new version
    "LocalSteps": "neuro_dask.federated.training",
    "get_flat": "neuro_dask.federated.training",
    "set_flat": "neuro_dask.federated.training",
    "evaluate_model": "neuro_dask.federated.training",
    "evaluator": "neuro_dask.federated.training",
    "non_iid_split": "neuro_dask.federated.training",
    "reinitialise_moe": "neuro_dask.federated.training",
    "write_version": "neuro_dask.federated.training",
    # differential privacy
    "DPSettings": "neuro_dask.federated.dp",
    # errors
    "FederatedError": "neuro_dask.federated.errors",
    "ParticipantDropped": "neuro_dask.federated.errors",
    "TooFewSurvivorsError": "neuro_dask.federated.errors",
}


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'neuro_dask.federated' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])


__all__ = sorted(_LAZY)
