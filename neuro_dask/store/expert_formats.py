"""Quantized expert formats of published MoE checkpoints, and their dequantization on the worker.

Pure: imports torch only (never transformers), so a worker can dequantize without the oracle.
Quantized checkpoints stay quantized in the store and on the wire; a worker turns one expert's
file into float tensors at load time (`dequantize_expert`). Every function here is bit-exact
against transformers 5.24's own load-time dequantization in float32 (tests/unit/test_expert_formats.py).

Formats, named as config.json's `quantization_config` selects them (`format_of`):

"float": no quantization_config; tensors are float and are only cast.

"fp8-block" (DeepSeek-V3/R1, Qwen3-*-FP8: {"quant_method": "fp8", "fmt": "e4m3",
"activation_scheme": "dynamic", "weight_block_size": [b0, b1]}):
    X            float8_e4m3fn [R, C]
    X_scale_inv  float32 [ceil(R/b0), ceil(C/b1)]   (published checkpoints: `<module>.weight_scale_inv`;
                 "scale_fmt": "ue8m0" (DeepSeek-V3.1) keeps them powers of two, float32 or E8M0 bytes)
    X ~= X.float() * scale_inv[r // b0, c // b1]. Edge blocks are partial (DeepSeek-V3's
    kv_a_proj_with_mqa is [576, 7168] with scales [5, 56]). In the published layout every
    Linear weight of the decoder layers is quantized, routed experts one file entry per expert and
    projection (`model.layers.L.mlp.experts.E.gate_proj.weight` [I, D] + `...weight_scale_inv`);
    embeddings, norms, the router (`mlp.gate.weight`, `e_score_correction_bias`) and lm_head are not.
    An expert file of the store names them as the experts module's params do in transformers'
    FP8Experts: `gate_up_proj` [2I, D] + `gate_up_proj_scale_inv` [2I/b0, D/b1] (gate rows, then
    up rows: the concatenation keeps blocks whole only when b0 divides I), `down_proj` [D, I] +
    `down_proj_scale_inv` [ceil(D/b0), ceil(I/b1)].

"mxfp4" (openai/gpt-oss-*: {"quant_method": "mxfp4", "modules_to_not_convert": [...]}):
    X_blocks  uint8 [..., R, C/32, 16]  two e2m1 (fp4) codes a byte, low nibble first
    X_scales  uint8 [..., R, C/32]      one E8M0 exponent per 32 values: scale = 2**(byte - 127)
    value[..., r, 32*g + 2*k]     = FP4_VALUES[blocks[..., r, g, k] & 0xF]  * 2**(scales[..., r, g] - 127)
    value[..., r, 32*g + 2*k + 1] = FP4_VALUES[blocks[..., r, g, k] >> 4] * 2**(scales[..., r, g] - 127)
    The published gpt-oss checkpoint stores the experts stacked and in the nn.Linear orientation
    ([out, in], input features packed): `model.layers.L.mlp.experts.gate_up_proj_blocks`
    [E, 2I, D/32, 16], `..._scales` [E, 2I, D/32], `down_proj_blocks` [E, D, I/32, 16],
    `down_proj_scales` [E, D, I/32]; biases (`gate_up_proj_bias` [E, 2I], `down_proj_bias` [E, D])
    and everything outside the experts are float. transformers' dequantizer
    (integrations/mxfp4.py `_convert_moe_packed_tensors`) unpacks to [E, R, C] and then TRANSPOSES
    the last two dims, giving the in-memory params `gate_up_proj` [E, D, 2I] (gate/up interleaved in
    the last dim: even columns gate, odd columns up, exactly as packed) and `down_proj` [E, I, D].
    `mxfp4_to_param` does the same for one expert's slice: [2I, D/32, 16] -> [D, 2I].
"""

from __future__ import annotations

import math

import torch

from neuro_dask.errors import CheckpointError, ConfigError

FORMAT_FLOAT = "float"
FORMAT_FP8_BLOCK = "fp8-block"
FORMAT_MXFP4 = "mxfp4"
FORMATS = (FORMAT_FLOAT, FORMAT_FP8_BLOCK, FORMAT_MXFP4)

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # torch.finfo(torch.float8_e4m3fn).max
SCALE_INV_SUFFIX = "_scale_inv"
BLOCKS_SUFFIX = "_blocks"
SCALES_SUFFIX = "_scales"
MXFP4_BLOCK = 32  # values sharing one E8M0 scale
MXFP4_BYTES = MXFP4_BLOCK // 2  # two fp4 codes a byte
E8M0_BIAS = 127

# e2m1 values by 4-bit code: bit 3 is the sign, codes 0-7 are 0, 0.5, 1, 1.5, 2, 3, 4, 6
# (transformers/integrations/mxfp4.py FP4_VALUES, in the same order).
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
# Midpoints between consecutive positive e2m1 values: where rounding to nearest changes code.
_FP4_MIDPOINTS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)


class UnsupportedQuantizationError(ConfigError):
    """config.json's quantization_config names a method (or a variant of one) neuro_dask cannot serve."""

    SUPPORTED = (
        "fp8 with weight_block_size (DeepSeek-V3 style)",
        "mxfp4 (gpt-oss)",
    )

    def __init__(self, method: object, detail: str = ""):
        self.method = method
        self.detail = detail
        extra = f" ({detail})" if detail else ""
        super().__init__(
            f"quantization_config: quant_method {method!r}{extra} is not supported; neuro_dask serves "
            f"unquantized checkpoints and {', '.join(self.SUPPORTED)}. Use a float (bf16/fp16/fp32) "
            "checkpoint of the model instead."
        )


class QuantizedTensorError(CheckpointError):
    """An expert file's quantized tensor lacks its companion, or the two do not fit together."""

    def __init__(self, name: str, problem: str, where: str = "expert file"):
        self.name = name
        self.problem = problem
        self.where = str(where)
        super().__init__(
            f"{self.where}: tensor {name!r} {problem}. The expert file is damaged or was sharded "
            "from a different checkpoint format; re-shard the checkpoint."
        )


def format_of(quantization_config: dict | None) -> str:
    """The expert format named by a checkpoint's config.json `quantization_config` (None: float)."""
    if quantization_config is None:
        return FORMAT_FLOAT
    method = quantization_config.get("quant_method")
    if method == "fp8":
        fp8_block_of(quantization_config)  # raises for the fp8 variants not served
        return FORMAT_FP8_BLOCK
    if method == "mxfp4":
        return FORMAT_MXFP4
    raise UnsupportedQuantizationError(method)


def fp8_block_of(quantization_config: dict) -> tuple[int, int]:
    """(b0, b1) of an fp8 quantization_config, refusing the variants this module cannot dequantize."""
    block = quantization_config.get("weight_block_size")
    if not block or len(block) != 2:
        # Per-tensor fp8 has a scalar scale per weight: another layout, not served.
        raise UnsupportedQuantizationError("fp8", "no weight_block_size: per-tensor fp8")
    if quantization_config.get("fmt", "e4m3") != "e4m3":
        raise UnsupportedQuantizationError("fp8", f"fmt {quantization_config.get('fmt')!r}")
    if quantization_config.get("scale_fmt", "float") not in ("float", "ue8m0"):
        # ue8m0 (DeepSeek-V3.1) only makes the scales powers of two; dequantize_fp8_block reads any of
        # their storage dtypes (float32, uint8 exponent bytes, float8_e8m0fnu).
        raise UnsupportedQuantizationError("fp8", f"scale_fmt {quantization_config.get('scale_fmt')!r}")
    if quantization_config.get("expert_dtype", "fp8") != "fp8":
        raise UnsupportedQuantizationError("fp8", f"expert_dtype {quantization_config.get('expert_dtype')!r}")
    return int(block[0]), int(block[1])


# ---------------------------------------------------------------- fp8 block


def _scale_grid(shape: tuple[int, ...], block: tuple[int, int]) -> tuple[int, int]:
    return math.ceil(shape[-2] / block[0]), math.ceil(shape[-1] / block[1])


def dequantize_fp8_block(
    weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int], dtype: torch.dtype
) -> torch.Tensor:
    """float8_e4m3fn [..., R, C] times its float32 block scales [..., ceil(R/b0), ceil(C/b1)] -> dtype.

    The product is taken in float32 and then cast, as transformers' Fp8Dequantize does (its load
    path); edge blocks are cropped, as DeepSeek's weight_dequant and transformers' FP8 matmuls do.
    """
    b0, b1 = block
    rows, cols = weight.shape[-2:]
    # Expand each scale over its block, then crop the partial edge blocks.
    scale = _scales_fp32(scale_inv).repeat_interleave(b0, dim=-2).repeat_interleave(b1, dim=-1)
    return (weight.to(torch.float32) * scale[..., :rows, :cols]).to(dtype)


def _scales_fp32(scale_inv: torch.Tensor) -> torch.Tensor:
    # uint8 scales are E8M0 exponent bytes (MXFP8-style ue8m0 checkpoints): 2**(byte - 127), as
    # transformers reads them; float32 and float8_e8m0fnu convert exactly.
    if scale_inv.dtype == torch.uint8:
        return (scale_inv.to(torch.float32) - E8M0_BIAS).exp2()
    return scale_inv.to(torch.float32)


def quantize_fp8_block(w: torch.Tensor, block: tuple[int, int] = (128, 128)) -> tuple[torch.Tensor, torch.Tensor]:
    """w [..., R, C] -> (float8_e4m3fn [..., R, C], float32 scale_inv [..., ceil(R/b0), ceil(C/b1)]).

    As DeepSeek's checkpoints are made: scale_inv = amax(|block|) / 448, q = w / scale_inv rounded
    to e4m3 (nearest, ties to even). An all-zero block gets scale_inv 1 (any value dequantizes it to 0).
    """
    b0, b1 = block
    w = w.to(torch.float32)
    rows, cols = w.shape[-2:]
    grid_r, grid_c = _scale_grid(w.shape, block)
    # Zero-pad to whole blocks: padding cannot raise a block's amax.
    padded = torch.nn.functional.pad(w, (0, grid_c * b1 - cols, 0, grid_r * b0 - rows))
    tiles = padded.unflatten(-1, (grid_c, b1)).unflatten(-3, (grid_r, b0))  # [..., gr, b0, gc, b1]
    amax = tiles.abs().amax(dim=(-3, -1))
    scale_inv = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    expanded = scale_inv.repeat_interleave(b0, dim=-2).repeat_interleave(b1, dim=-1)[..., :rows, :cols]
    q = (w / expanded).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q, scale_inv.contiguous()


# ---------------------------------------------------------------- mxfp4


def dequantize_mxfp4(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """uint8 blocks [..., R, C/32, 16] and uint8 E8M0 scales [..., R, C/32] -> dtype [..., R, C].

    No transpose (see mxfp4_to_param). Same ops in the same dtype as transformers'
    _convert_moe_packed_tensors: table lookup in `dtype`, then ldexp by (scale - 127).
    """
    if blocks.shape[:-1] != scales.shape or blocks.shape[-1] != MXFP4_BYTES:
        raise ValueError(f"mxfp4 blocks {list(blocks.shape)} do not fit scales {list(scales.shape)}")
    lut = torch.tensor(FP4_VALUES, dtype=dtype, device=blocks.device)
    packed = blocks.to(torch.uint8)
    out = torch.empty(*packed.shape[:-1], MXFP4_BLOCK, dtype=dtype, device=blocks.device)
    out[..., 0::2] = lut[(packed & 0x0F).to(torch.int)]  # low nibble holds the even element
    out[..., 1::2] = lut[(packed >> 4).to(torch.int)]
    exponent = (scales.to(torch.int32) - E8M0_BIAS).unsqueeze(-1)
    out = torch.ldexp(out, exponent).to(dtype)  # ldexp promotes to float32; the power of two is exact
    return out.flatten(-2)


def mxfp4_to_param(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The in-memory experts param transformers ends up with: the dequantized [..., R, C], transposed.

    One expert: gate_up_proj [2I, D/32, 16] -> [D, 2I]; down_proj [D, I/32, 16] -> [I, D].
    Stacked [E, ...] inputs give [E, D, 2I] / [E, I, D].
    """
    return dequantize_mxfp4(blocks, scales, dtype).transpose(-1, -2).contiguous()


def quantize_mxfp4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [..., R, C] (C a multiple of 32) -> (uint8 blocks [..., R, C/32, 16], uint8 scales [..., R, C/32]).

    OpenAI's MX scheme (triton_kernels' downcast_to_mxfp, rounding the scale up): per 32 values
    scale = 2**ceil(log2(amax / 6)), so every |w / scale| <= 6, each value rounded to the nearest e2m1
    value, ties to the even code. An all-zero block gets the smallest scale, byte 0.
    """
    if w.shape[-1] % MXFP4_BLOCK:
        raise ValueError(f"mxfp4 packs {MXFP4_BLOCK} values a block; the last dim {w.shape[-1]} is not a multiple")
    w = w.to(torch.float32).contiguous().unflatten(-1, (w.shape[-1] // MXFP4_BLOCK, MXFP4_BLOCK))
    amax = w.abs().amax(dim=-1)
    # frexp is exact where log2 would round: amax/6 = m * 2**e with m in [0.5, 1), ceil(log2) = e - (m == 0.5).
    mantissa, exp = torch.frexp(amax / 6.0)
    exponent = torch.where(mantissa == 0.5, exp - 1, exp)
    byte = torch.where(amax > 0, exponent + E8M0_BIAS, torch.zeros_like(exponent)).clamp(0, 254)
    scaled = torch.ldexp(w, -(byte.to(torch.int32) - E8M0_BIAS).unsqueeze(-1))
    codes = _fp4_codes(scaled)
    packed = (codes[..., 0::2] | (codes[..., 1::2] << 4)).to(torch.uint8)
    return packed.contiguous(), byte.to(torch.uint8).contiguous()


def _fp4_codes(x: torch.Tensor) -> torch.Tensor:
    """Nearest e2m1 code (int64, 0-15) of each value, ties to the even code, |x| saturating at 6."""
    mids = torch.tensor(_FP4_MIDPOINTS, dtype=x.dtype, device=x.device)
    mag = x.abs().clamp(max=6.0)
    below = torch.bucketize(mag, mids, right=False)  # on a midpoint: the lower code
    above = torch.bucketize(mag, mids, right=True)  # on a midpoint: the upper code
    # A tie lies between codes `below` and `above` = below + 1: take the even one (mantissa bit 0).
    code = torch.where(below % 2 == 0, below, above)
    return code | (x < 0).to(code.dtype) << 3


# ---------------------------------------------------------------- one expert file


def dequantize_expert(
    tensors: dict[str, torch.Tensor],
    fmt: str,
    dtype: torch.dtype,
    block: tuple[int, int] | None = None,
    where: str = "expert file",
) -> dict[str, torch.Tensor]:
    """One expert file's tensors -> float tensors named by the experts module's parameter names.

    float: every tensor cast. fp8-block: each float8 `X` and its `X_scale_inv` -> `X` (needs block).
    mxfp4: each `X_blocks` and `X_scales` -> `X` in the in-memory (transposed) layout. Other tensors
    (biases) are cast. A missing or misfit companion raises QuantizedTensorError naming the tensor.
    """
    if fmt == FORMAT_FLOAT:
        return {name: _float(name, t, dtype, where) for name, t in tensors.items()}
    if fmt == FORMAT_FP8_BLOCK:
        if block is None:
            raise ConfigError("fp8-block experts need the checkpoint's weight_block_size to be dequantized")
        return _dequantize_fp8_expert(tensors, tuple(block), dtype, where)
    if fmt == FORMAT_MXFP4:
        return _dequantize_mxfp4_expert(tensors, dtype, where)
    raise ConfigError(f"expert format {fmt!r} is unknown; expected one of {', '.join(FORMATS)}")


def _float(name: str, t: torch.Tensor, dtype: torch.dtype, where: str) -> torch.Tensor:
    # A quantized tensor without its companion must not be silently cast to garbage floats.
    if not t.is_floating_point() or t.dtype == FP8_DTYPE:
        raise QuantizedTensorError(name, f"is {t.dtype}, not a float tensor, and has no scale companion", where)
    return t.to(dtype)


def _dequantize_fp8_expert(
    tensors: dict[str, torch.Tensor], block: tuple[int, int], dtype: torch.dtype, where: str
) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        if name.endswith(SCALE_INV_SUFFIX):
            base = name.removesuffix(SCALE_INV_SUFFIX)
            if base not in tensors:
                raise QuantizedTensorError(name, f"is a scale without its weight {base!r}", where)
            continue
        scale = tensors.get(name + SCALE_INV_SUFFIX)
        if scale is None:
            out[name] = _float(name, t, dtype, where)  # biases and norms stay float in fp8 checkpoints
            continue
        if t.dtype != FP8_DTYPE:
            raise QuantizedTensorError(name, f"has a scale companion but is {t.dtype}, not float8_e4m3fn", where)
        expected = (*t.shape[:-2], *_scale_grid(t.shape, block))
        if tuple(scale.shape) != expected:
            raise QuantizedTensorError(
                name + SCALE_INV_SUFFIX,
                f"has shape {list(scale.shape)}; weight {list(t.shape)} in blocks {list(block)} needs {list(expected)}",
                where,
            )
        out[name] = dequantize_fp8_block(t, scale, block, dtype)
    return out


def _dequantize_mxfp4_expert(
    tensors: dict[str, torch.Tensor], dtype: torch.dtype, where: str
) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        if name.endswith(SCALES_SUFFIX):
            base = name.removesuffix(SCALES_SUFFIX)
            if base + BLOCKS_SUFFIX not in tensors:
                raise QuantizedTensorError(name, f"is a scale without its blocks {base + BLOCKS_SUFFIX!r}", where)
            continue
        if not name.endswith(BLOCKS_SUFFIX):
            out[name] = _float(name, t, dtype, where)
            continue
        base = name.removesuffix(BLOCKS_SUFFIX)
        scales = tensors.get(base + SCALES_SUFFIX)
        if scales is None:
            raise QuantizedTensorError(name, f"has no scales companion {base + SCALES_SUFFIX!r}", where)
        if t.dtype != torch.uint8 or scales.dtype != torch.uint8:
            raise QuantizedTensorError(name, f"and its scales are {t.dtype}/{scales.dtype}, mxfp4 needs uint8", where)
        if t.shape[:-1] != scales.shape or t.shape[-1] != MXFP4_BYTES:
            raise QuantizedTensorError(
                name,
                f"has shape {list(t.shape)}; its scales {list(scales.shape)} need {[*scales.shape, MXFP4_BYTES]}",
                where,
            )
        out[base] = mxfp4_to_param(t, scales, dtype)
    return out
