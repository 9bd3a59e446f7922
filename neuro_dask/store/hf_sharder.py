"""Shard any transformers MoE checkpoint: trunk under transformers' own names, one file per expert.

The checkpoint's names are mapped to the model's in-memory names by transformers' own
conversion rules (conversion_mapping.py: renamings, and converters that stack per-expert
tensors and concatenate gate/up), applied here ONE EXPERT AT A TIME so that memory stays near
one expert. An expert file holds that expert's slice of every parameter of its layer's experts
module, in the in-memory layout the architecture's experts class computes with (`gate_up_proj`
[2I, D] or transposed, biases, ...). Quantized experts stay as published:
  fp8-block  `X` float8_e4m3fn with `X_scale_inv` block scales (DeepSeek-V3, Kimi K2),
  mxfp4      `X_blocks` and `X_scales` (gpt-oss),
and the manifest records the format; the trunk is stored dequantized.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from neuro_dask.errors import CheckpointError, ConfigError, MissingTensorError, TensorShapeError, UnsupportedModelError
from neuro_dask.model.hf_trunk import build_skeleton, experts_modules, hooked_model_types, trunk_shapes
from neuro_dask.model.keymap import TensorRef
from neuro_dask.store.checkpoint import HFCheckpoint
from neuro_dask.store.expert_formats import FORMAT_FP8_BLOCK, dequantize_fp8_block, format_of
from neuro_dask.store.manifest import (
    LAYOUT_TRANSFORMERS,
    ROLE_EXPERT,
    ROLE_TOKENIZER,
    ROLE_TRUNK,
    Artifact,
    Manifest,
    expert_path,
)
from neuro_dask.store.mtp_sharder import MtpSharder, mtp_layers
from neuro_dask.store.safetensors_io import DTYPE_NAMES, StreamingWriter, sha256_file

log = logging.getLogger(__name__)

TRUNK_PATH = "trunk.safetensors"
Progress = Callable[[str], None]
_COMPANIONS = ("_scale_inv", "_blocks", "_scales")  # quantization companions of a parameter
_FP8_SCALE = ".weight_scale_inv"


@dataclass
class _Source:
    """Where one in-memory tensor (or one expert's slice of it) comes from in the checkpoint."""

    keys: list[tuple[str, str]] = field(default_factory=list)  # (source pattern or "", checkpoint key)
    converter: Any = None  # a transformers WeightConverter, or None: the tensor as stored
    primary: str = ""  # the name transformers gives the converter's output (its first target)
    stacked: bool = False  # the checkpoint holds [E, ...]: slice it


@dataclass
class ExpertsLayer:
    """One layer's routed experts: its module's per-expert parameters and shared ones."""

    layer: int
    prefix: str  # in-memory module name, e.g. model.layers.3.mlp.experts
    num_experts: int
    per_expert: dict[str, tuple[int, ...]]  # local name -> one expert's shape
    shared: dict[str, tuple[int, ...]]  # local name -> shape (e.g. a post-expert norm)


def experts_layout(model) -> dict[int, ExpertsLayer]:
    layers = {}
    names = {id(m): n for n, m in model.named_modules()}
    for layer, module in experts_modules(model).items():
        count = int(getattr(module, "num_experts", 0) or next(iter(module.parameters())).shape[0])
        per, shared = {}, {}
        for name, p in list(module.named_parameters()) + list(module.named_buffers()):
            if p.dim() >= 1 and p.shape[0] == count and "." not in name:
                per[name] = tuple(p.shape[1:])
            else:
                shared[name] = tuple(p.shape)
        layers[layer] = ExpertsLayer(layer, names[id(module)], count, per, shared)
    return layers


def expert_spec(model, layers: dict[int, ExpertsLayer], fmt: str, block: list[int] | None) -> dict[str, Any]:
    """What a worker needs to run these experts exactly, recorded in the manifest."""
    module = next(iter(experts_modules(model).values()))
    cls = type(module)
    from transformers.integrations.moe import _default_apply_gate

    flags = {
        k: bool(getattr(module, k))
        for k in ("has_gate", "has_bias", "is_transposed", "is_concatenated", "has_post_expert_norm")
    }
    act = type(getattr(module, "act_fn", None)).__name__
    default_gate = getattr(cls, "_apply_gate", None) is _default_apply_gate
    swiglu = (
        flags["has_gate"]
        and flags["is_concatenated"]
        and not flags["has_bias"]
        and not flags["has_post_expert_norm"]
        and default_gate
        and act == "SiLUActivation"
        and set(next(iter(layers.values())).per_expert) == {"gate_up_proj", "down_proj"}
    )
    first = next(iter(layers.values()))
    return {
        "class": f"{cls.__module__}:{cls.__qualname__}",
        "flags": flags,
        "activation": act,
        "default_gate": default_gate,
        "swiglu": bool(swiglu),
        "format": fmt,
        "block": block,
        "parameters": {k: list(v) for k, v in first.per_expert.items()},
        "shared": {k: list(v) for k, v in first.shared.items()},
        "top_k": _top_k(model),
        "hidden_size": int(_text(model.config).hidden_size),
        "num_hidden_layers": _decoder_layers(model),
        "shared_experts": any("shared_expert" in name for name, _ in model.named_modules()),
    }


def _decoder_layers(model) -> int:
    """Decoder layers, counted (nemotron_h's config gives a layer pattern, not a count)."""
    counts = [
        len(m) for name, m in model.named_modules() if name.endswith("layers") and isinstance(m, torch.nn.ModuleList)
    ]
    return max(counts) if counts else int(_text(model.config).num_hidden_layers)


_TOP_K_NAMES = ("num_experts_per_tok", "top_k_experts", "moe_k", "moe_top_k", "top_k", "num_selected_experts")


def _top_k(model) -> int:
    """Experts per token, by the names configs use for it, else the router's attribute."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    for name in _TOP_K_NAMES:
        raw = getattr(config, name, None)
        if isinstance(raw, int) and not isinstance(raw, bool) and raw > 0:
            return raw
    for module in model.modules():
        k = getattr(module, "top_k", None)
        if isinstance(k, int) and k > 0:
            return k
    raise ConfigError("cannot tell how many experts each token uses (num_experts_per_tok)")


def _text(config):
    return config.get_text_config() if hasattr(config, "get_text_config") else config


class CheckpointMap:
    """Checkpoint names -> in-memory names, by transformers' conversion rules."""

    def __init__(self, model, names: set[str]):
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, apply_renamings

        transforms = get_model_conversion_mapping(model)
        self.renamings = [t for t in transforms if not isinstance(t, WeightConverter)]
        self.converters = [t for t in transforms if isinstance(t, WeightConverter)]
        self._apply_renamings = apply_renamings
        self.prefix = model.base_model_prefix
        self.meta = {k: None for k in model.state_dict()}
        self.sources: dict[str, _Source] = defaultdict(_Source)  # in-memory name -> its sources
        # in-memory name -> companion suffix -> its (source pattern, checkpoint key)s
        self.companions: dict[str, dict[str, list[tuple[str, str]]]] = defaultdict(lambda: defaultdict(list))
        self.unused: list[str] = []
        for key in sorted(names):
            self._place(key)

    def rename(self, key: str) -> tuple[str, Any, str | None]:
        """(in-memory name, the converter that matched or None, its source pattern)."""
        renamed = self._apply_renamings(key, self.renamings)
        for converter in self.converters:
            target, pattern = converter.rename_source_key(renamed)
            if pattern is not None:
                return self._prefixed(target), converter, pattern
        return self._prefixed(renamed), None, None

    def _prefixed(self, name: str) -> str:
        """transformers adds or drops the base model prefix to find the name in the model."""
        p = self.prefix
        if p and name.startswith(p + ".") and name[len(p) + 1 :] in self.meta:
            return name[len(p) + 1 :]
        if p and name not in self.meta and f"{p}.{name}" in self.meta:
            return f"{p}.{name}"
        return name

    def _place(self, key: str) -> None:
        if key.endswith(_FP8_SCALE):  # a per-tensor checkpoint's fp8 scales follow their weight's rule
            target, _, pattern = self.rename(key[: -len("_scale_inv")])
            self.companions[target]["_scale_inv"].append((pattern or "", key))
            return
        target, converter, pattern = self.rename(key)
        if target not in self.meta and self._prefixed(key) in self.meta:
            # a renaming written for the original release's names (deepseek_v4: `.norm.` ->
            # `.kv_norm.`) also matches a name transformers itself saved: keep the name as saved
            target, converter, pattern = self._prefixed(key), None, None
        if target not in self.meta:
            for suffix in _COMPANIONS:  # a stacked companion: gate_up_proj_blocks, ..._scale_inv
                base, conv, _ = self.rename(key[: -len(suffix)]) if key.endswith(suffix) else (None, None, None)
                if base in self.meta and conv is None:
                    self.companions[base][suffix].append(("", key))
                    return
            if not key.endswith("rotary_emb.inv_freq"):
                self.unused.append(key)
            return
        for name in [target, *_siblings(converter, target)]:
            source = self.sources[name]
            source.converter, source.primary = converter, target
            source.keys.append((pattern or "", key))


def _siblings(converter, target: str) -> list[str]:
    """The other outputs of a one-to-many converter (a fused in_proj split into qkv, z, b, a):
    transformers names only the first; each sibling reads the same sources."""
    patterns = [p.replace("*.", "") for p in getattr(converter, "target_patterns", ())] if converter else []
    if len(patterns) < 2 or patterns[0] not in target:
        return []
    return [target.replace(patterns[0], other, 1) for other in patterns[1:]]


def _expert_of(key: str, layer: int) -> int | None:
    """The expert index in a per-expert checkpoint key (`...layers.3.mlp.experts.7.w1.weight` -> 7):
    the last number that is not the layer's."""
    parts = key.split(".")
    skip = parts.index("layers") + 1 if "layers" in parts else -1
    numbers = [int(p) for i, p in enumerate(parts) if p.isdigit() and i != skip]
    return numbers[-1] if numbers else None


def convert(converter, pieces: dict[str, list[torch.Tensor]], target: str, model, primary: str = "") -> torch.Tensor:
    """Run a transformers converter's operations on some of its sources (one expert's), and
    take the output that is `target` (a one-to-many converter splits a fused tensor; its ops
    size the pieces from the `primary` name, the one transformers gives the converter)."""
    data: dict[str, Any] = pieces  # consumed: transformers' ops pop each source as they merge it
    for op in converter.operations:
        data = op.convert(
            data,
            source_patterns=converter.source_patterns,
            target_patterns=converter.target_patterns,
            full_layer_name=primary or target,
            model=model,
            config=model.config,
            missing_keys=None,
        )
    if len(data) == 1:
        return next(iter(data.values()))
    named = [k for k in data if _names(target, k)]
    if len(named) != 1:
        raise CheckpointError(f"converting {target}: transformers produced {sorted(data)}; none is it")
    return data[named[0]]


def _names(full: str, pattern: str) -> bool:
    """Whether a converter's output pattern (`linear_attn.in_proj_qkv`) is the full name's module."""
    pattern = pattern.replace("*.", "")
    return (
        full == pattern
        or full.endswith("." + pattern)
        or ("." + pattern + ".") in ("." + full + ".")
        or full.startswith(pattern + ".")
    )


class TransformersSharder:
    def __init__(self, src: Path, progress: Progress | None = None, extra_layers: int = 0):
        """`extra_layers`: build the model with that many decoder layers more than its config
        says, to read the layers a checkpoint ships after its last (store/mtp_sharder.py)."""
        self.src = Path(src)
        self.tick = progress or (lambda _msg: None)
        self.ckpt = HFCheckpoint(self.src, parse_config=False)
        self.raw = self.ckpt.raw_config
        self.model_raw = _with_layers(self.raw, extra_layers) if extra_layers else self.raw
        self.format = format_of(self.raw.get("quantization_config"))
        q = self.raw.get("quantization_config") or {}
        self.block = list(q.get("weight_block_size") or [128, 128]) if self.format == FORMAT_FP8_BLOCK else None
        self.trunk_dtype = _dtype_of(self.raw)
        self.model = build_skeleton(self.model_raw, torch.float32)
        self.layers = experts_layout(self.model)
        if not self.layers:
            raise UnsupportedModelError(
                self.raw.get("model_type"),
                hooked_model_types(),
                str(self.src / "config.json"),
                reason="this config has no layer with routed experts using transformers' "
                "experts hook (neuro_dask serves mixture-of-experts models)",
            )
        self.map = CheckpointMap(self.model, self.ckpt.names)
        self.trunk = trunk_shapes(self.model)

    # ---- the trunk ----------------------------------------------------------------------------

    def trunk_specs(self) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
        """(name, dtype, shape) of every trunk tensor, known before any is read (floating
        tensors become the trunk's dtype, FP8 ones dequantized), so the trunk streams to disk."""
        specs = []
        for name, shape in self.trunk.items():
            source = self.map.sources.get(name)
            if source is None or not source.keys:
                raise MissingTensorError(name, str(self.src))
            dtype, _ = self.ckpt.spec(TensorRef(source.keys[0][1]))
            specs.append((name, self.trunk_dtype if dtype.is_floating_point else dtype, shape))
        return specs

    def trunk_tensors(self, specs) -> Iterator[torch.Tensor]:
        """One tensor at a time: peak memory is the largest trunk tensor, not the trunk."""
        for name, _, shape in specs:
            t = self._whole(name)
            if tuple(t.shape) != shape:
                raise TensorShapeError(name, str(self.src), shape, tuple(t.shape))
            yield t

    def _whole(self, name: str) -> torch.Tensor:
        source = self.map.sources.get(name)
        if source is None or not source.keys:
            raise MissingTensorError(name, str(self.src))
        if source.converter is None:
            ((_, key),) = source.keys
            t = self.ckpt.read_key(key)
        else:
            pieces: dict[str, list[torch.Tensor]] = defaultdict(list)
            for pattern, key in sorted(source.keys, key=lambda pk: _natural(pk[1])):
                pieces[pattern].append(self.ckpt.read_key(key))
            t = convert(source.converter, pieces, name, self.model, source.primary)
        scales = self.map.companions.get(name, {}).get("_scale_inv")
        if scales and t.dtype == torch.float8_e4m3fn:
            ((_, skey),) = scales
            t = dequantize_fp8_block(
                t, self.ckpt.read_key(skey).float(), tuple(self.block or (128, 128)), torch.float32
            )
        return t.to(self.trunk_dtype) if t.is_floating_point() else t

    # ---- one expert ---------------------------------------------------------------------------

    def expert_tensors(self, spec: ExpertsLayer, expert: int) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for local, shape in spec.per_expert.items():
            full = f"{spec.prefix}.{local}"
            companions = self.map.companions.get(full, {})
            if "_blocks" in companions:  # mxfp4: blocks and scales as published, sliced
                for suffix in ("_blocks", "_scales"):
                    out[local + suffix] = self._slice(companions[suffix], expert, spec.layer, full + suffix)
                _check_mxfp4(out[local + "_blocks"], shape, full)
                continue
            out[local] = self._slice_param(full, spec, expert)
            if out[local].dtype == torch.float8_e4m3fn:
                scales = companions.get("_scale_inv")
                if not scales:
                    raise MissingTensorError(full + "_scale_inv", str(self.src))
                source = self.map.sources[full]
                out[local + "_scale_inv"] = self._slice(
                    scales, expert, spec.layer, full + "_scale_inv", source.converter if not _stacked(scales) else None
                )
                if tuple(out[local].shape) != shape:
                    raise TensorShapeError(full, str(self.src), shape, tuple(out[local].shape))
            elif tuple(out[local].shape) != shape:
                raise TensorShapeError(full, str(self.src), shape, tuple(out[local].shape))
        for local in spec.shared:
            out[local] = self._whole(f"{spec.prefix}.{local}")
        return {k: v.contiguous() for k, v in out.items()}

    def _slice_param(self, full: str, spec: ExpertsLayer, expert: int) -> torch.Tensor:
        source = self.map.sources.get(full)
        if source is None or not source.keys:
            raise MissingTensorError(full, str(self.src))
        return self._slice(source.keys, expert, spec.layer, full, source.converter)

    def _slice(self, keys: list[tuple[str, str]], expert: int, layer: int, full: str, converter=None) -> torch.Tensor:
        if converter is None:
            if len(keys) != 1:
                raise CheckpointError(f"{self.src}: {full} has several sources {[k for _, k in keys]}")
            return self.ckpt.read_key(keys[0][1], expert)
        pieces: dict[str, list[torch.Tensor]] = defaultdict(list)
        if all(_expert_of(k, layer) is None for _, k in keys):  # stacked [E, ...], renamed or reshaped
            for pattern, key in keys:
                pieces[pattern].append(self.ckpt.read_key(key, expert).unsqueeze(0))
        else:
            for pattern, key in keys:
                if _expert_of(key, layer) == expert:
                    pieces[pattern].append(self.ckpt.read_key(key))
        if not pieces:
            raise MissingTensorError(f"{full} (expert {expert})", str(self.src))
        t = convert(converter, pieces, full, self.model)
        rank = len(_shape_of(self, full)) or t.dim() - 1  # a scale grid has its weight's rank
        while t.dim() > rank and t.shape[0] == 1:  # the converter stacked one expert: [1, ...]
            t = t[0]
        return t

    # ---- the whole store ----------------------------------------------------------------------

    def shard(self, dst: Path) -> Manifest:
        dst = Path(dst)
        dst.mkdir(parents=True, exist_ok=True)
        layers = mtp_layers(self.raw, self.ckpt.names)
        mtp = MtpSharder(TransformersSharder(self.src, self.tick, extra_layers=len(layers)), layers) if layers else None
        unused = [k for k in self.map.unused if mtp is None or not mtp.owns(k)]
        if unused:
            log.warning("%d checkpoint tensors are not used, e.g. %s", len(unused), unused[:3])
        specs = self.trunk_specs()
        artifacts = [_write_streaming(dst, TRUNK_PATH, specs, self.trunk_tensors(specs), ROLE_TRUNK)]
        self.tick(TRUNK_PATH)
        artifacts += self.write_experts(dst, sorted(self.layers), ROLE_EXPERT)
        if mtp is not None:
            artifacts += mtp.write(dst)
        for name in self.ckpt.tokenizer_files:
            shutil.copyfile(self.src / name, dst / name)
            artifacts.append(Artifact(name, ROLE_TOKENIZER, sha256_file(dst / name), (dst / name).stat().st_size))
        manifest = Manifest(
            architecture=str(self.raw.get("model_type")),
            config=self.raw,
            artifacts=tuple(artifacts),
            generation_config=self.ckpt.generation_config,
            tokenizer_files=tuple(self.ckpt.tokenizer_files),
            source=str(self.src),
            layout=LAYOUT_TRANSFORMERS,
            experts_spec=expert_spec(self.model, self.layers, self.format, self.block),
        )
        manifest.write(dst)
        log.info(
            "sharded %s into %s (transformers layout, %s experts): %d artifacts",
            self.src,
            dst,
            self.format,
            len(artifacts),
        )
        return manifest

    def write_file(self, dst: Path, rel: str, tensors: dict[str, torch.Tensor], role: str) -> Artifact:
        return _write(dst, rel, tensors, role)

    def write_experts(self, dst: Path, layers: list[int], role: str) -> list[Artifact]:
        """One file per expert of `layers`, each announced to the progress bar as it lands."""
        artifacts = []
        for layer in layers:
            spec = self.layers[layer]
            for expert in range(spec.num_experts):
                rel = expert_path(layer, expert)
                artifacts.append(_write(dst, rel, self.expert_tensors(spec, expert), role, layer, expert))
                self.tick(rel)
        return artifacts

    def count(self) -> int:
        """Files `shard` writes (the progress bar's total): the trunk and every expert, and the
        multi-token-prediction layers' when the checkpoint ships them."""
        mtp = mtp_layers(self.raw, self.ckpt.names)
        per_layer = max((s.num_experts for s in self.layers.values()), default=0)
        return 1 + sum(s.num_experts for s in self.layers.values()) + (1 + per_layer * len(mtp) if mtp else 0)


def _shape_of(sharder: TransformersSharder, full: str) -> tuple[int, ...]:
    """One expert's shape of an experts parameter (its stacked shape without the leading E)."""
    prefix, local = full.rsplit(".", 1)
    for spec in sharder.layers.values():
        if spec.prefix == prefix:
            base = local
            for suffix in _COMPANIONS:
                base = base.removesuffix(suffix)
            return tuple(spec.per_expert.get(base, ()))
    return ()


def _stacked(keys: list[tuple[str, str]]) -> bool:
    return len(keys) == 1 and keys[0][0] == ""


def _check_mxfp4(blocks: torch.Tensor, shape: tuple[int, ...], full: str) -> None:
    """blocks [R, C/32, 16] pack R x C values, two per byte: the parameter's element count."""
    if blocks.dtype != torch.uint8 or blocks.numel() * 2 != math.prod(shape):
        raise TensorShapeError(full + "_blocks", "mxfp4 blocks", shape, tuple(blocks.shape))


def _natural(key: str) -> list:
    return [int(p) if p.isdigit() else p for p in key.split(".")]


def _with_layers(raw: dict[str, Any], extra: int) -> dict[str, Any]:
    return {**raw, "num_hidden_layers": int(raw.get("num_hidden_layers") or 0) + extra}


def _dtype_of(raw: dict[str, Any]) -> torch.dtype:
    name = raw.get("dtype") or raw.get("torch_dtype") or "float32"
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}.get(
        str(name), torch.float32
    )


def _write(
    dst: Path,
    rel: str,
    tensors: dict[str, torch.Tensor],
    role: str,
    layer: int | None = None,
    expert: int | None = None,
) -> Artifact:
    specs = [(name, t.dtype, tuple(t.shape)) for name, t in tensors.items()]
    return _write_streaming(dst, rel, specs, iter(tensors.values()), role, layer, expert)


def _write_streaming(
    dst: Path,
    rel: str,
    specs: list[tuple[str, torch.dtype, tuple[int, ...]]],
    tensors: Iterator[torch.Tensor],
    role: str,
    layer: int | None = None,
    expert: int | None = None,
) -> Artifact:
    writer = StreamingWriter(dst / rel, specs, metadata={"format": "pt", "role": role})
    writer.write(tensors)
    dtypes = ",".join(sorted({DTYPE_NAMES[dtype] for _, dtype, _ in specs}))
    params = sum(_logical_params(name, math.prod(shape)) for name, _, shape in specs)
    return Artifact(rel, role, writer.sha256, writer.bytes, dtypes, layer, expert, params)


def _logical_params(name: str, numel: int) -> int:
    """Parameters a tensor stands for: scales count none, an mxfp4 byte holds two."""
    if name.endswith(("_scale_inv", "_scales")):
        return 0
    return numel * 2 if name.endswith("_blocks") else numel


def raw_config(src: Path) -> dict[str, Any]:
    """A checkpoint's config.json as it is ({} when absent or unreadable: the sharder says why)."""
    try:
        raw = json.loads((Path(src) / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return raw if isinstance(raw, dict) else {}
