"""nd.load: a sharded model folder -> MoEModel with the trunk here and experts behind an executor."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from neuro_dask.client import mtp_draft as _mtp_draft  # noqa: F401 - registers speculative="mtp"
from neuro_dask.client import self_draft as _self_draft  # noqa: F401 - registers speculative="self"
from neuro_dask.client.assembly import assemble_model, transformers_local_executor
from neuro_dask.model.model import MoEModel
from neuro_dask.model.moe import ExpertExecutor, LocalExpertExecutor
from neuro_dask.store.manifest import LAYOUT_TRANSFORMERS
from neuro_dask.store.shard_store import ShardStore

log = logging.getLogger(__name__)


def load(
    path: str | Path,
    *,
    dtype: torch.dtype = torch.float32,
    executor: ExpertExecutor | None = None,
    verify: bool = True,
    client: Any = None,
    transport: str | None = None,
    privacy: str = "standard",
    device: str | torch.device = "cpu",
) -> MoEModel:
    """Load a folder written by `neuro-dask shard`.

    Without a client, every expert is loaded into this process (LocalExpertExecutor), each
    file sha256-verified against the manifest. With a Dask `client` whose scheduler runs the
    `neuro_scheduler` preload, the model is published there, the experts run on workers with
    the `neuro_worker` preload, and calls go out by `transport` ("direct" or "futures"; default
    from Dask config `neuro.client.transport`). `path` may then also be a URL the workers can
    read (file://, http(s)://, any fsspec URL). `dtype` applies to trunk and local experts.
    `privacy="private"` (with a client): expert calls on secret shares, docs/privacy.md.
    `device` ("cuda", "cuda:1", "mps"...): where the trunk runs (a transformers-layout store;
    the hand-written trunk runs on the CPU). The experts run wherever their executor puts them.
    """
    if privacy not in ("standard", "private"):
        from neuro_dask.errors import ConfigError

        raise ConfigError(f"privacy must be 'standard' or 'private', got {privacy!r}")
    if client is not None:
        from neuro_dask.client.dispatch.session import load_distributed

        return load_distributed(
            path, client, transport=transport, dtype=dtype, verify=verify, privacy=privacy, device=device
        )
    if privacy == "private":
        from neuro_dask.errors import ConfigError

        raise ConfigError(
            "privacy='private' protects hidden states from volunteer workers: it needs a client "
            "(nd.load(path, client=client, privacy='private')); a local model sends them nowhere"
        )
    store = ShardStore(path, verify=verify)
    cfg = store.config
    if executor is None and store.manifest.layout == LAYOUT_TRANSFORMERS:
        executor = transformers_local_executor(store, dtype, device)
    if executor is None:
        weights = {
            (layer, e): store.read_expert(layer, e, dtype) for layer in cfg.moe_layers for e in range(cfg.num_experts)
        }
        executor = LocalExpertExecutor(weights)
    return assemble_model(store, executor, dtype, device)
