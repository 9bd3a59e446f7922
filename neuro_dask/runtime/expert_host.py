"""A volunteer's experts: fetched and verified into a disk cache, kept in memory within a budget,
run on request. No Dask here: the `neuro_worker` plugin calls these methods from its handlers,
always off the event loop (loading and computing block).
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from typing import Iterable

import torch

from neuro_dask.errors import NeuroDaskError
from neuro_dask.model.config import MoEConfig
from neuro_dask.model.moe import ExpertWeights, run_expert
from neuro_dask.runtime.expert_memory import ExpertMemory
from neuro_dask.store.manifest import Manifest
from neuro_dask.store.remote import ExpertFileCache, read_manifest
from neuro_dask.store.shard_store import read_expert_file
from neuro_dask.wire import ExpertRequest

log = logging.getLogger(__name__)


class ExpertNotHostedError(NeuroDaskError):
    def __init__(self, model: str, layer: int, expert: int):
        self.model, self.layer, self.expert = model, layer, expert
        super().__init__(
            f"expert {expert} of layer {layer} of model {model!r} is not hosted here; "
            "the client's routes are stale and it should ask the scheduler again"
        )


@dataclass
class HostedModel:
    store_url: str
    manifest: Manifest
    config: MoEConfig
    assigned: set[tuple[int, int]] = field(default_factory=set)


@dataclass(frozen=True)
class LoadResult:
    loaded: tuple[tuple[int, int], ...]
    failed: dict[tuple[int, int], str]  # (layer, expert) -> why


class ExpertHost:
    def __init__(self, cache: ExpertFileCache, memory: ExpertMemory, device: str = "cpu",
                 dtype: torch.dtype | None = None, store_override: str | None = None):
        self.cache = cache
        self.memory = memory
        self.device = torch.device(device)
        self.dtype = dtype
        self.store_override = store_override  # a volunteer's own mirror of the model store
        self.models: dict[str, HostedModel] = {}
        self.calls_served = 0
        self.rows_served = 0
        self._lock = threading.RLock()

    def _model(self, model_id: str, store_url: str) -> HostedModel:
        with self._lock:
            if model_id not in self.models:
                url = self.store_override or store_url
                manifest = read_manifest(url)
                self.models[model_id] = HostedModel(url, manifest, manifest.model_config)
            return self.models[model_id]

    def load(self, model_id: str, store_url: str, experts: Iterable[tuple[int, int]]) -> LoadResult:
        """Fetch, verify and load experts; each failure is reported, never half-served."""
        try:
            model = self._model(model_id, store_url)
        except NeuroDaskError as exc:
            return LoadResult((), {tuple(le): str(exc) for le in experts})
        loaded, failed = [], {}
        for layer, expert in experts:
            try:
                self._weights(model_id, model, layer, expert)
            except (NeuroDaskError, OSError) as exc:
                log.warning("cannot load expert %d of layer %d of %s: %s", expert, layer, model_id, exc)
                failed[(layer, expert)] = str(exc)
                continue
            with self._lock:
                model.assigned.add((layer, expert))
            loaded.append((layer, expert))
        return LoadResult(tuple(loaded), failed)

    def drop(self, model_id: str, experts: Iterable[tuple[int, int]]) -> None:
        with self._lock:
            model = self.models.get(model_id)
            for layer, expert in experts:
                if model is not None:
                    model.assigned.discard((layer, expert))
                self.memory.discard((model_id, layer, expert))

    def _weights(self, model_id: str, model: HostedModel, layer: int, expert: int) -> ExpertWeights:
        key = (model_id, layer, expert)
        with self._lock:
            weights = self.memory.get(key)
        if weights is not None:
            return weights
        artifact = model.manifest.expert(layer, expert)
        path = self.cache.fetch(model.store_url, artifact)
        weights = read_expert_file(path, model.config, self.dtype)
        if self.device.type != "cpu":
            weights = ExpertWeights(*(t.to(self.device) for t in weights.as_dict().values()))
        with self._lock:
            evicted = self.memory.put(key, weights)
        if evicted:
            log.info("memory budget: evicted %d experts (reloaded from the disk cache on demand)", len(evicted))
        return weights

    def run(self, request: ExpertRequest) -> dict[int, torch.Tensor]:
        with self._lock:
            model = self.models.get(request.model)
            hosted = model is not None and all((request.layer, e) in model.assigned for e in request.inputs)
        if not hosted:
            missing = next(e for e in request.inputs if model is None or (request.layer, e) not in model.assigned)
            raise ExpertNotHostedError(request.model, request.layer, missing)
        outputs = {}
        with torch.inference_mode():
            for expert, rows in request.inputs.items():
                weights = self._weights(request.model, model, request.layer, expert)
                x = rows.to(self.device, weights.gate_proj.dtype)
                outputs[expert] = run_expert(x, weights).to("cpu", rows.dtype)
        with self._lock:
            self.calls_served += 1
            self.rows_served += sum(r.shape[0] for r in request.inputs.values())
        return outputs

    def hosted(self) -> dict[str, list[tuple[int, int]]]:
        with self._lock:
            return {m: sorted(h.assigned) for m, h in self.models.items() if h.assigned}

    def status(self) -> dict:
        with self._lock:
            return {"models": {m: len(h.assigned) for m, h in self.models.items()},
                    "calls_served": self.calls_served, "rows_served": self.rows_served,
                    "memory_bytes": self.memory.bytes_used, "device": str(self.device)}
