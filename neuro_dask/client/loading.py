"""nd.load: a sharded model folder -> MoEModel with the trunk here and experts behind an executor."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Mapping

import torch

from neuro_dask.model.config import MoEConfig
from neuro_dask.model.model import GenerationDefaults, MoEModel
from neuro_dask.model.moe import ExpertExecutor, LocalExpertExecutor
from neuro_dask.model.tokenizer import Tokenizer
from neuro_dask.model.trunk import Trunk
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

        return load_distributed(path, client, transport=transport, dtype=dtype, verify=verify, privacy=privacy,
                                device=device)
    if privacy == "private":
        from neuro_dask.errors import ConfigError

        raise ConfigError("privacy='private' protects hidden states from volunteer workers: it needs a client "
                          "(nd.load(path, client=client, privacy='private')); a local model sends them nowhere")
    store = ShardStore(path, verify=verify)
    cfg = store.config
    if executor is None and store.manifest.layout == LAYOUT_TRANSFORMERS:
        executor = transformers_local_executor(store, dtype, device)
    if executor is None:
        weights = {
            (layer, e): store.read_expert(layer, e, dtype)
            for layer in cfg.moe_layers
            for e in range(cfg.num_experts)
        }
        executor = LocalExpertExecutor(weights)
    return assemble_model(store, executor, dtype, device)


def assemble_model(store: ShardStore, executor: ExpertExecutor, dtype: torch.dtype,
                   device: str | torch.device = "cpu") -> MoEModel:
    """Trunk and tokenizer from the store, experts behind `executor`."""
    cfg = store.config
    where = str(store.path(store.manifest.trunk))
    if store.manifest.layout == LAYOUT_TRANSFORMERS:
        from neuro_dask.model.hf_model import TransformersMoEModel
        from neuro_dask.model.hf_trunk import build_skeleton, load_trunk

        trunk = load_trunk(build_skeleton(store.manifest.config, dtype), store.read_trunk(), where, dtype, device)
        cls = TransformersMoEModel
    else:
        if torch.device(device).type != "cpu":
            from neuro_dask.errors import ConfigError

            raise ConfigError(f"device={device!r}: the hand-written trunk of {cfg.model_type} runs on the CPU; "
                              "shard with `neuro-dask shard --layout transformers` to run the trunk on a GPU")
        trunk = build_trunk(cfg, store.read_trunk(), dtype, where)
        cls = MoEModel
    tok_path = store.tokenizer_path()
    return cls(
        config=cfg,
        trunk=trunk,
        executor=executor,
        tokenizer=Tokenizer.from_file(tok_path) if tok_path else None,
        generation=generation_defaults(cfg, store.manifest.generation_config),
        source=str(store.root),
    )


def transformers_local_executor(store: ShardStore, dtype: torch.dtype, device: str | torch.device):
    """Every expert of a transformers-layout store in this process, run as a worker runs it."""
    from neuro_dask.runtime.hf_experts import transformers_runner
    from neuro_dask.runtime.local import RunnerExecutor

    precision = "bfloat16" if dtype == torch.bfloat16 else "float32"
    spec, raw = store.manifest.experts_spec or {}, store.manifest.config
    return RunnerExecutor({(a.layer, a.expert): transformers_runner(store.expert_path(a.layer, a.expert), spec, raw,
                                                                    a.layer, precision, device)
                           for a in store.manifest.experts})


def build_trunk(cfg: MoEConfig, tensors: Mapping[str, torch.Tensor], dtype: torch.dtype, where: str) -> Trunk:
    """Build on the meta device and assign the loaded tensors: no throwaway random init."""
    with torch.device("meta"):
        trunk = Trunk(cfg)
    trunk.load_tensors({k: v.to(dtype) for k, v in tensors.items()}, where)
    return trunk.eval()


def generation_defaults(cfg: MoEConfig, generation_config: Mapping[str, Any] | None) -> GenerationDefaults:
    gen = dict(generation_config or {})
    eos = gen.get("eos_token_id", list(cfg.eos_token_id))
    eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (int(eos),))
    pad = gen.get("pad_token_id", cfg.pad_token_id)
    bos = gen.get("bos_token_id", cfg.bos_token_id)
    # An EOS outside the vocabulary (OLMoE's tiny test configs) can never be produced.
    eos_ids = tuple(i for i in eos_ids if 0 <= i < cfg.vocab_size)
    return GenerationDefaults(eos_ids, pad, bos)
