"""What the rest of neuro_dask needs to know of a transformers-layout model, without transformers.

The scheduler, the workers' memory planning, `inspect` and the request limits read a handful of
facts (layers, experts per layer, top-k, widths, special tokens). For the hand-written trunk's
architectures MoEConfig parses them per family; for every other architecture they come from the
manifest, which the sharder filled from transformers' own model. Same field names as MoEConfig.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from neuro_dask.errors import ConfigFieldError


@dataclass(frozen=True)
class TransformersMoEConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_experts: int
    num_experts_per_tok: int
    moe_layers: tuple[int, ...]
    moe_intermediate_size: int  # the SwiGLU width with the same parameter count (memory planning)
    max_position_embeddings: int
    expert_parameters: int  # per expert, as a worker computes with it
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_id: tuple[int, ...] = ()
    pad_token_id: int | None = None
    raw: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def is_moe_layer(self, layer: int) -> bool:
        return layer in self.moe_layers

    def to_dict(self) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.__dict__.items() if k != "raw"}

    @classmethod
    def from_manifest(
        cls, model_type: str, raw: Mapping[str, Any], spec: Mapping[str, Any], experts: Iterable[Any]
    ) -> TransformersMoEConfig:
        where = "manifest.json:config"
        text = raw.get("text_config") if isinstance(raw.get("text_config"), Mapping) else raw
        per_layer: dict[int, int] = {}
        for a in experts:
            per_layer[a.layer] = max(per_layer.get(a.layer, 0), a.expert + 1)
        if not per_layer:
            raise ConfigFieldError(where, "experts", "lists no experts; re-run `neuro-dask shard`")
        hidden = _positive(spec.get("hidden_size", text.get("hidden_size")), "hidden_size", where)
        params = sum(_prod(shape) for shape in dict(spec.get("parameters") or {}).values())
        eos = text.get("eos_token_id")
        return cls(
            model_type=model_type,
            vocab_size=_positive(text.get("vocab_size"), "vocab_size", where),
            hidden_size=hidden,
            num_hidden_layers=_positive(
                spec.get("num_hidden_layers", text.get("num_hidden_layers")), "num_hidden_layers", where
            ),
            num_experts=max(per_layer.values()),
            num_experts_per_tok=_positive(spec.get("top_k"), "experts_spec.top_k", where),
            moe_layers=tuple(sorted(per_layer)),
            moe_intermediate_size=max(1, params // (3 * hidden)),
            max_position_embeddings=_positive(
                text.get("max_position_embeddings", 1 << 20), "max_position_embeddings", where
            ),
            expert_parameters=params,
            tie_word_embeddings=bool(text.get("tie_word_embeddings", False)),
            bos_token_id=_maybe_int(text.get("bos_token_id")),
            eos_token_id=tuple(int(e) for e in eos) if isinstance(eos, list) else (() if eos is None else (int(eos),)),
            pad_token_id=_maybe_int(text.get("pad_token_id")),
            raw=raw,
        )


def _positive(value: Any, name: str, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigFieldError(where, name, f"must be a positive integer, got {value!r}")
    return value


def _maybe_int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _prod(shape: Iterable[int]) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n
