"""Reading a GGUF MoE checkpoint (llama.cpp's single-file format) as if it were a Hugging Face one.

`GGUFCheckpoint` offers what the sharder uses of `HFCheckpoint` (config, raw_config, names,
spec, read, ...): the GGUF metadata becomes a transformers-style config.json, and every GGUF
tensor is presented under the Hugging Face name it was converted from, so that
`model.keymap` and the sharder need no GGUF branch. Supported:

  general.architecture "llama" with {arch}.expert_count (Mixtral)   -> model_type "mixtral"
  general.architecture "qwen2moe"                                  -> model_type "qwen2_moe"

Tensor data types: F32, F16, BF16 are kept as they are; every quantized type the installed
`gguf` package can dequantize (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q2_K..Q6_K, IQ*, ...) is
dequantized to float32, for the trunk and for the experts alike. The store stays a float store:
int8/int4 experts are made at load time by `runtime/quantization.py` from the float file, as for
any other checkpoint (re-quantizing the dequantized GGUF values; GGUF's own blocks are not kept).

llama.cpp's converter permutes the rows of Q and K of "llama" models (`LlamaModel.permute` in
convert_hf_to_gguf.py: interleaved rotary pairs, its RoPE layout); reading undoes it, so Q and K
come back in the Hugging Face (rotate-half) layout. qwen2moe tensors are not permuted.

Stacked expert tensors (`blk.N.ffn_gate_exps.weight`, numpy shape [E, I, D]) are read one
expert at a time through the file's memory map; only that expert's bytes are dequantized.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from neuro_dask.errors import CheckpointError, ConfigFieldError, MissingTensorError
from neuro_dask.model.config import MoEConfig
from neuro_dask.model.keymap import TensorRef

log = logging.getLogger(__name__)

GGUF_MAGIC = b"GGUF"
SUPPORTED_GGUF_ARCHITECTURES = ("llama (with expert_count, i.e. Mixtral)", "qwen2moe")


class GGUFError(CheckpointError):
    """A .gguf file that cannot be read, or whose metadata or tensors do not describe a model we run."""

    def __init__(self, path: str, problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


class UnsupportedGGUFError(GGUFError):
    def __init__(self, path: str, architecture: str, problem: str):
        self.architecture = architecture
        super().__init__(
            path,
            f"{problem}; neuro_dask shards these GGUF MoE architectures: {', '.join(SUPPORTED_GGUF_ARCHITECTURES)}",
        )


class GGUFUnavailableError(CheckpointError):
    def __init__(self) -> None:
        super().__init__(
            "reading .gguf checkpoints needs the `gguf` package: `pip install neuro-dask[gguf]` (or `pip install gguf`)"
        )


def is_gguf(path: str | Path) -> bool:
    """A regular file that starts with the GGUF magic (or is named *.gguf)."""
    path = Path(path)
    if not path.is_file():
        return False
    if path.suffix.lower() == ".gguf":
        return True
    with open(path, "rb") as fh:
        return fh.read(4) == GGUF_MAGIC


@dataclass(frozen=True)
class _Source:
    """Where one HF-named tensor is in the GGUF file, and how to turn it back into HF layout."""

    tensor: str  # GGUF tensor name
    expert: int | None = None  # slice of a stacked *_exps tensor
    unpermute_heads: int | None = None  # undo llama.cpp's Q/K row permutation with this many heads
    shape: tuple[int, ...] | None = None  # reshape to (e.g. the shared expert gate [D] -> [1, D])


# GGUF per-block tensor leaf -> HF name under model.layers.N.
_BLOCK_TENSORS = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "ffn_gate_inp.weight": "mlp.gate.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",  # dense layers
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
    "ffn_gate_shexp.weight": "mlp.shared_expert.gate_proj.weight",
    "ffn_up_shexp.weight": "mlp.shared_expert.up_proj.weight",
    "ffn_down_shexp.weight": "mlp.shared_expert.down_proj.weight",
    "ffn_gate_inp_shexp.weight": "mlp.shared_expert_gate.weight",
}
_EXPERT_TENSORS = {
    "ffn_gate_exps.weight": "gate_proj",
    "ffn_up_exps.weight": "up_proj",
    "ffn_down_exps.weight": "down_proj",
}
_GLOBAL_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


def gguf_name(hf_name: str) -> str:
    """The GGUF tensor an HF tensor name comes from (for error messages)."""
    for gguf, hf in _GLOBAL_TENSORS.items():
        if hf == hf_name:
            return gguf
    parts = hf_name.split(".")
    if len(parts) > 3 and parts[:2] == ["model", "layers"]:
        layer, leaf = parts[2], ".".join(parts[3:])
        if leaf.startswith("mlp.experts.") and len(parts) == 8:
            stacked = {v: k for k, v in _EXPERT_TENSORS.items()}.get(parts[6], "?")
            return f"blk.{layer}.{stacked}[{parts[5]}]"
        for gguf, hf in _BLOCK_TENSORS.items():
            if hf == leaf:
                return f"blk.{layer}.{gguf}"
    return "?"


def unpermute_qk(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Inverse of llama.cpp's `LlamaModel.permute` (rows [H, 2, hd/2] -> [H, hd/2, 2] undone)."""
    rows = weight.shape[0]
    return weight.reshape(heads, rows // heads // 2, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def permute_qk(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """llama.cpp's `LlamaModel.permute`: what convert_hf_to_gguf.py does to Q and K of llama models."""
    rows = weight.shape[0]
    return weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


class GGUFCheckpoint:
    """A .gguf file behind the interface of `HFCheckpoint` (HF tensor names, config.json fields)."""

    def __init__(self, path: str | Path):
        try:
            import gguf
        except ImportError:
            raise GGUFUnavailableError() from None
        self._gguf = gguf
        self.root = Path(path)
        self.path = self.root
        if not self.root.is_file():
            raise GGUFError(str(path), "file does not exist")
        try:
            self._reader = gguf.GGUFReader(self.root, "r")
        except Exception as exc:  # the reader raises ValueError, IndexError, struct errors... on bad bytes
            raise GGUFError(
                str(path),
                f"is not a readable GGUF file ({type(exc).__name__}: {exc}); "
                "it is truncated or not GGUF: download or convert it again",
            ) from exc
        self._tensors = {t.name: t for t in self._reader.tensors}
        self.metadata = self._read_metadata()
        self.gguf_architecture = self._meta_str("general.architecture")
        self.raw_config = self._config()
        self.config = MoEConfig.from_hf(self.raw_config, f"{self.root}:metadata")
        self.generation_config = {
            k: self.raw_config[k]
            for k in ("bos_token_id", "eos_token_id", "pad_token_id")
            if self.raw_config.get(k) is not None
        } or None
        self.locations = self._locate_tensors()
        self._check_types()
        if "tokenizer.ggml.tokens" in self.metadata:
            log.warning(
                "%s: the GGUF tokenizer (tokenizer.ggml.*) is not converted; the store is written "
                "without a tokenizer (generate from token ids, or copy a tokenizer.json in)",
                self.root,
            )

    # -- metadata -------------------------------------------------------------------------------

    def _read_metadata(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name, field in self._reader.fields.items():
            if name.startswith("tokenizer.ggml.") and name in (
                "tokenizer.ggml.tokens",
                "tokenizer.ggml.scores",
                "tokenizer.ggml.token_type",
                "tokenizer.ggml.merges",
            ):
                out[name] = None  # large arrays: only their presence matters here
                continue
            try:
                out[name] = field.contents()
            except Exception as exc:
                raise GGUFError(str(self.root), f"metadata field {name!r} cannot be decoded ({exc})") from exc
        return out

    def _meta(self, key: str, default: Any = None, required: bool = False) -> Any:
        value = self.metadata.get(key)
        if value is None:
            if required:
                raise ConfigFieldError(f"{self.root}:metadata", key, "is required and missing from the GGUF file")
            return default
        return value

    def _meta_str(self, key: str) -> str:
        value = self._meta(key, required=True)
        if not isinstance(value, str):
            raise ConfigFieldError(f"{self.root}:metadata", key, f"must be a string, got {value!r}")
        return value

    def _meta_int(self, key: str, default: int | None = None) -> int:
        value = self._meta(key, default, required=default is None)
        if isinstance(value, list):  # per-layer arrays (head_count may be one): all equal, or refuse
            if not value or any(v != value[0] for v in value):
                raise ConfigFieldError(f"{self.root}:metadata", key, f"varies per layer ({value}); not supported")
            value = value[0]
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigFieldError(f"{self.root}:metadata", key, f"must be an integer, got {value!r}")
        return int(value)

    def _config(self) -> dict[str, Any]:
        arch = self.gguf_architecture
        a = arch
        if arch == "llama" and self._meta(f"{a}.expert_count", 0):
            model_type = "mixtral"
        elif arch == "qwen2moe":
            model_type = "qwen2_moe"
        else:
            what = f"{arch!r} without {a}.expert_count (a dense model)" if arch == "llama" else repr(arch)
            raise UnsupportedGGUFError(str(self.root), arch, f"general.architecture {what} is not a supported MoE")
        if "token_embd.weight" not in self._tensors:
            raise MissingTensorError("token_embd.weight", str(self.root))
        hidden = self._meta_int(f"{a}.embedding_length")
        heads = self._meta_int(f"{a}.attention.head_count")
        vocab = int(self._tensors["token_embd.weight"].shape[1])  # GGUF dims are reversed: [D, V]
        scaling = self._meta(f"{a}.rope.scaling.type")
        cfg: dict[str, Any] = dict(
            vocab_size=vocab,
            hidden_size=hidden,
            num_hidden_layers=self._meta_int(f"{a}.block_count"),
            num_attention_heads=heads,
            num_key_value_heads=self._meta_int(f"{a}.attention.head_count_kv", heads),
            head_dim=self._meta_int(f"{a}.attention.key_length", hidden // heads),
            num_experts_per_tok=self._meta_int(f"{a}.expert_used_count"),
            rms_norm_eps=_f32(self._meta(f"{a}.attention.layer_norm_rms_epsilon", 1e-5)),
            rope_theta=_f32(self._meta(f"{a}.rope.freq_base", 10000.0)),
            max_position_embeddings=self._meta_int(f"{a}.context_length"),
            tie_word_embeddings="output.weight" not in self._tensors,
            hidden_act="silu",
            bos_token_id=self._meta("tokenizer.ggml.bos_token_id"),
            eos_token_id=self._meta("tokenizer.ggml.eos_token_id"),
            pad_token_id=self._meta("tokenizer.ggml.padding_token_id"),
        )
        if scaling not in (None, "none"):
            cfg["rope_scaling"] = {"rope_type": scaling}  # MoEConfig refuses it with a clear message
        if model_type == "mixtral":
            cfg.update(
                model_type="mixtral",
                architectures=["MixtralForCausalLM"],
                num_local_experts=self._meta_int(f"{a}.expert_count"),
                intermediate_size=self._meta_int(
                    f"{a}.expert_feed_forward_length", self._meta_int(f"{a}.feed_forward_length", 0) or None
                ),
                sliding_window=None,
            )
        else:
            layers = cfg["num_hidden_layers"]
            dense = [n for n in range(layers) if f"blk.{n}.ffn_gate_inp.weight" not in self._tensors]
            shared = self._meta_int(f"{a}.expert_shared_feed_forward_length", 0)
            cfg.update(
                model_type="qwen2_moe",
                architectures=["Qwen2MoeForCausalLM"],
                num_experts=self._meta_int(f"{a}.expert_count"),
                moe_intermediate_size=self._meta_int(f"{a}.expert_feed_forward_length"),
                shared_expert_intermediate_size=shared,
                intermediate_size=self._meta_int(f"{a}.feed_forward_length", 0),
                mlp_only_layers=dense,
                decoder_sparse_step=1,
                norm_topk_prob=bool(self._meta(f"{a}.expert_weights_norm", False)),
                qkv_bias="blk.0.attn_q.bias" in self._tensors,
                use_sliding_window=False,
            )
        cfg["gguf"] = {
            "architecture": arch,
            "file_type": self._meta("general.file_type"),
            "name": self._meta("general.name"),
        }
        return cfg

    # -- tensors --------------------------------------------------------------------------------

    def _locate_tensors(self) -> dict[str, _Source]:
        cfg = self.config
        permute = self.gguf_architecture == "llama"
        heads = {"attn_q.weight": cfg.num_attention_heads, "attn_k.weight": cfg.num_key_value_heads}
        out: dict[str, _Source] = {}
        for name, tensor in self._tensors.items():
            if name in _GLOBAL_TENSORS:
                out[_GLOBAL_TENSORS[name]] = _Source(name)
                continue
            parts = name.split(".", 2)
            if len(parts) != 3 or parts[0] != "blk" or not parts[1].isdigit():
                continue  # e.g. rope_freqs.weight: reported as unused by the sharder
            layer, leaf = int(parts[1]), parts[2]
            prefix = f"model.layers.{layer}."
            if leaf in _EXPERT_TENSORS:
                n_experts = int(tensor.shape[-1]) if len(tensor.shape) == 3 else 0
                for e in range(n_experts):
                    out[f"{prefix}mlp.experts.{e}.{_EXPERT_TENSORS[leaf]}.weight"] = _Source(name, expert=e)
            elif leaf == "ffn_gate_inp_shexp.weight":
                out[prefix + _BLOCK_TENSORS[leaf]] = _Source(name, shape=(1, cfg.hidden_size))
            elif leaf in _BLOCK_TENSORS:
                out[prefix + _BLOCK_TENSORS[leaf]] = _Source(name, unpermute_heads=heads.get(leaf) if permute else None)
            else:
                out[f"gguf:{name}"] = _Source(name)  # kept visible so that it is reported as unused
        return out

    def _check_types(self) -> None:
        quants = self._gguf.quants
        for tensor in self._tensors.values():
            qtype = tensor.tensor_type
            if qtype in _PLAIN_TYPES:
                continue
            if qtype not in quants._type_traits:
                raise GGUFError(
                    str(self.root),
                    f"tensor {tensor.name!r} has type {qtype.name}, which the installed "
                    "gguf package cannot dequantize; upgrade gguf or re-quantize the model",
                )

    @property
    def names(self) -> set[str]:
        return set(self.locations)

    @property
    def tokenizer_files(self) -> list[str]:
        return []

    def _source(self, ref: TensorRef) -> _Source:
        src = self.locations.get(ref.name)
        if src is None:
            raise MissingTensorError(ref.name, f"{self.root} (GGUF tensor {gguf_name(ref.name)!r})")
        if ref.expert is not None or ref.half is not None:
            raise CheckpointError(f"{self.root}: GGUF tensors are addressed per expert by name, not by slice")
        return src

    def spec(self, ref: TensorRef) -> tuple[torch.dtype, tuple[int, ...]]:
        src = self._source(ref)
        tensor = self._tensors[src.tensor]
        shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))
        if src.expert is not None:
            shape = shape[1:]
        if src.shape is not None and int(np.prod(shape)) == int(np.prod(src.shape)):
            shape = src.shape
        return _PLAIN_TYPES.get(tensor.tensor_type, torch.float32), shape

    def read(self, ref: TensorRef) -> torch.Tensor:
        src = self._source(ref)
        tensor = self._tensors[src.tensor]
        dtype, shape = self.spec(ref)
        data = tensor.data if src.expert is None else tensor.data[src.expert]
        qtype = tensor.tensor_type
        try:
            if qtype in _PLAIN_TYPES:
                array = np.array(data)  # copy out of the memory map
                if qtype == self._gguf.GGMLQuantizationType.BF16:  # the reader hands BF16 out as raw bytes
                    out = torch.from_numpy(array).view(torch.bfloat16)
                else:
                    out = torch.from_numpy(array)
            else:
                out = torch.from_numpy(np.ascontiguousarray(self._gguf.quants.dequantize(np.asarray(data), qtype)))
        except (ValueError, IndexError, OSError) as exc:
            raise GGUFError(
                str(self.root), f"tensor {src.tensor!r} cannot be read ({exc}); the file is damaged"
            ) from exc
        out = out.to(dtype).reshape(shape)
        if src.unpermute_heads:
            out = unpermute_qk(out, src.unpermute_heads)
        return out.contiguous()


def _f32(value: Any) -> float:
    """GGUF stores floats as float32: 1e-5 reads back as 9.99999974e-06; give the shortest decimal."""
    return float(str(np.float32(value)))


def _plain_types() -> dict[Any, torch.dtype]:
    try:
        from gguf import GGMLQuantizationType as Q
    except ImportError:
        return {}
    return {Q.F32: torch.float32, Q.F16: torch.float16, Q.BF16: torch.bfloat16}


_PLAIN_TYPES = _plain_types()
