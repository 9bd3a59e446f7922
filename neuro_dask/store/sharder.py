"""Turn a Hugging Face MoE checkpoint into a trunk file plus one safetensors file per expert.

SRC may also be a .gguf file (llama.cpp's format), read by store/gguf_reader.py.

DST/manifest.json            config, tokenizer files, every artifact with role, layer, expert,
                             dtype, bytes and sha256
DST/trunk.safetensors        everything but the routed experts, under canonical names
DST/experts/layer-LLL/expert-EEE.safetensors   gate_proj, up_proj, down_proj
DST/tokenizer.json ...       copied as they are

Every tensor is checked against the shape config.json implies before anything is written, and
tensors are streamed one at a time: peak memory is about the largest single tensor.
"""

from __future__ import annotations

import logging
import math
import shutil
from collections.abc import Callable
from pathlib import Path

import torch

from neuro_dask.errors import ConfigError, TensorShapeError
from neuro_dask.model.config import SUPPORTED_MODEL_TYPES, MoEConfig
from neuro_dask.model.keymap import TensorRef, expert_refs, expert_shapes, trunk_refs
from neuro_dask.model.trunk import Trunk
from neuro_dask.store.checkpoint import HFCheckpoint
from neuro_dask.store.gguf_reader import GGUFCheckpoint, is_gguf
from neuro_dask.store.hf_sharder import raw_config
from neuro_dask.store.manifest import (
    LAYOUT_NEURO,
    LAYOUT_TRANSFORMERS,
    LAYOUTS,
    ROLE_EXPERT,
    ROLE_TOKENIZER,
    ROLE_TRUNK,
    Artifact,
    Manifest,
    expert_path,
)
from neuro_dask.store.safetensors_io import DTYPE_NAMES, StreamingWriter, sha256_file

log = logging.getLogger(__name__)

TRUNK_PATH = "trunk.safetensors"
Progress = Callable[[str], None]


def expected_trunk_shapes(cfg: MoEConfig) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        return Trunk(cfg).expected_tensors()


def open_checkpoint(src: str | Path) -> HFCheckpoint | GGUFCheckpoint:
    """An HF checkpoint folder, or a .gguf file (llama.cpp's format) read through the `gguf` package."""
    return GGUFCheckpoint(src) if is_gguf(src) else HFCheckpoint(src)


def _checked_specs(ckpt: HFCheckpoint | GGUFCheckpoint, refs: dict[str, TensorRef], shapes: dict[str, tuple[int, ...]]):
    specs = []
    for canon, ref in refs.items():
        dtype, shape = ckpt.spec(ref)
        if shape != shapes[canon]:
            raise TensorShapeError(ref.name, str(ckpt.root), shapes[canon], shape)
        specs.append((canon, dtype, shape))
    return specs


def _write(
    ckpt: HFCheckpoint | GGUFCheckpoint,
    dst: Path,
    rel: str,
    refs: dict[str, TensorRef],
    specs: list,
    role: str,
    layer: int | None = None,
    expert: int | None = None,
) -> Artifact:
    writer = StreamingWriter(dst / rel, specs, metadata={"format": "pt", "role": role})
    writer.write(ckpt.read(ref) for ref in refs.values())
    dtypes = {DTYPE_NAMES[dtype] for _, dtype, _ in specs}
    params = sum(math.prod(shape) for _, _, shape in specs)
    return Artifact(rel, role, writer.sha256, writer.bytes, ",".join(sorted(dtypes)), layer, expert, params)


LAYOUT_AUTO = "auto"


def choose_layout(src: str | Path, layout: str = LAYOUT_AUTO) -> str:
    """`auto`: the hand-written trunk for the families it implements (and GGUF files), the
    checkpoint's own transformers model for every other architecture (docs/model-and-store.md)."""
    if layout not in (LAYOUT_AUTO, *LAYOUTS):
        raise ConfigError(f"layout must be auto, {' or '.join(LAYOUTS)}; got {layout!r}")
    if is_gguf(src):
        if layout == LAYOUT_TRANSFORMERS:
            raise ConfigError("a .gguf file shards with the hand-written trunk's layout only (--layout neuro)")
        return LAYOUT_NEURO
    if layout != LAYOUT_AUTO:
        return layout
    raw = raw_config(Path(src))
    # the hand-written trunk's families, unquantized; quantized ones (Qwen3-MoE FP8) keep their
    # experts quantized only in the transformers layout
    hand_written = raw.get("model_type") in SUPPORTED_MODEL_TYPES and not raw.get("quantization_config")
    return LAYOUT_NEURO if hand_written else LAYOUT_TRANSFORMERS


def plan_shard(src: str | Path, layout: str = LAYOUT_AUTO) -> tuple[int, Callable[..., Manifest]]:
    """(how many files sharding SRC writes, shard(dst, progress)): the checkpoint is read and
    mapped once, for the progress bar's total and the work alike (a DeepSeek-V3 index names
    about 90,000 tensors, each mapped by transformers' conversion rules)."""
    if choose_layout(src, layout) == LAYOUT_TRANSFORMERS:
        from neuro_dask.store.hf_sharder import TransformersSharder

        sharder = TransformersSharder(Path(src))

        def run(dst: str | Path, progress: Progress | None = None) -> Manifest:
            sharder.tick = progress or (lambda _msg: None)
            return sharder.shard(Path(dst))

        return sharder.count(), run
    return count_artifacts(src, LAYOUT_NEURO), lambda dst, progress=None: shard_checkpoint(
        src, dst, progress, LAYOUT_NEURO
    )


def shard_checkpoint(
    src: str | Path, dst: str | Path, progress: Progress | None = None, layout: str = LAYOUT_AUTO
) -> Manifest:
    """Shard SRC (an HF checkpoint folder or a .gguf file) into DST; returns the manifest written last."""
    if choose_layout(src, layout) == LAYOUT_TRANSFORMERS:
        from neuro_dask.store.hf_sharder import TransformersSharder

        return TransformersSharder(Path(src), progress).shard(Path(dst))
    src, dst = Path(src), Path(dst)
    tick = progress or (lambda _msg: None)
    ckpt = open_checkpoint(src)
    cfg = ckpt.config
    names = ckpt.names
    trunk_shapes = expected_trunk_shapes(cfg)
    t_refs = trunk_refs(cfg, names, trunk_shapes)
    t_specs = _checked_specs(ckpt, t_refs, trunk_shapes)
    e_shapes = expert_shapes(cfg)
    plan = []
    for layer in cfg.moe_layers:
        for expert in range(cfg.num_experts):
            refs = expert_refs(cfg, layer, expert, names, str(src))
            plan.append((layer, expert, refs, _checked_specs(ckpt, refs, e_shapes)))
    _warn_unused(names, t_refs, plan)

    dst.mkdir(parents=True, exist_ok=True)
    artifacts = [_write(ckpt, dst, TRUNK_PATH, t_refs, t_specs, ROLE_TRUNK)]
    tick(TRUNK_PATH)
    for layer, expert, refs, specs in plan:
        rel = expert_path(layer, expert)
        artifacts.append(_write(ckpt, dst, rel, refs, specs, ROLE_EXPERT, layer, expert))
        tick(rel)
    for name in ckpt.tokenizer_files:
        shutil.copyfile(src / name, dst / name)
        artifacts.append(Artifact(name, ROLE_TOKENIZER, sha256_file(dst / name), (dst / name).stat().st_size))
    manifest = Manifest(
        architecture=cfg.model_type,
        config=ckpt.raw_config,
        artifacts=tuple(artifacts),
        generation_config=ckpt.generation_config,
        tokenizer_files=tuple(ckpt.tokenizer_files),
        source=str(src),
    )
    manifest.write(dst)
    log.info("sharded %s into %s: %d artifacts", src, dst, len(artifacts))
    return manifest


def count_artifacts(src: str | Path, layout: str = LAYOUT_AUTO) -> int:
    """How many files shard_checkpoint will write (for a progress bar's total)."""
    if choose_layout(src, layout) == LAYOUT_TRANSFORMERS:
        from neuro_dask.store.hf_sharder import TransformersSharder

        return TransformersSharder(Path(src)).count()
    cfg = GGUFCheckpoint(src).config if is_gguf(src) else MoEConfig.from_file(src)
    return 1 + len(cfg.moe_layers) * cfg.num_experts


def _warn_unused(names: set[str], trunk: dict[str, TensorRef], plan: list) -> None:
    used = {r.name for r in trunk.values()}
    for *_, refs, _ in plan:
        used.update(r.name for r in refs.values())
    unused = sorted(n for n in names - used if not n.endswith("rotary_emb.inv_freq"))
    if unused:
        log.warning("%d checkpoint tensors are not used by neuro_dask, e.g. %s", len(unused), unused[:3])
