"""transformers as the client's trunk: the checkpoint's own model, its routed experts elsewhere.

transformers 5 routes every MoE layer through `ALL_EXPERTS_FUNCTIONS` (integrations/moe.py):
the model computes its own router, then calls `experts_forward(self, hidden [N, D],
top_k_index [N, K], top_k_weights [N, K])`. neuro_dask registers one such function,
`neuro_experts_forward`, which groups the rows by expert, hands them to an ExpertExecutor
(`run_layer(layer, groups)`, the same call every transport implements) and combines the
answers with the router's weights. The gating stays on the client by construction: it is the
model's own router. Expert parameters never materialise here: they stay on the meta device.
"""

from __future__ import annotations

import contextlib
import functools
import re
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from neuro_dask.errors import ConfigError, MissingTensorError, TensorShapeError, UnsupportedModelError
from neuro_dask.model.moe import combine, group_by_expert

EXPERTS_IMPLEMENTATION = "neuro_dask"
Dispatch = Callable[[int, Mapping[int, torch.Tensor]], Mapping[int, torch.Tensor]]
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")
_STATE = threading.local()


@dataclass(frozen=True)
class ExpertCalls:
    """Where this thread's expert calls go, and which of the N flattened rows matter."""

    dispatch: Dispatch
    routed: torch.Tensor | None = None  # [N] bool; None: every row


@contextlib.contextmanager
def expert_calls(dispatch: Dispatch, routed: torch.Tensor | None = None) -> Iterator[None]:
    """Inside the block, this thread's experts calls go to `dispatch`; pads and finished rows
    (routed False) are never sent, which matters once a call crosses the network."""
    previous = getattr(_STATE, "calls", None)
    _STATE.calls = ExpertCalls(dispatch, None if routed is None else routed.reshape(-1))
    try:
        yield
    finally:
        _STATE.calls = previous


def is_experts_module(module: nn.Module) -> bool:
    """A routed-experts module of transformers' hook (use_experts_implementation sets these)."""
    return hasattr(module, "is_concatenated") and hasattr(module, "has_gate") and hasattr(module, "_apply_gate")


def experts_modules(model: nn.Module) -> dict[int, nn.Module]:
    """Decoder layer index -> that layer's routed-experts module."""
    found: dict[int, nn.Module] = {}
    for name, module in model.named_modules():
        if is_experts_module(module):
            match = _LAYER.search(name + ".")
            if match is None:
                raise ConfigError(f"routed experts at {name!r} are outside a numbered decoder layer")
            found[int(match.group(1))] = module
    return found


def neuro_experts_forward(
    self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    """The registered experts implementation: hidden [N, D] -> sum_k w_k * expert_k(x) [N, D]."""
    calls = getattr(_STATE, "calls", None) or getattr(self, "_neuro_calls", None)
    if calls is None:
        raise RuntimeError("this model's experts run on neuro_dask: load it with nd.load, which connects them")
    rows, index, weights, keep = hidden_states, top_k_index, top_k_weights, None
    routed = calls.routed
    if routed is not None and routed.numel() == hidden_states.shape[0] and not bool(routed.all()):
        keep = routed.to(hidden_states.device).nonzero().squeeze(1)
        rows, index, weights = (t.index_select(0, keep) for t in (hidden_states, top_k_index, top_k_weights))
    out = torch.zeros_like(hidden_states)
    if rows.shape[0] == 0:
        return out
    groups = group_by_expert(rows, index.to(torch.long))
    inputs = groups.inputs
    if rows.device.type != "cpu":  # the wire and the workers take host tensors
        inputs = {e: r.to("cpu") for e, r in inputs.items()}
    outputs = calls.dispatch(self._neuro_layer, inputs)
    if rows.device.type != "cpu":
        outputs = {e: y.to(rows.device) for e, y in outputs.items()}
    mixed = combine(groups, outputs, weights, rows)
    return mixed if keep is None else out.index_copy_(0, keep, mixed)


def register_experts_implementation() -> None:
    """Idempotent: transformers looks the name up at every forward."""
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS, ExpertsInterface

    if EXPERTS_IMPLEMENTATION not in ALL_EXPERTS_FUNCTIONS:
        ExpertsInterface.register(EXPERTS_IMPLEMENTATION, neuro_experts_forward)


@functools.lru_cache(maxsize=1)
def _hooked_cached() -> tuple[str, ...]:
    return _scan_hooked()


_BUILD_LOCK = threading.Lock()


@contextlib.contextmanager
def on_meta() -> Iterator[None]:
    """Build with every tensor on the meta device, as transformers' own loader does for large
    checkpoints: DeepSeek-V3's experts are 30 GB a layer, which even an unused `torch.empty` on
    the CPU cannot allocate. torch's device context is per thread, so an in-process worker
    building its experts' template leaves a client's tensors in another thread alone."""
    from transformers.initialization import meta_device_safe_creation_ops

    with torch.device("meta"), meta_device_safe_creation_ops():
        yield


def hooked_model_types() -> tuple[str, ...]:
    """Causal-LM model types of the installed transformers whose experts use the hook."""
    return _hooked_cached()


def _scan_hooked() -> tuple[str, ...]:
    import pathlib

    import transformers
    from transformers.models.auto.configuration_auto import model_type_to_module_name
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    models = pathlib.Path(transformers.__file__).parent / "models"
    folders = {
        p.parent.name
        for p in models.glob("*/modeling_*.py")
        if "@use_experts_implementation" in p.read_text(errors="ignore")
    }
    # a folder may define several model types (qwen3_5_moe and its text-only qwen3_5_moe_text)
    return tuple(sorted(t for t in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES if model_type_to_module_name(t) in folders))


# Published checkpoints whose config names a model type transformers does not map, built on an
# architecture it implements (their modeling code is that architecture's, shipped as remote code).
MODEL_TYPE_ALIASES = {"kimi_k2": "deepseek_v3"}  # Moonshot's Kimi K2: DeepseekV3ForCausalLM, 384 experts


def transformers_model_type(model_type: object) -> object:
    return MODEL_TYPE_ALIASES.get(model_type, model_type) if isinstance(model_type, str) else model_type


MAX_LAYERS = 1024  # DeepSeek-V3 has 61, Kimi K2 61, gpt-oss-120b 36: far beyond any model


def check_config(raw: Mapping[str, Any]) -> None:
    """A store's config.json may come from a hostile mirror: only architectures with routed
    experts, and no layer count that would take a process down merely to build the skeleton."""
    model_type = transformers_model_type(raw.get("model_type"))
    hooked = hooked_model_types()
    if model_type not in hooked:
        raise UnsupportedModelError(
            model_type, hooked, reason="its transformers implementation has no routed experts through the experts hook"
        )
    for cfg in (raw, raw.get("text_config") if isinstance(raw.get("text_config"), Mapping) else {}):
        layers = cfg.get("num_hidden_layers")
        if layers is not None and (
            isinstance(layers, bool) or not isinstance(layers, int) or not 0 < layers <= MAX_LAYERS
        ):
            raise ConfigError(f"config.json: num_hidden_layers must be an integer in 1..{MAX_LAYERS}, got {layers!r}")


def hf_config(raw: Mapping[str, Any]):
    """transformers' config object for a checkpoint's config.json (quantization is ours to run:
    the trunk is stored dequantized, the experts are the workers')."""
    from transformers import AutoConfig, PretrainedConfig

    raw = PretrainedConfig._decode_special_floats(dict(raw))  # {"__float__": "Infinity"} as saved
    fields = {
        k: v
        for k, v in raw.items()
        if k
        not in ("model_type", "quantization_config", "transformers_version", "architectures", "torch_dtype", "dtype")
    }
    model_type = transformers_model_type(raw.get("model_type"))
    fields.pop("auto_map", None)  # remote code is never run: the alias's own transformers classes are
    try:
        return AutoConfig.for_model(model_type, **fields)
    except ValueError as exc:
        raise UnsupportedModelError(
            model_type, hooked_model_types(), reason=f"transformers does not know it ({exc})"
        ) from None


def build_skeleton(raw_config: Mapping[str, Any], dtype: torch.dtype = torch.float32):
    """The checkpoint's transformers causal LM with every parameter on meta and its experts
    calling neuro_dask; each experts module knows its layer (`_neuro_layer`)."""
    from transformers import AutoModelForCausalLM

    check_config(raw_config)
    register_experts_implementation()
    config = hf_config(raw_config)
    # _BUILD_LOCK: transformers sets the process's default dtype while it builds
    with _BUILD_LOCK, on_meta():
        try:
            model = AutoModelForCausalLM.from_config(config, dtype=dtype, experts_implementation=EXPERTS_IMPLEMENTATION)
        except ValueError as exc:
            raise UnsupportedModelError(
                config.model_type, hooked_model_types(), reason=f"transformers has no causal LM for it ({exc})"
            ) from None
    for layer, module in experts_modules(model).items():
        module._neuro_layer = layer
    return model.eval()


def expert_parameter_names(model: nn.Module) -> set[str]:
    """Full names of the routed experts' parameters and buffers (they stay on the workers)."""
    names = set()
    for name, module in model.named_modules():
        if is_experts_module(module):
            names.update(f"{name}.{p}" for p, _ in module.named_parameters())
            names.update(f"{name}.{b}" for b, _ in module.named_buffers())
    return names


def trunk_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """Every state_dict tensor of the trunk (all but the experts), tied copies once."""
    skip = expert_parameter_names(model)
    tied = _tied_names(model)
    return {name: tuple(t.shape) for name, t in model.state_dict().items() if name not in skip and name not in tied}


def _tied_names(model: nn.Module) -> set[str]:
    """Tied weights (lm_head = embeddings) are stored once, under their source's name."""
    return set(getattr(model, "all_tied_weights_keys", None) or {})


def load_trunk(
    model: nn.Module,
    tensors: Mapping[str, torch.Tensor],
    where: str,
    dtype: torch.dtype,
    device: torch.device | str = "cpu",
) -> nn.Module:
    """Assign the trunk's tensors (each present, each shaped as the model says; nothing half
    loaded), move buffers to `device`, and re-tie tied weights. Experts stay on meta."""
    device = torch.device(device)
    expected = trunk_shapes(model)
    for name, shape in expected.items():
        if name not in tensors:
            raise MissingTensorError(name, where)
        if tuple(tensors[name].shape) != shape:
            raise TensorShapeError(name, where, shape, tuple(tensors[name].shape))
    state = {name: _cast(tensors[name], dtype).to(device) for name in expected}
    for t in state.values():
        t._is_hf_initialized = True  # loaded: transformers' initializers must leave it alone
    model.load_state_dict(state, strict=False, assign=True)
    if getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()
    materialize_buffers(model, device)
    return model


def materialize_buffers(model: nn.Module, device: torch.device) -> None:
    """Non-persistent buffers (rotary tables, ...) were built on meta and are in no file: give
    them real storage and let the owning model's own initializer compute them, as transformers'
    from_pretrained does for keys a checkpoint lacks. Loaded tensors are flagged as initialized,
    so only these buffers are written; the experts' module is never touched."""
    for module, owner in _with_owner(model):
        if is_experts_module(module):
            continue
        missing = [n for n, b in module._buffers.items() if b is not None and b.is_meta]
        if not missing:
            continue
        for name in missing:
            module._buffers[name] = torch.empty_like(module._buffers[name], device=device)
        for tensor in module.parameters(recurse=False):
            tensor._is_hf_initialized = True
        owner._init_weights(module)


def _with_owner(model: nn.Module) -> Iterator[tuple[nn.Module, nn.Module]]:
    """Every module with the PreTrainedModel whose `_init_weights` applies to it (a composite
    model's sub-models each bring their own, as transformers' initialize_weights dispatches)."""
    from transformers import PreTrainedModel

    stack = [(model, model)]
    while stack:
        module, owner = stack.pop()
        yield module, owner
        for child in module.children():
            stack.append((child, child if isinstance(child, PreTrainedModel) else owner))


def _cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Floating tensors to the trunk's dtype; integer buffers (indices, counters) as they are."""
    return t.to(dtype) if t.is_floating_point() else t
