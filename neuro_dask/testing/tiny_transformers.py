"""Tiny random Mixture-of-Experts causal LMs for every hooked model type in the installed transformers.

A model type is *hooked* when its modeling file decorates an experts class with
``@use_experts_implementation`` (``transformers.integrations.moe``): those are the experts whose
stacked weights the project serves from remote workers while the router and trunk run on the
client. For each hooked type that is a causal LM, ``tiny_config`` shrinks transformers' own
default config (``AutoConfig.for_model``) with generic rules (sizes, expert counts, top-k,
MLA/linear-attention/mamba dims, per-layer patterns truncated so that every kind of layer still
appears), plus a small per-type table where the generic rules are not enough.

``build_tiny_model`` builds one on CPU in float32 with ``AutoModelForCausalLM.from_config``;
``write_tiny_checkpoint`` saves it with ``save_pretrained`` (what transformers ships);
``skipped`` tries every hooked type and says why each one that cannot be built is left out.
"""

from __future__ import annotations

import functools
import re
from collections import Counter
from pathlib import Path
from typing import Any

__all__ = [
    "HOOKED_MODEL_TYPES",
    "REQUIRED",
    "TinyModelUnavailable",
    "build_tiny_model",
    "buildable",
    "config_num_experts",
    "config_top_k",
    "expert_count",
    "experts_modules",
    "padded_prompts",
    "skipped",
    "tiny_config",
    "write_tiny_checkpoint",
]

REQUIRED: tuple[str, ...] = (
    "mixtral",
    "qwen2_moe",
    "qwen3_moe",
    "olmoe",
    "deepseek_v3",
    "deepseek_v32",
    "gpt_oss",
    "qwen3_5_moe",
    "qwen3_next",
    "glm4_moe",
    "minimax_m2",
    "ernie4_5_moe",
    "hunyuan_v1_moe",
    "granitemoe",
)

NUM_LAYERS = 3
NUM_EXPERTS = 8
TOP_K = 2
INITIALIZER_RANGE = 0.15
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2


class TinyModelUnavailable(Exception):
    """This model type cannot be built tiny as a text causal LM here; the message says why."""


# --------------------------------------------------------------------------- enumeration

_HOOK = "@use_experts_implementation"


def _hooked_folders() -> set[str]:
    import transformers

    models = Path(transformers.__file__).parent / "models"
    return {p.parent.name for p in models.glob("*/modeling_*.py") if _HOOK in p.read_text(encoding="utf-8")}


def _folder_types() -> dict[str, list[str]]:
    """Hooked modeling folder -> every model type (CONFIG_MAPPING key) that the folder defines."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES, model_type_to_module_name

    folders = _hooked_folders()
    out: dict[str, list[str]] = {folder: [] for folder in sorted(folders)}
    for model_type in CONFIG_MAPPING_NAMES:
        folder = model_type_to_module_name(model_type)
        if folder in folders:
            out[folder].append(model_type)
    return out


def _enumerate() -> tuple[tuple[str, ...], dict[str, str]]:
    """(hooked causal-LM model types, {model type of a hooked folder without one: why})."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    hooked: list[str] = []
    no_causal: dict[str, str] = {}
    for folder, types in _folder_types().items():
        causal = [t for t in types if t in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES]
        hooked.extend(causal)
        if not causal:
            key = folder if folder in types else (types[0] if types else folder)
            heads = _head_classes(folder)
            unregistered = [h for h in heads if h.endswith("ForCausalLM")]
            what = (
                f"defines {', '.join(unregistered)} but AutoModelForCausalLM has no mapping for it"
                if unregistered
                else f"no text-only causal LM (heads: {', '.join(heads) or 'none'})"
            )
            no_causal[key] = (
                f"no AutoModelForCausalLM type: none of {', '.join(types) or folder} is in "
                f"MODEL_FOR_CAUSAL_LM_MAPPING_NAMES; transformers.models.{folder} {what}"
            )
    return tuple(sorted(hooked)), no_causal


def _head_classes(folder: str) -> list[str]:
    """Model classes with a task head (`...For<Task>`) that a modeling folder defines."""
    import transformers

    found: list[str] = []
    for path in sorted((Path(transformers.__file__).parent / "models" / folder).glob("modeling_*.py")):
        found += re.findall(r"^class (\w+For[A-Z]\w*)\(", path.read_text(encoding="utf-8"), re.M)
    return [name for name in found if "PreTrained" not in name]


HOOKED_MODEL_TYPES, _NO_CAUSAL_LM = _enumerate()


# --------------------------------------------------------------------------- generic shrinking rules

# Exact keys set wherever the default config has them and they are not None ("feature off"),
# except head_dim, which some configs leave None although the model needs it (hunyuan_v1_moe).
_SIZES: dict[str, Any] = {
    "vocab_size": 128,
    "hidden_size": 64,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "intermediate_size": 96,
    "max_position_embeddings": 256,
    "sliding_window": 8,
    "sliding_window_size": 8,
    "hidden_size_per_layer_input": 16,
    # multi-head latent attention (deepseek v2/v3 style)
    "q_lora_rank": 32,
    "kv_lora_rank": 32,
    "qk_rope_head_dim": 16,
    "qk_nope_head_dim": 16,
    "qk_head_dim": 32,
    "v_head_dim": 16,
    "o_lora_rank": 32,
    # DeepSeek sparse attention indexer
    "index_topk": 8,
    "index_head_dim": 16,
    "index_n_heads": 2,
    # gated delta net / linear attention
    "linear_num_key_heads": 2,
    "linear_num_value_heads": 4,
    "linear_key_head_dim": 16,
    "linear_value_head_dim": 16,
    "linear_head_dim": 16,
    "linear_num_heads": 4,
    # mamba (expand 2 * hidden 64 = 128 = 8 heads * 16)
    "mamba_n_heads": 8,
    "mamba_num_heads": 8,
    "mamba_d_head": 16,
    "mamba_head_dim": 16,
    "mamba_d_state": 16,
    "ssm_state_size": 16,
    "mamba_chunk_size": 16,
    "mamba_expand": 2,
    "expand": 2,
    "n_groups": 1,
    "mamba_n_groups": 1,
}
_EXPERT_COUNT_KEYS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")
_TOP_K_KEYS = (
    "num_experts_per_tok",
    "num_experts_per_token",
    "moe_k",
    "moe_topk",
    "experts_per_token",
    "top_k",
    "top_k_experts",
)
_GROUP_KEYS = ("n_group", "num_expert_group")
# Other intermediate sizes (experts, shared experts, dense prefix...) are all set to this.
_SMALL_INTERMEDIATE = 48


def _select_layers(per_layer: dict[str, list], n: int) -> list[int]:
    """Indices (sorted) of at least n layers that show every value of every per-layer list.

    Layers are taken whole (the same indices for every list), so the tiny stack only has
    combinations of layer kinds that the real model has. Layers are first taken in order until
    each (list, value) pair is covered, then from the most common combination (the steady state).
    """
    length = len(next(iter(per_layer.values())))
    sig = [tuple(repr(v[i]) for v in per_layer.values()) for i in range(length)]
    covered: set[tuple[int, str]] = set()
    chosen: list[int] = []
    for i in range(length):
        pairs = set(enumerate(sig[i]))
        if not pairs <= covered:
            covered |= pairs
            chosen.append(i)
    counts = Counter(sig)
    for i in sorted(range(length), key=lambda i: (-counts[sig[i]], i)):
        if len(chosen) >= n:
            break
        if i not in chosen:
            chosen.append(i)
    return sorted(chosen)


def _per_layer_entries(value: Any, old_layers: int) -> dict[int, Any] | None:
    """A {layer index: overrides} dict (keys may be strings such as "02"), else None."""
    if not isinstance(value, dict) or not value:
        return None
    try:
        entries = {int(k): v for k, v in value.items()}
    except (TypeError, ValueError):
        return None
    if all(0 <= k < old_layers and isinstance(v, dict) for k, v in entries.items()):
        return entries
    return None


def _is_per_layer(value: Any, layers: int) -> bool:
    return isinstance(value, list) and layers > 1 and len(value) == layers


def _shrink(defaults: dict[str, Any]) -> dict[str, Any]:
    """Overrides (only keys whose values change) that make the config described by `defaults` tiny."""
    out: dict[str, Any] = {}

    def put(key: str, value: Any, *, when_none: bool = False) -> None:
        """Set `key` if the config has it; a None default (often "feature off") only if `when_none`."""
        if key in defaults and (when_none or defaults[key] is not None) and defaults[key] != value:
            out[key] = value

    for key, value in _SIZES.items():
        put(key, value, when_none=key == "head_dim")
    if "kv_lora_rank" in defaults:  # latent attention expands k/v per query head: no grouping
        put("num_key_value_heads", _SIZES["num_attention_heads"])
    for key, value in defaults.items():  # sliding-window layers' own sizes (inkling: swa_head_dim...)
        if key.startswith("swa_") and key[4:] in _SIZES and isinstance(value, int):
            put(key, _SIZES[key[4:]])
    rope_dim, nope_dim, head_dim = (defaults.get(k) for k in ("qk_rope_head_dim", "qk_nope_head_dim", "head_dim"))
    if all(isinstance(v, int) for v in (rope_dim, nope_dim, head_dim)):  # keep MLA's head_dim relation
        if head_dim == rope_dim + nope_dim:
            put("head_dim", _SIZES["qk_rope_head_dim"] + _SIZES["qk_nope_head_dim"])
        elif head_dim == rope_dim:
            put("head_dim", _SIZES["qk_rope_head_dim"])
    for key, value in defaults.items():
        if (
            key != "intermediate_size"
            and key.endswith("intermediate_size")
            and (isinstance(value, int) or (value is None and ("moe" in key or "expert" in key)))
        ):
            put(key, _SMALL_INTERMEDIATE, when_none=True)
    for key, value in defaults.items():  # embedding tables beside the main one
        if "vocab_size" in key and isinstance(value, int) and value > _SIZES["vocab_size"] and key != "vocab_size":
            put(key, _SIZES["vocab_size"])
    # Several configs default to "no MoE" with None/1 experts (deepseek_v2, dots1, hunyuan, gemma4).
    for key in _EXPERT_COUNT_KEYS:
        put(key, NUM_EXPERTS, when_none=True)
    for key in _TOP_K_KEYS:
        put(key, TOP_K, when_none=True)
    put("enable_moe_block", True)
    for key in _GROUP_KEYS:
        if isinstance(defaults.get(key), int) and defaults[key] > 1:
            put(key, 2)
            put("topk_group", 1)
    for key in ("first_k_dense_replace", "num_dense_layers"):  # keep at most one dense prefix layer
        if isinstance(defaults.get(key), int):
            put(key, min(defaults[key], 1))
    put("initializer_range", INITIALIZER_RANGE)

    # Per-layer patterns: keep a few whole layers of the real stack such that each kind of layer
    # (sliding/full, linear/full, dense/sparse, mamba/attention...) still appears.
    old_layers = defaults.get("num_hidden_layers")
    if isinstance(old_layers, int) and old_layers > 0:
        per_layer = {k: v for k, v in defaults.items() if _is_per_layer(v, old_layers)}
        idx = _select_layers(per_layer, NUM_LAYERS) if per_layer else list(range(NUM_LAYERS))
        layers = len(idx)
        put("num_hidden_layers", layers)
        for key, value in per_layer.items():
            base = key[: -len("_per_layer")] if key.endswith("_per_layer") else None
            if base in _SIZES and all(isinstance(v, int) for v in value):  # laguna: heads per layer
                put(key, [_SIZES[base]] * layers)
            else:
                put(key, [value[i] for i in idx])
        # heterogeneous layers (transformers' per_layer_config): follow the same layers, shrunk
        entries = _per_layer_entries(defaults.get("per_layer_config"), old_layers)
        if entries is not None:
            width = max((len(k) for k in defaults["per_layer_config"] if isinstance(k, str)), default=0)
            layer_free = {
                k: v
                for k, v in defaults.items()
                if k not in per_layer and k not in ("per_layer_config", "num_hidden_layers")
            }
            out["per_layer_config"] = {
                (str(new).zfill(width) if width else new): _shrink_layer(entries[old], layer_free, out)
                for new, old in enumerate(idx)
                if old in entries
            }
        # indices of layers, clamped into the tiny stack
        for key in ("max_window_layers", "moe_layer_end_index"):
            if isinstance(defaults.get(key), int) and defaults[key] >= layers:
                put(key, layers - 1 if key.endswith("index") else layers)

    # special token ids inside the tiny vocab (also where the default is None: generate pads with pad)
    for key, value in (("pad_token_id", PAD_ID), ("bos_token_id", BOS_ID), ("eos_token_id", EOS_ID)):
        put(key, [value] if isinstance(defaults.get(key), list) else value, when_none=True)

    rope = _shrink_rope(defaults.get("rope_parameters"), defaults, out)
    if rope is not None:
        out["rope_parameters"] = rope
    out.update(_PER_TYPE.get(defaults.get("model_type", ""), {}))
    return out


def _shrink_layer(entry: dict[str, Any], layer_free: dict[str, Any], tiny: dict[str, Any]) -> dict[str, Any]:
    """One layer's overrides, shrunk by the same rules applied to the layer's resolved config (so
    relations such as MLA's head_dim = nope + rope hold per layer); keeps the keys it overrides
    plus any whose tiny value differs from the global tiny value."""
    shrunk = _shrink({**layer_free, **entry})
    out = {key: shrunk.get(key, value) for key, value in entry.items()}
    for key, value in shrunk.items():
        if key not in entry and value != tiny.get(key, layer_free.get(key)):
            out[key] = value
    return out


def _shrink_rope(rope: Any, defaults: dict[str, Any], out: dict[str, Any]) -> Any:
    """Rope parameters kept valid at max_position_embeddings 256 and head_dim 16 (None: unchanged)."""
    if not isinstance(rope, dict):
        return None
    if rope and all(isinstance(v, dict) or v is None for v in rope.values()):  # keyed by layer type
        new = {k: (_shrink_rope(v, defaults, out) or v) for k, v in rope.items()}
        return new if new != rope else None
    new = dict(rope)
    max_pos = out.get("max_position_embeddings", defaults.get("max_position_embeddings"))
    orig = new.get("original_max_position_embeddings")
    if isinstance(orig, int) and isinstance(max_pos, int) and orig >= max_pos:
        # keep yarn's factor == max_position_embeddings / original_max_position_embeddings
        factor = max(float(new.get("factor") or 1.0), 1.0)
        new["original_max_position_embeddings"] = max(1, int(max_pos / factor))
        if "factor" in new:
            new["factor"] = max_pos / new["original_max_position_embeddings"]
    if "mrope_section" in new:
        head_dim = out.get("head_dim", 16)
        rotary_half = int(head_dim * new.get("partial_rotary_factor", 1.0)) // 2
        sections = len(new["mrope_section"])
        base = [rotary_half // sections] * sections
        for i in range(rotary_half - sum(base)):
            base[i] += 1
        new["mrope_section"] = base
    return new if new != rope else None


# --------------------------------------------------------------------------- per-type table

# Keep small: only where the generic rules above do not give a valid, tiny, MoE-bearing model.
_PER_TYPE: dict[str, dict[str, Any]] = {
    # Layer kinds come from periods/offsets, not a list: attention at layer 4 of 8 and MoE on odd
    # layers by default, so 3 layers would be all mamba. Mamba CUDA kernels are not on CPU.
    "jamba": dict(
        attn_layer_period=2, attn_layer_offset=1, expert_layer_period=2, expert_layer_offset=1, use_mamba_kernels=False
    ),
    # Default layer_types is all mamba ("linear_attention"); keep one attention layer.
    "granitemoehybrid": dict(layer_types=["linear_attention", "full_attention", "linear_attention"]),
    # layer_types defaults to None (no usable pattern): short-conv and attention layers.
    "lfm2_moe": dict(layer_types=["conv", "full_attention", "conv"]),
    # n_shared_experts defaults to None, which the shared-expert MLP cannot size.
    "dots1": dict(n_shared_experts=1),
    # The (unbuilt) vision and audio adapters must output the text hidden size, checked at config time.
    "dots3_note": dict(vision_config=dict(adapter_out_dim=64), audio_config=dict(adapter_out_dim=64)),
    # Output LoRA groups must split the 4 tiny heads; compression rates small enough that the
    # compressed-attention branches (CSA / HCA) act on prompts of a few tokens (defaults 4 / 128).
    # qk_rope_head_dim 4 of head_dim 16 keeps the rotary part partial (real: 64 of 512).
    "deepseek_v4": dict(
        o_groups=2,
        qk_rope_head_dim=4,
        compress_rates={"compressed_sparse_attention": 2, "heavily_compressed_attention": 4},
    ),
    # "indexed_attention" layers need the QSA indexer, all of whose sizes default to None.
    # Hyper-connection mixing rank (default 320) would dwarf the tiny hidden size.
    # ZAYA's config accepts top-1 routing only: its one expert per token still crosses the network.
    "zaya": dict(num_experts_per_tok=1),
    "qwen4_exp_text": dict(
        indexer_n_heads=2,
        indexer_kv_heads=1,
        indexer_head_dim=16,
        indexer_budget=8,
        indexer_compress_ratio=2,
        hc_lowrank=16,
    ),
}


_TOP_ONE = frozenset({"zaya"})  # architectures whose configs accept top-1 routing only

# --------------------------------------------------------------------------- public API


def _config_class(model_type: str):
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    try:
        return CONFIG_MAPPING[model_type]
    except Exception as exc:  # noqa: BLE001 - an unregistered or unimportable config
        raise TinyModelUnavailable(f"config class not importable: {type(exc).__name__}: {exc}") from exc


def _uses_text_config_only(model_type: str, cls) -> bool:
    """Whether AutoModelForCausalLM builds only the text tower of this (composite) config."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    text_cls = (getattr(cls, "sub_configs", {}) or {}).get("text_config")
    if text_cls is None:
        return False
    try:
        model_class = MODEL_FOR_CAUSAL_LM_MAPPING[cls]
    except Exception:  # noqa: BLE001
        return False
    return getattr(model_class, "config_class", None) == text_cls


def _attention_for(model_type: str) -> str:
    """sdpa where the causal-LM class supports it, else eager (attention sinks, custom masks...)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    try:
        model_class = MODEL_FOR_CAUSAL_LM_MAPPING[_config_class(model_type)]
    except Exception:  # noqa: BLE001 - building will report the real problem
        return "sdpa"
    return "sdpa" if getattr(model_class, "_supports_sdpa", False) else "eager"


def tiny_config(model_type: str, **overrides: Any):
    """transformers' default config for `model_type`, shrunk; `overrides` are applied last."""
    if model_type in _NO_CAUSAL_LM:
        raise TinyModelUnavailable(_NO_CAUSAL_LM[model_type])
    if model_type not in HOOKED_MODEL_TYPES:
        raise TinyModelUnavailable(f"{model_type!r} is not a hooked causal-LM model type")
    cls = _config_class(model_type)
    defaults = cls().to_dict()
    kwargs: dict[str, Any] = {}
    sub_configs = dict(getattr(cls, "sub_configs", {}) or {})
    text_only = _uses_text_config_only(model_type, cls)
    for name in sub_configs:
        sub = defaults.get(name)
        if isinstance(sub, dict) and (name == "text_config" or not text_only):  # other towers are not built
            kwargs[name] = _shrink(sub)
    kwargs.update(_shrink({k: v for k, v in defaults.items() if k not in sub_configs}))
    for key, value in overrides.items():
        if text_only and key not in defaults:  # e.g. num_experts of qwen3_5_moe: a text_config field
            kwargs.setdefault("text_config", {})[key] = value
        else:
            kwargs[key] = value
    try:
        config = cls(**kwargs)
    except Exception as exc:  # noqa: BLE001
        raise TinyModelUnavailable(f"config rejected the tiny sizes: {_summary(exc)}") from exc
    attn = _attention_for(model_type)
    config._attn_implementation = attn
    for name in sub_configs:
        sub = getattr(config, name, None)
        if sub is not None and hasattr(sub, "_attn_implementation"):
            sub._attn_implementation = attn
    return config


def build_tiny_model(model_type: str, seed: int = 0, **overrides: Any):
    """A seeded random tiny model of `model_type`: CPU, float32, eval mode."""
    import torch
    from transformers import AutoModelForCausalLM

    config = tiny_config(model_type, **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    _revive_zero_routers(model, seed)
    return model.eval()


def _revive_zero_routers(model, seed: int) -> None:
    """Random router weights where the model's own init zeroes them (afmoe): else every token ties
    and goes to the same experts. Router: a 2-D parameter of the MoE block, beside the experts,
    one of whose dimensions is the number of experts and the other the hidden size."""
    import torch

    config = model.config.get_text_config()
    std = getattr(config, "initializer_range", INITIALIZER_RANGE)
    gen = torch.Generator().manual_seed(seed + 1)
    experts = experts_modules(model)
    for block in model.modules():
        children = {name for name, child in block.named_children() if child in experts}
        for child in children:
            n_exp = expert_count(getattr(block, child))
            for name, param in block.named_parameters():
                if name.split(".")[0] in children or param.ndim != 2 or n_exp not in param.shape:
                    continue
                if config.hidden_size in param.shape and not torch.count_nonzero(param):
                    with torch.no_grad():
                        param.copy_(torch.randn(param.shape, generator=gen) * std)


def write_tiny_checkpoint(model_type: str, root: Path, seed: int = 0, **overrides: Any) -> Path:
    """`save_pretrained(root, safe_serialization=True)` of `build_tiny_model(...)`; returns root."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    model = build_tiny_model(model_type, seed, **overrides)
    model.save_pretrained(root, safe_serialization=True)
    return root


def experts_modules(model) -> list:
    """Routed-experts modules: instances of a class decorated with use_experts_implementation."""
    return [m for m in model.modules() if hasattr(m, "is_concatenated") and hasattr(m, "has_gate")]


def expert_count(experts) -> int:
    """Experts in a routed-experts module: the leading dimension of its stacked weights."""
    for name in ("down_proj", "gate_up_proj", "up_proj"):
        weight = getattr(experts, name, None)
        if weight is not None:
            return int(weight.shape[0])
    return int(experts.num_experts)


def _text_config(config):
    get = getattr(config, "get_text_config", None)
    return get() if get is not None else config


def config_num_experts(config) -> int | None:
    cfg = _text_config(config)
    for key in _EXPERT_COUNT_KEYS:
        if isinstance(getattr(cfg, key, None), int):
            return getattr(cfg, key)
    return None


def config_top_k(config) -> int | None:
    cfg = _text_config(config)
    for key in _TOP_K_KEYS:
        if isinstance(getattr(cfg, key, None), int):
            return getattr(cfg, key)
    return None


def padded_prompts(vocab: int = 128, lengths: tuple[int, ...] = (4, 7), seed: int = 0):
    """Left-padded (ids, attention_mask) for prompts of `lengths`, ids avoiding the specials 0..2."""
    import torch

    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.full((len(lengths), width), PAD_ID, dtype=torch.long)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for i, n in enumerate(lengths):
        ids[i, width - n :] = torch.randint(3, vocab, (n,), generator=g)
        mask[i, width - n :] = 1
    return ids, mask


def _check(model_type: str) -> None:
    """Build, check the MoE shape and greedy-generate a left-padded batch; raise on any problem."""
    import torch

    model = build_tiny_model(model_type)
    experts = experts_modules(model)
    if not experts:
        raise TinyModelUnavailable("no routed-experts module in the tiny model")
    n_exp = min(expert_count(e) for e in experts)
    top_k = config_top_k(model.config)
    least_k = 1 if model_type in _TOP_ONE else 2
    if n_exp is None or n_exp < 4 or top_k is None or top_k < least_k:
        raise TinyModelUnavailable(f"tiny config has {n_exp} experts, top-k {top_k}")
    ids, mask = padded_prompts(model.config.get_text_config().vocab_size)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, max_new_tokens=2, do_sample=False)
    if out.shape[0] != 2 or out.shape[1] <= ids.shape[1]:
        raise TinyModelUnavailable(f"generate returned shape {tuple(out.shape)}")


def _summary(exc: BaseException) -> str:
    """One line: the exception type (unless our own) and its message, whitespace collapsed."""
    text = " ".join(str(exc).split())
    if len(text) > 300:
        text = text[:297] + "..."
    return text if isinstance(exc, TinyModelUnavailable) else f"{type(exc).__name__}: {text}"


@functools.lru_cache(maxsize=1)
def _status() -> tuple[tuple[str, ...], tuple[tuple[str, str], ...]]:
    import torch

    ok: list[str] = []
    bad: dict[str, str] = dict(_NO_CAUSAL_LM)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls gain nothing from threads and crawl on a busy machine
    try:
        for model_type in HOOKED_MODEL_TYPES:
            try:
                _check(model_type)
            except Exception as exc:  # noqa: BLE001 - the reason is the product here
                bad[model_type] = _summary(exc)
            else:
                ok.append(model_type)
    finally:
        torch.set_num_threads(threads)
    return tuple(ok), tuple(sorted(bad.items()))


def buildable() -> tuple[str, ...]:
    """Hooked model types whose tiny model builds and generates here."""
    return _status()[0]


def skipped() -> dict[str, str]:
    """Model type -> why it has no tiny model here (computed by trying each hooked type)."""
    return dict(_status()[1])


def write_tiny_mtp_checkpoint(model_type: str, root: Path, seed: int = 0, **overrides: Any) -> Path:
    """A tiny checkpoint laid out as DeepSeek-V3 publishes one: N decoder layers, then one
    multi-token-prediction layer `model.layers.{N}` that transformers itself never loads (its
    decoder layer, enorm, hnorm, eh_proj and shared head, and copies of the embedding and output
    head). The extra layer is transformers' own random init of an (N+1)-layer model; its own
    tensors are seeded random. Returns root."""
    import json

    import torch
    from safetensors.torch import load_file, save_file

    n = tiny_config(model_type, **overrides).num_hidden_layers
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    model = build_tiny_model(model_type, seed, **{**overrides, "num_hidden_layers": n + 1})
    model.save_pretrained(root, safe_serialization=True)
    config_path = root / "config.json"
    raw = json.loads(config_path.read_text())
    raw.update(num_hidden_layers=n, num_nextn_predict_layers=1)
    config_path.write_text(json.dumps(raw, indent=2))
    d = model.config.hidden_size
    gen = torch.Generator().manual_seed(seed + 7)
    prefix = f"model.layers.{n}."
    own = {
        "enorm.weight": 1 + 0.1 * torch.randn(d, generator=gen),
        "hnorm.weight": 1 + 0.1 * torch.randn(d, generator=gen),
        "eh_proj.weight": torch.randn(d, 2 * d, generator=gen) / (2 * d) ** 0.5,
        "shared_head.norm.weight": 1 + 0.1 * torch.randn(d, generator=gen),
        "embed_tokens.weight": model.get_input_embeddings().weight.detach().clone(),
        "shared_head.head.weight": model.get_output_embeddings().weight.detach().clone(),
    }
    weights = root / "model.safetensors"
    tensors = load_file(weights)
    tensors.update({prefix + name: t.contiguous() for name, t in own.items()})
    save_file(tensors, weights, metadata={"format": "pt"})
    return root
