"""Tiny quantized checkpoints in the layouts the big ones are published in, for tests.

Made from a tiny float model (a built float32 `PreTrainedModel`, or a folder save_pretrained wrote):

write_fp8_block_checkpoint: DeepSeek-V3 (deepseek-ai/DeepSeek-V3) style. Every Linear weight of the
    decoder layers (attention incl. kv_a_proj_with_mqa, dense MLPs, shared experts and routed
    experts, one per expert as `model.layers.L.mlp.experts.E.{gate,up,down}_proj.weight`) becomes
    float8_e4m3fn [R, C] plus `...weight_scale_inv` float32 [ceil(R/b0), ceil(C/b1)]. Embeddings,
    norms, the router (`mlp.gate.weight`, `mlp.gate.e_score_correction_bias`), lm_head and biases
    keep their float dtype. config.json gets DeepSeek-V3's
    {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": [b0, b1]}
    (no modules_to_not_convert: transformers skips lm_head by itself, and the router is not an nn.Linear).

write_mxfp4_checkpoint: openai/gpt-oss style, gpt_oss only. The experts' stacked in-memory params
    `gate_up_proj` [E, D, 2I] and `down_proj` [E, I, D] are transposed to the nn.Linear orientation and
    packed: `model.layers.L.mlp.experts.gate_up_proj_blocks` uint8 [E, 2I, D/32, 16],
    `..._scales` uint8 [E, 2I, D/32], `down_proj_blocks` uint8 [E, D, I/32, 16], `down_proj_scales`
    uint8 [E, D, I/32]; biases, attention, router, norms, embeddings and lm_head stay float. config.json
    gets gpt-oss-20b's {"modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router",
    "model.embed_tokens", "lm_head"], "quant_method": "mxfp4"}.

reference_dequantized: transformers' own dequantizing load of such a checkpoint, on CPU, in float32:
    mxfp4: from_pretrained(dst, quantization_config=Mxfp4Config(dequantize=True), dtype=float32) works
        as is (no accelerate, triton or kernels needed).
    fp8: from_pretrained(dst, quantization_config=FineGrainedFP8Config(dequantize=True), dtype=float32)
        refuses to start without the `accelerate` package (FineGrainedFP8HfQuantizer.validate_environment
        checks for it before looking at `dequantize`), though the dequantizing load never uses it.
        When accelerate is absent the check is bypassed for the duration of the call; the load itself is
        transformers' unchanged code (its Fp8Dequantize op folded into the expert-merging converters).
        Caveat: Fp8Dequantize derives the block from the scale grid (rows // scale_rows), so a weight
        whose dims are not multiples of the block dequantizes wrongly (e.g. [48, 64] with (32, 32) blocks
        is read as 24-row blocks) or raises ValueError. Choose a block dividing every dim for a faithful
        reference (see `block_divides_all`).
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from neuro_dask.store.expert_formats import quantize_fp8_block, quantize_mxfp4

SAFETENSORS_METADATA = {"format": "pt"}  # what save_pretrained writes; transformers warns without it
# A 2-D weight of a decoder layer in the checkpoint layout save_pretrained writes: the Linears (experts
# included, kv_a_proj_with_mqa too), not the routers (`mlp.gate`, `mlp.router`); norms are 1-D.
_FP8_LINEAR_WEIGHT = re.compile(r"^model\.layers\.\d+\.(?!.*\.(gate|router)\.weight$).*\.weight$")
_MXFP4_EXPERT_PARAM = re.compile(r"^model\.layers\.\d+\.mlp\.experts\.(gate_up_proj|down_proj)$")

GPT_OSS_MODULES_TO_NOT_CONVERT = [
    "model.layers.*.self_attn",
    "model.layers.*.mlp.router",
    "model.embed_tokens",
    "lm_head",
]


def fp8_quantization_config(block: tuple[int, int]) -> dict:
    """DeepSeek-V3's config.json quantization_config, with this block."""
    return {
        "activation_scheme": "dynamic",
        "fmt": "e4m3",
        "quant_method": "fp8",
        "weight_block_size": [int(block[0]), int(block[1])],
    }


def mxfp4_quantization_config() -> dict:
    """openai/gpt-oss-20b's config.json quantization_config."""
    return {"modules_to_not_convert": list(GPT_OSS_MODULES_TO_NOT_CONVERT), "quant_method": "mxfp4"}


def write_fp8_block_checkpoint(float_model_dir, dst: Path, block: tuple[int, int] = (128, 128)) -> Path:
    """A DeepSeek-V3-style block-fp8 copy of a float checkpoint (folder or model) in dst."""
    with _float_folder(float_model_dir) as src:
        tensors: dict[str, torch.Tensor] = {}
        for name, t in _load_state_dict(src).items():
            if _FP8_LINEAR_WEIGHT.match(name) and t.ndim == 2:
                q, scale_inv = quantize_fp8_block(t, block)
                tensors[name] = q
                tensors[name + "_scale_inv"] = scale_inv  # `<module>.weight_scale_inv`
            else:
                tensors[name] = t
        return _write(src, Path(dst), tensors, fp8_quantization_config(block))


def write_mxfp4_checkpoint(float_model_dir, dst: Path) -> Path:
    """A gpt-oss-style MXFP4 copy of a float gpt_oss checkpoint (folder or model) in dst."""
    with _float_folder(float_model_dir) as src:
        model_type = json.loads((src / "config.json").read_text()).get("model_type")
        if model_type != "gpt_oss":
            raise ValueError(f"write_mxfp4_checkpoint writes gpt_oss checkpoints only, not {model_type!r}")
        tensors: dict[str, torch.Tensor] = {}
        for name, t in _load_state_dict(src).items():
            if _MXFP4_EXPERT_PARAM.match(name):
                # In memory [E, in, out]; published (and dequantized by transformers) as [E, out, in].
                blocks, scales = quantize_mxfp4(t.transpose(-1, -2))
                tensors[name + "_blocks"] = blocks
                tensors[name + "_scales"] = scales
            else:
                tensors[name] = t
        return _write(src, Path(dst), tensors, mxfp4_quantization_config())


def block_divides_all(float_model_dir, block: tuple[int, int]) -> bool:
    """Whether every weight write_fp8_block_checkpoint would quantize is whole blocks of `block`
    (the condition for transformers' Fp8Dequantize to dequantize it right)."""
    with _float_folder(float_model_dir) as src:
        return all(
            t.shape[0] % block[0] == 0 and t.shape[1] % block[1] == 0
            for name, t in _load_state_dict(src).items()
            if _FP8_LINEAR_WEIGHT.match(name) and t.ndim == 2
        )


def reference_dequantized(dst: Path):
    """transformers' own float32 model of a checkpoint these writers made, loaded on CPU."""
    from transformers import AutoModelForCausalLM, FineGrainedFP8Config, Mxfp4Config

    method = json.loads((Path(dst) / "config.json").read_text())["quantization_config"]["quant_method"]
    if method == "mxfp4":
        config = Mxfp4Config(dequantize=True)
        with _quiet_transformers():
            return AutoModelForCausalLM.from_pretrained(dst, quantization_config=config, dtype=torch.float32).eval()
    if method == "fp8":
        config = FineGrainedFP8Config(dequantize=True)
        with _accelerate_check_waived(), _quiet_transformers():
            return AutoModelForCausalLM.from_pretrained(dst, quantization_config=config, dtype=torch.float32).eval()
    raise ValueError(f"{dst}: quant_method {method!r} was not written by this module")


# ---------------------------------------------------------------- helpers


@contextlib.contextmanager
def _float_folder(source) -> Iterator[Path]:
    """A folder holding the float checkpoint: the given one, or a temporary save of a model."""
    if isinstance(source, (str, Path)):
        yield Path(source)
        return
    with tempfile.TemporaryDirectory(prefix="float-ckpt-") as tmp:
        source.save_pretrained(tmp)
        yield Path(tmp)


def _load_state_dict(src: Path) -> dict[str, torch.Tensor]:
    files = sorted(src.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{src}: no *.safetensors; pass a folder written by save_pretrained")
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        tensors.update(load_file(f))
    return tensors


def _write(src: Path, dst: Path, tensors: dict[str, torch.Tensor], quantization_config: dict) -> Path:
    """dst: src's side files (tokenizer, generation config), config.json with quantization_config, one
    model.safetensors."""
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.is_file() and not f.name.endswith((".safetensors", ".safetensors.index.json")) and f.name != "config.json":
            shutil.copy2(f, dst / f.name)
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = quantization_config
    (dst / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    save_file({k: v.contiguous() for k, v in tensors.items()}, dst / "model.safetensors", metadata=SAFETENSORS_METADATA)
    return dst


@contextlib.contextmanager
def _accelerate_check_waived() -> Iterator[None]:
    """Let FineGrainedFP8HfQuantizer.validate_environment pass without accelerate (dequantize never uses it)."""
    import transformers.quantizers.quantizer_finegrained_fp8 as fp8_quantizer

    original = fp8_quantizer.is_accelerate_available
    fp8_quantizer.is_accelerate_available = lambda: True
    try:
        yield
    finally:
        fp8_quantizer.is_accelerate_available = original


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Silence the 'dequantizing on CPU' warnings the reference load always logs."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
