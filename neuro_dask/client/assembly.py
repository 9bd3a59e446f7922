"""A model from a sharded store: trunk and tokenizer from the store, experts behind an executor.

Shared by `nd.load` (experts in this process) and the distributed session (experts on a
network); it knows nothing of either."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from neuro_dask.model.config import MoEConfig
from neuro_dask.model.model import GenerationDefaults, MoEModel
from neuro_dask.model.moe import ExpertExecutor
from neuro_dask.model.tokenizer import Tokenizer
from neuro_dask.model.trunk import Trunk
from neuro_dask.store.manifest import LAYOUT_TRANSFORMERS
from neuro_dask.store.shard_store import ShardStore


def assemble_model(
    store: ShardStore, executor: ExpertExecutor, dtype: torch.dtype, device: str | torch.device = "cpu"
) -> MoEModel:
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

            raise ConfigError(
                f"device={device!r}: the hand-written trunk of {cfg.model_type} runs on the CPU; "
                "shard with `neuro-dask shard --layout transformers` to run the trunk on a GPU"
            )
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
        store=store,
    )


def transformers_local_executor(store: ShardStore, dtype: torch.dtype, device: str | torch.device):
    """Every expert of a transformers-layout store in this process, run as a worker runs it."""
    from neuro_dask.runtime.hf_experts import transformers_runner
    from neuro_dask.runtime.local import RunnerExecutor

    precision = "bfloat16" if dtype == torch.bfloat16 else "float32"
    spec, raw = store.manifest.experts_spec or {}, store.manifest.config
    return RunnerExecutor(
        {
            (a.layer, a.expert): transformers_runner(
                store.expert_path(a.layer, a.expert), spec, raw, a.layer, precision, device
            )
            for a in store.manifest.experts
        }
    )


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
