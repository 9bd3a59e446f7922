"""In-process experts at a chosen backend and precision: `nd.load(path, executor=...)`.

    from neuro_dask.runtime.local import local_executor
    model = nd.load(path, executor=local_executor(path, precision="int8"))

The reference LocalExpertExecutor (model/moe.py) runs float weights; this one runs the same
experts through the worker's runners, so a quantized or ONNX worker can be evaluated on one
machine (accuracy, greedy parity) without a cluster.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch

from neuro_dask.model.moe import ExpertWeights
from neuro_dask.runtime.runners import ExpertRunner, check_backend, check_precision, prepare_expert
from neuro_dask.store.shard_store import ShardStore


class RunnerExecutor:
    """ExpertExecutor over prepared runners: (layer, expert) -> runner."""

    model_id = None
    tier = "local"

    def __init__(self, runners: Mapping[tuple[int, int], ExpertRunner]):
        self.runners = runners

    def run_layer(self, layer: int, groups: Mapping[int, torch.Tensor]) -> dict[int, torch.Tensor]:
        return {e: self.runners[(layer, e)](rows) for e, rows in groups.items()}

    def counters(self) -> dict:
        return {}  # nothing crosses a network in process

    def nbytes(self) -> int:
        return sum(r.nbytes() for r in self.runners.values())

    def close(self) -> None:
        pass  # in process: no connections, nothing to report


def prepare_runners(
    weights: Mapping[tuple[int, int], ExpertWeights], precision: str = "float32", backend: str = "torch"
) -> dict[tuple[int, int], ExpertRunner]:
    check_precision(precision, allow_auto=False)
    check_backend(backend, precision)
    if backend == "onnx":
        from neuro_dask.runtime.onnx_backend import onnx_expert

        return {key: onnx_expert(w) for key, w in weights.items()}
    return {key: prepare_expert(w, precision) for key, w in weights.items()}


def local_executor(
    path: str | Path, precision: str = "float32", backend: str = "torch", verify: bool = True
) -> RunnerExecutor:
    """Every expert of a sharded store, sha256-verified, prepared at `precision` on `backend`."""
    store = ShardStore(path, verify=verify)
    cfg = store.config
    weights = {(layer, e): store.read_expert(layer, e) for layer in cfg.moe_layers for e in range(cfg.num_experts)}
    return RunnerExecutor(prepare_runners(weights, precision, backend))
