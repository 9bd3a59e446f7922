"""A volunteer's experts: fetched and verified into a disk cache, kept in memory within a budget,
run on request. No Dask here: the `neuro_worker` plugin calls these methods from its handlers,
always off the event loop (loading and computing block).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch

from neuro_dask.errors import NeuroDaskError
from neuro_dask.model.config import MoEConfig
from neuro_dask.model.hf_config import TransformersMoEConfig
from neuro_dask.protocol.records import NOT_HOSTED_MARK
from neuro_dask.protocol.wire import ExpertRequest
from neuro_dask.runtime.expert_memory import ExpertMemory
from neuro_dask.runtime.hf_experts import choose_precision as choose_transformers_precision
from neuro_dask.runtime.hf_experts import transformers_runner
from neuro_dask.runtime.runners import ExpertRunner, check_backend, check_precision, choose_precision, prepare_expert
from neuro_dask.store.manifest import LAYOUT_TRANSFORMERS, Manifest
from neuro_dask.store.remote import ExpertFileCache, read_manifest
from neuro_dask.store.shard_store import read_expert_file

log = logging.getLogger(__name__)


class ExpertNotHostedError(NeuroDaskError):
    def __init__(self, model: str, layer: int, expert: int):
        self.model, self.layer, self.expert = model, layer, expert
        super().__init__(
            f"expert {expert} of layer {layer} of model {model!r} {NOT_HOSTED_MARK}; "
            "the client's routes are stale and it should ask the scheduler again"
        )


@dataclass
class HostedModel:
    store_url: str
    manifest: Manifest
    config: MoEConfig | TransformersMoEConfig
    assigned: set[tuple[int, int]] = field(default_factory=set)
    precision: str | None = None  # resolved at the first load (the `auto` rule needs the expert count)


@dataclass(frozen=True)
class LoadResult:
    loaded: tuple[tuple[int, int], ...]
    failed: dict[tuple[int, int], str]  # (layer, expert) -> why


class ExpertHost:
    def __init__(
        self,
        cache: ExpertFileCache,
        memory: ExpertMemory,
        device: str = "cpu",
        dtype: torch.dtype | None = None,
        store_override: str | None = None,
        backend: str = "torch",
        precision: str | None = None,
    ):
        self.cache = cache
        self.memory = memory
        self.device = torch.device(device)
        self.dtype = dtype
        # precision None: the legacy `dtype` argument decides (None = the file's dtype, float32).
        self.precision = check_precision(precision or _precision_of(dtype))
        check_backend(backend, self.precision)
        self.backend = backend
        self._onnx_cache = None
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

    def load(
        self,
        model_id: str,
        store_url: str,
        experts: Iterable[tuple[int, int]],
        progress: Callable[[], None] | None = None,
    ) -> LoadResult:
        """Fetch, verify and load experts; each failure is reported, never half-served.
        `progress()` is called after each expert, loaded or not."""
        try:
            model = self._model(model_id, store_url)
        except NeuroDaskError as exc:
            return LoadResult((), {tuple(le): str(exc) for le in experts})
        experts = [tuple(le) for le in experts]
        self._resolve_precision(model, len(model.assigned | set(experts)))
        loaded, failed = [], {}
        for layer, expert in experts:
            try:
                self._weights(model_id, model, layer, expert)
            except (NeuroDaskError, OSError) as exc:
                log.warning("cannot load expert %d of layer %d of %s: %s", expert, layer, model_id, exc)
                failed[(layer, expert)] = str(exc)
            else:
                with self._lock:
                    model.assigned.add((layer, expert))
                loaded.append((layer, expert))
            if progress is not None:
                progress()
        return LoadResult(tuple(loaded), failed)

    def drop(self, model_id: str, experts: Iterable[tuple[int, int]]) -> None:
        with self._lock:
            model = self.models.get(model_id)
            for layer, expert in experts:
                if model is not None:
                    model.assigned.discard((layer, expert))
                self.memory.discard((model_id, layer, expert))

    def _resolve_precision(self, model: HostedModel, experts: int) -> str:
        """`auto`: the highest precision at which this model's assigned experts fit the budget."""
        with self._lock:
            if model.precision is None:
                if self.precision != "auto":
                    model.precision = self.precision
                elif self.backend == "onnx":
                    model.precision = "float32"
                elif model.manifest.layout == LAYOUT_TRANSFORMERS:
                    model.precision = choose_transformers_precision(
                        model.manifest.experts_spec or {},
                        max(a.bytes for a in model.manifest.experts),
                        max(experts, 1),
                        self.memory.budget_bytes,
                    )
                    log.info(
                        "precision auto: %s for %d experts within %d bytes",
                        model.precision,
                        experts,
                        self.memory.budget_bytes,
                    )
                else:
                    cfg = model.config
                    model.precision = choose_precision(
                        self.memory.budget_bytes, max(experts, 1), cfg.hidden_size, cfg.moe_intermediate_size
                    )
                    log.info(
                        "precision auto: %s for %d experts within %d bytes",
                        model.precision,
                        experts,
                        self.memory.budget_bytes,
                    )
            return model.precision

    def _weights(self, model_id: str, model: HostedModel, layer: int, expert: int) -> ExpertRunner:
        """The expert's runner, from memory or built from the verified file (quantized at load)."""
        key = (model_id, layer, expert)
        with self._lock:
            runner = self.memory.get(key)
        if runner is not None:
            return runner
        artifact = model.manifest.expert(layer, expert)
        path = self.cache.fetch(model.store_url, artifact)
        precision = self._resolve_precision(model, len(model.assigned) + 1)
        runner = self._build_runner(model, layer, path, artifact.sha256, precision)
        with self._lock:
            evicted = self.memory.put(key, runner)
        if evicted:
            log.info("memory budget: evicted %d experts (reloaded from the disk cache on demand)", len(evicted))
        return runner

    def _build_runner(self, model: HostedModel, layer: int, path, sha256: str, precision: str) -> ExpertRunner:
        """The verified file -> a runner at `precision` on this host's backend and device."""
        if model.manifest.layout == LAYOUT_TRANSFORMERS:
            return transformers_runner(
                path,
                model.manifest.experts_spec or {},
                model.manifest.config,
                layer,
                precision,
                self.device,
                self.backend,
            )
        weights = read_expert_file(path, model.config)
        if self.backend == "onnx":
            return self._onnx().runner(sha256, weights)
        return prepare_expert(weights, precision, self.device)

    def _onnx(self):
        from neuro_dask.runtime.onnx_backend import OnnxExpertCache

        with self._lock:
            if self._onnx_cache is None:
                self._onnx_cache = OnnxExpertCache(self.cache.root)
            return self._onnx_cache

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
                runner = self._weights(request.model, model, request.layer, expert)
                outputs[expert] = runner(rows.to(self.device)).to("cpu", rows.dtype)
        with self._lock:
            self.calls_served += 1
            self.rows_served += sum(r.shape[0] for r in request.inputs.values())
        return outputs

    def hosted(self) -> dict[str, list[tuple[int, int]]]:
        with self._lock:
            return {m: sorted(h.assigned) for m, h in self.models.items() if h.assigned}

    def status(self) -> dict:
        with self._lock:
            return {
                "models": {m: len(h.assigned) for m, h in self.models.items()},
                "calls_served": self.calls_served,
                "rows_served": self.rows_served,
                # downloaded from a store vs found verified on disk, since this process started
                **{
                    k: getattr(self.cache, k, 0)
                    for k in ("bytes_fetched", "bytes_cached", "files_fetched", "files_cached")
                },
                "memory_bytes": self.memory.bytes_used,
                "device": str(self.device),
                "backend": self.backend,
                "precision": {m: h.precision for m, h in self.models.items() if h.precision},
            }


def _precision_of(dtype: torch.dtype | None) -> str:
    if dtype in (None, torch.float32):
        return "float32"
    if dtype == torch.bfloat16:
        return "bfloat16"
    raise NeuroDaskError(f"ExpertHost dtype {dtype}: use precision='float32', 'bfloat16', 'int8' or 'int4'")
