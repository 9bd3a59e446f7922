"""MoEConfig: one frozen description of every supported MoE architecture, built from HF config.json.

Field names follow Hugging Face `config.json` where they mirror it. Each architecture's quirks
(q/k norms, shared expert, dense layers, renormalised top-k) become plain fields here, so that the
trunk and the experts never branch on `model_type`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from neuro_dask.errors import ConfigFieldError, MissingConfigError, UnsupportedModelError

QK_NORM_NONE = "none"
QK_NORM_PER_HEAD = "head"  # qwen3_moe: RMSNorm over head_dim, after the head split
QK_NORM_FULL = "full"  # olmoe: RMSNorm over all heads at once, before the split


@dataclass(frozen=True)
class MoEConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    num_experts: int
    num_experts_per_tok: int
    moe_intermediate_size: int
    norm_topk_prob: bool
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool = False
    intermediate_size: int = 0  # dense MLP layers (qwen mlp_only_layers); 0 when there are none
    shared_expert_intermediate_size: int = 0  # qwen2_moe; 0 = no shared expert
    attention_bias: bool = False  # bias on q, k, v and o
    qkv_bias: bool = False  # bias on q, k, v only (qwen2)
    qk_norm: str = QK_NORM_NONE
    clip_qkv: float | None = None
    sliding_window: int | None = None
    mlp_only_layers: tuple[int, ...] = ()
    decoder_sparse_step: int = 1
    hidden_act: str = "silu"
    bos_token_id: int | None = None
    eos_token_id: tuple[int, ...] = ()
    pad_token_id: int | None = None

    def is_moe_layer(self, layer: int) -> bool:
        """Qwen-style rule: MoE unless listed in mlp_only_layers or off the sparse step."""
        return layer not in self.mlp_only_layers and (layer + 1) % self.decoder_sparse_step == 0

    @property
    def moe_layers(self) -> tuple[int, ...]:
        return tuple(i for i in range(self.num_hidden_layers) if self.is_moe_layer(i))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["mlp_only_layers"] = list(self.mlp_only_layers)
        d["eos_token_id"] = list(self.eos_token_id)
        return d

    @classmethod
    def from_hf(cls, raw: Mapping[str, Any], path: str = "config.json") -> MoEConfig:
        """Build from a parsed HF config.json; refuse anything we cannot run exactly."""
        model_type = raw.get("model_type")
        parser = _PARSERS.get(model_type)  # type: ignore[arg-type]
        if parser is None:
            raise UnsupportedModelError(model_type, SUPPORTED_MODEL_TYPES, path)
        fields = parser(_Reader(raw, path))
        cfg = cls(model_type=model_type, **fields)
        _validate(cfg, path)
        return cfg

    @classmethod
    def from_file(cls, path: str | Path) -> MoEConfig:
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise MissingConfigError(str(path.parent if path.name == "config.json" else path))
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ConfigFieldError(str(path), "(whole file)", f"is not valid JSON: {exc}") from exc
        return cls.from_hf(raw, str(path))


class _Reader:
    """Reads fields of a raw config with errors that name the file and the field."""

    def __init__(self, raw: Mapping[str, Any], path: str):
        self.raw = raw
        self.path = path

    def get(self, name: str, default: Any = None) -> Any:
        value = self.raw.get(name, default)
        return default if value is None else value

    def int(self, name: str, default: int | None = None) -> int:
        value = self.raw.get(name, default)
        if value is None:
            raise ConfigFieldError(self.path, name, "is required and missing")
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigFieldError(self.path, name, f"must be an integer, got {value!r}")
        return value

    def float(self, name: str, default: float | None = None) -> float:
        value = self.raw.get(name, default)
        if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigFieldError(self.path, name, f"must be a number, got {value!r}")
        return float(value)

    def rope_theta(self) -> float:
        """rope_parameters (transformers 5) or rope_theta/rope_scaling (older files)."""
        params = self.raw.get("rope_parameters")
        scaling = self.raw.get("rope_scaling")
        if isinstance(params, Mapping):
            kind = params.get("rope_type", "default")
            theta = params.get("rope_theta", self.raw.get("rope_theta", 10000.0))
        else:
            kind = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
            theta = self.raw.get("rope_theta", 10000.0)
        if kind != "default":
            raise ConfigFieldError(
                self.path, "rope_parameters.rope_type", f"is {kind!r}; only 'default' RoPE is supported"
            )
        return float(theta)

    def eos(self) -> tuple[int, ...]:
        value = self.raw.get("eos_token_id")
        if value is None:
            return ()
        return tuple(value) if isinstance(value, list) else (int(value),)

    def common(self) -> dict[str, Any]:
        heads = self.int("num_attention_heads")
        hidden = self.int("hidden_size")
        return dict(
            vocab_size=self.int("vocab_size"),
            hidden_size=hidden,
            num_hidden_layers=self.int("num_hidden_layers"),
            num_attention_heads=heads,
            num_key_value_heads=self.int("num_key_value_heads", heads),
            head_dim=int(self.get("head_dim", hidden // heads)),
            num_experts_per_tok=self.int("num_experts_per_tok"),
            rms_norm_eps=self.float("rms_norm_eps", 1e-6),
            rope_theta=self.rope_theta(),
            max_position_embeddings=self.int("max_position_embeddings"),
            tie_word_embeddings=bool(self.get("tie_word_embeddings", False)),
            hidden_act=str(self.get("hidden_act", "silu")),
            bos_token_id=self.get("bos_token_id"),
            eos_token_id=self.eos(),
            pad_token_id=self.get("pad_token_id"),
        )

    def qwen_layers(self) -> dict[str, Any]:
        if self.get("use_sliding_window", False):
            raise ConfigFieldError(
                self.path, "use_sliding_window", "is true; sliding-window Qwen MoE layers are not supported"
            )
        return dict(
            mlp_only_layers=tuple(self.get("mlp_only_layers", ())),
            decoder_sparse_step=self.int("decoder_sparse_step", 1),
            intermediate_size=self.int("intermediate_size", 0),
        )


def _parse_mixtral(r: _Reader) -> dict[str, Any]:
    return dict(
        **r.common(),
        num_experts=r.int("num_local_experts"),
        moe_intermediate_size=r.int("intermediate_size"),
        norm_topk_prob=True,  # Mixtral always renormalises its top-k
        sliding_window=r.get("sliding_window"),
    )


def _parse_qwen2_moe(r: _Reader) -> dict[str, Any]:
    return dict(
        **r.common(),
        **r.qwen_layers(),
        num_experts=r.int("num_experts"),
        moe_intermediate_size=r.int("moe_intermediate_size"),
        shared_expert_intermediate_size=r.int("shared_expert_intermediate_size", 0),
        norm_topk_prob=bool(r.get("norm_topk_prob", False)),
        qkv_bias=bool(r.get("qkv_bias", True)),
    )


def _parse_qwen3_moe(r: _Reader) -> dict[str, Any]:
    return dict(
        **r.common(),
        **r.qwen_layers(),
        num_experts=r.int("num_experts", r.raw.get("num_local_experts")),
        moe_intermediate_size=r.int("moe_intermediate_size"),
        norm_topk_prob=bool(r.get("norm_topk_prob", False)),
        attention_bias=bool(r.get("attention_bias", False)),
        qk_norm=QK_NORM_PER_HEAD,
    )


def _parse_olmoe(r: _Reader) -> dict[str, Any]:
    fields = r.common()
    # transformers sizes OLMoE's q/k norms from hidden_size // heads whatever head_dim says.
    fields["head_dim"] = fields["hidden_size"] // fields["num_attention_heads"]
    return dict(
        **fields,
        num_experts=r.int("num_experts"),
        moe_intermediate_size=r.int("intermediate_size"),
        norm_topk_prob=bool(r.get("norm_topk_prob", False)),
        attention_bias=bool(r.get("attention_bias", False)),
        qk_norm=QK_NORM_FULL,
        clip_qkv=r.raw.get("clip_qkv"),
    )


_PARSERS: dict[str, Callable[[_Reader], dict[str, Any]]] = {
    "mixtral": _parse_mixtral,
    "qwen2_moe": _parse_qwen2_moe,
    "qwen3_moe": _parse_qwen3_moe,
    "olmoe": _parse_olmoe,
}
SUPPORTED_MODEL_TYPES: tuple[str, ...] = tuple(sorted(_PARSERS))


def _validate(cfg: MoEConfig, path: str) -> None:
    def bad(name: str, problem: str) -> None:
        raise ConfigFieldError(path, name, problem)

    for name in (
        "vocab_size",
        "hidden_size",
        "num_hidden_layers",
        "num_attention_heads",
        "head_dim",
        "num_experts",
        "num_experts_per_tok",
        "moe_intermediate_size",
        "max_position_embeddings",
    ):
        if getattr(cfg, name) <= 0:
            bad(name, f"must be positive, got {getattr(cfg, name)}")
    if cfg.num_attention_heads % cfg.num_key_value_heads:
        bad("num_key_value_heads", f"must divide num_attention_heads ({cfg.num_attention_heads})")
    if cfg.num_experts_per_tok > cfg.num_experts:
        bad("num_experts_per_tok", f"({cfg.num_experts_per_tok}) exceeds the number of experts ({cfg.num_experts})")
    if cfg.head_dim % 2:
        bad("head_dim", "must be even for rotary embeddings")
    if cfg.hidden_act != "silu":
        bad("hidden_act", f"is {cfg.hidden_act!r}; the SwiGLU experts need 'silu'")
    if len(cfg.moe_layers) < cfg.num_hidden_layers and cfg.intermediate_size <= 0:
        bad("intermediate_size", "must be positive when some layers are dense (mlp_only_layers)")
    if cfg.sliding_window is not None and cfg.sliding_window <= 0:
        bad("sliding_window", f"must be positive or null, got {cfg.sliding_window}")
