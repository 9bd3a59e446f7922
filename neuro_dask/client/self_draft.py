"""A self-draft (`speculative="self"`): the model's own trunk with local low-precision copies of its hottest experts.

Drafting asks nothing of the network: the client keeps a second, cheap copy of the model (the
trunk, and as many experts as `memory_budget` allows, hottest first, in `dtype`), and drafts
with it. An expert not copied contributes nothing to the draft (its rows' output is zero): the
draft is worse where the router picks it, never wrong, since every draft is verified by the
real model. With every expert copied (a small model, or a big budget) the draft is the model
itself at lower precision, and nearly every draft is kept.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Any

import torch

from neuro_dask.client.assembly import assemble_model, transformers_local_executor
from neuro_dask.model.moe import ExpertWeights, run_expert
from neuro_dask.model.speculative import ModelDraft, SpeculationError, register_draft
from neuro_dask.store.manifest import LAYOUT_TRANSFORMERS
from neuro_dask.store.shard_store import ShardStore

log = logging.getLogger(__name__)

DEFAULT_BUDGET = 2 << 30  # bytes of expert copies, unless told otherwise


class PartialExpertExecutor:
    """Local experts for the ones copied; zero output for the others (a draft's shortcut)."""

    model_id = None
    tier = "local"

    def __init__(self, weights: Mapping[tuple[int, int], ExpertWeights]):
        self.weights = dict(weights)
        self.skipped_rows = 0

    def run_layer(self, layer: int, groups: Mapping[int, torch.Tensor]) -> dict[int, torch.Tensor]:
        out = {}
        for e, rows in groups.items():
            w = self.weights.get((layer, e))
            if w is None:
                self.skipped_rows += rows.shape[0]
                out[e] = torch.zeros_like(rows)
            else:
                out[e] = run_expert(rows, w)
        return out

    def counters(self) -> dict[str, Any]:
        return {"experts_copied": len(self.weights), "skipped_rows": self.skipped_rows}

    def close(self) -> None:
        pass


def hottest_first(experts: Iterable[tuple[int, int]], load: Mapping[tuple[int, int], float]) -> list[tuple[int, int]]:
    """Experts by how often the client called them (most first), then in order."""
    return sorted(experts, key=lambda key: (-float(load.get(key, 0.0)), key))


def within_budget(ordered: list[tuple[int, int]], bytes_each: int, budget: int) -> list[tuple[int, int]]:
    return ordered[: max(0, budget // max(1, bytes_each))]


def draft_dtype(model_dtype: torch.dtype, full_bytes: int, budget: int) -> torch.dtype:
    """The model's own dtype when a whole copy fits the budget (the draft is then the model itself
    and nearly every draft is kept), else bfloat16, which fits twice the experts of float32."""
    return model_dtype if full_bytes <= budget else torch.bfloat16


def self_draft(
    model: Any,
    memory_budget: int = DEFAULT_BUDGET,
    load: Mapping[tuple[int, int], float] | None = None,
    dtype: torch.dtype | None = None,
):
    """A ModelDraft over a local copy of `model` (its sharded folder, `model.source`): the trunk,
    and the experts `memory_budget` bytes allow, hottest first by `load` (calls per (layer,
    expert); default: the rows the model routed to each so far, `model.expert_load`), in `dtype`
    (default: draft_dtype)."""
    try:
        store = model.store or ShardStore(model.source, verify=True)
    except Exception as exc:
        raise SpeculationError(f"a self-draft reads the model's store ({model.source}): {exc}") from exc
    scale = model.dtype.itemsize / 4  # the store's files are float32 or narrower: an upper bound
    full = int(sum(a.bytes for a in store.manifest.artifacts) * max(scale, 1.0))
    dtype = dtype or draft_dtype(model.dtype, full, memory_budget)
    if store.manifest.layout == LAYOUT_TRANSFORMERS:
        if full * dtype.itemsize / model.dtype.itemsize > memory_budget:
            raise SpeculationError(
                f"a self-draft of {model.source} copies the whole model (transformers layout): about "
                f"{full >> 20} MiB, above its budget of {memory_budget >> 20} MiB; use a draft model"
            )
        log.info("self-draft: a local copy of %s in %s", model.source, dtype)
        return ModelDraft(assemble_model(store, transformers_local_executor(store, dtype, "cpu"), dtype, "cpu"))
    cfg = store.config
    every = [(layer, e) for layer in cfg.moe_layers for e in range(cfg.num_experts)]
    bytes_each = 3 * cfg.hidden_size * cfg.moe_intermediate_size * dtype.itemsize
    if load is None:
        load = dict(model.expert_load)
    chosen = within_budget(hottest_first(every, load), bytes_each, memory_budget)
    weights = {key: store.read_expert(key[0], key[1], dtype) for key in chosen}
    log.info("self-draft: %d of %d experts copied in %s", len(chosen), len(every), dtype)
    return ModelDraft(assemble_model(store, PartialExpertExecutor(weights), dtype, "cpu"))


register_draft("self", self_draft)
