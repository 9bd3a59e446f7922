"""Quantized expert formats (store/expert_formats.py) against transformers' own dequantization,
and the tiny published-layout checkpoints of neuro_dask/testing/quantized_checkpoints.py."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors import safe_open

from neuro_dask.errors import CheckpointError, ConfigError, NeuroDaskError
from neuro_dask.store import expert_formats as ef
from neuro_dask.testing import quantized_checkpoints as qc

pytestmark = pytest.mark.golden

FP8_NAN_BYTES = (0x7F, 0xFF)  # the only NaN codes of float8_e4m3fn (it has no infinities)


def random_fp8(*shape: int, generator: torch.Generator) -> torch.Tensor:
    """Every finite e4m3 code is equally likely."""
    raw = torch.randint(0, 256, shape, dtype=torch.uint8, generator=generator)
    raw[(raw == FP8_NAN_BYTES[0]) | (raw == FP8_NAN_BYTES[1])] = 0
    return raw.view(torch.float8_e4m3fn)


def naive_fp8_dequant(q: torch.Tensor, s: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """DeepSeek's definition element by element: w[r, c] = q[r, c] * s[r // b0, c // b1]."""
    rows, cols = q.shape
    r = torch.arange(rows)[:, None] // block[0]
    c = torch.arange(cols)[None, :] // block[1]
    return q.float() * s[r, c]


# ---------------------------------------------------------------- format_of


def test_format_of_names_the_published_configs():
    assert ef.format_of(None) == ef.FORMAT_FLOAT
    assert ef.format_of(qc.fp8_quantization_config((128, 128))) == ef.FORMAT_FP8_BLOCK
    assert ef.format_of(qc.mxfp4_quantization_config()) == ef.FORMAT_MXFP4
    assert ef.fp8_block_of(qc.fp8_quantization_config((32, 16))) == (32, 16)


@pytest.mark.parametrize(
    "config, named",
    [
        ({"quant_method": "gptq", "bits": 4}, "'gptq'"),
        ({"quant_method": "fp8", "activation_scheme": "dynamic"}, "per-tensor"),
        ({"quant_method": "fp8", "weight_block_size": [128, 128], "expert_dtype": "fp4"}, "fp4"),
        ({"bits": 4}, "None"),
    ],
)
def test_format_of_refuses_other_methods_by_name(config, named):
    with pytest.raises(ef.UnsupportedQuantizationError) as info:
        ef.format_of(config)
    message = str(info.value)
    assert named in message and "mxfp4" in message and "fp8" in message
    assert isinstance(info.value, NeuroDaskError) and isinstance(info.value, ConfigError)


# ---------------------------------------------------------------- fp8 block vs transformers


@pytest.mark.parametrize("shape, block", [((96, 64), (32, 32)), ((2, 128, 64), (32, 16)), ((64, 64), (128, 128))])
def test_fp8_dequantize_matches_transformers_load_path_on_whole_blocks(shape, block):
    from transformers.integrations.finegrained_fp8 import Fp8Dequantize

    g = torch.Generator().manual_seed(1)
    q = random_fp8(*shape, generator=g)
    grid = (*shape[:-2], math.ceil(shape[-2] / block[0]), math.ceil(shape[-1] / block[1]))
    s = torch.rand(grid, generator=g) * 1e-2
    for dtype in (torch.float32, torch.bfloat16):
        ours = ef.dequantize_fp8_block(q, s, block, dtype)
        theirs = Fp8Dequantize(None)._dequantize_one(q, s, output_dtype=dtype)
        assert ours.dtype == dtype and torch.equal(ours, theirs)


@pytest.mark.parametrize("shape, block", [((48, 64), (32, 32)), ((100, 70), (32, 32)), ((576, 200), (128, 128))])
def test_fp8_dequantize_partial_edge_blocks(shape, block):
    from transformers.integrations.finegrained_fp8 import _dequantize_fp8_weight

    g = torch.Generator().manual_seed(2)
    q = random_fp8(*shape, generator=g)
    s = torch.rand(math.ceil(shape[0] / block[0]), math.ceil(shape[1] / block[1]), generator=g)
    ours = ef.dequantize_fp8_block(q, s, block, torch.float32)
    # transformers' FP8 matmuls' dequantization (used for their backward pass) crops edge blocks too
    assert torch.equal(ours, _dequantize_fp8_weight(q, s, list(block), torch.float32))
    assert torch.equal(ours, naive_fp8_dequant(q, s, block))


def test_transformers_fp8_load_path_misreads_partial_blocks():
    """Tripwire for a transformers 5.24 bug that reference_dequantized documents: Fp8Dequantize takes the
    block from the grid (rows // grid_rows), so [48, 64] in (32, 32) blocks is read as 24-row blocks. If
    this fails, transformers fixed it: drop the caveat in quantized_checkpoints.py."""
    from transformers.integrations.finegrained_fp8 import Fp8Dequantize

    g = torch.Generator().manual_seed(3)
    q = random_fp8(48, 64, generator=g)
    s = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    theirs = Fp8Dequantize(None)._dequantize_one(q, s, output_dtype=torch.float32)
    assert not torch.equal(theirs, ef.dequantize_fp8_block(q, s, (32, 32), torch.float32))
    with pytest.raises(ValueError):
        Fp8Dequantize(None)._dequantize_one(random_fp8(100, 70, generator=g), torch.ones(4, 3), torch.float32)


@pytest.mark.parametrize("shape, block", [((96, 64), (32, 32)), ((48, 70), (32, 32)), ((3, 40, 64), (16, 32))])
def test_fp8_quantize_roundtrip_error_bound(shape, block):
    g = torch.Generator().manual_seed(4)
    w = torch.randn(shape, generator=g) * torch.logspace(-3, 1, shape[-1])  # columns of very different size
    q, s = ef.quantize_fp8_block(w, block)
    assert q.dtype == torch.float8_e4m3fn and s.dtype == torch.float32
    assert s.shape == (*shape[:-2], math.ceil(shape[-2] / block[0]), math.ceil(shape[-1] / block[1]))
    back = ef.dequantize_fp8_block(q, s, block, torch.float32)
    scale = s.repeat_interleave(block[0], -2).repeat_interleave(block[1], -1)[..., : shape[-2], : shape[-1]]
    # e4m3 has 3 mantissa bits: half an ulp is 2^-4 relative for normals; its subnormals are spaced
    # 2^-9, so below 2^-6 the error is at most 2^-10 times the block's scale. 2^-23: float32 rounding.
    bound = 2**-4 * w.abs() + 2**-10 * scale + 2**-23 * w.abs()
    assert torch.all((back - w).abs() <= bound)
    big = w.abs() >= 2**-6 * scale  # the normal range: relative error under 2^-3 as advertised
    assert torch.all((back - w).abs()[big] <= 2**-3 * w.abs()[big])
    # the block's largest value maps onto 448 exactly
    assert q.float().abs().amax() == 448.0


def test_fp8_ue8m0_scales_in_any_storage_dtype():
    """DeepSeek-V3.1's "scale_fmt": "ue8m0": power-of-two scales, as float32, exponent bytes or e8m0."""
    from transformers.integrations.finegrained_fp8 import Fp8Dequantize

    assert ef.format_of({**qc.fp8_quantization_config((128, 128)), "scale_fmt": "ue8m0"}) == ef.FORMAT_FP8_BLOCK
    g = torch.Generator().manual_seed(10)
    q = random_fp8(64, 96, generator=g)
    exponent_bytes = torch.randint(110, 135, (2, 3), dtype=torch.uint8, generator=g)
    as_float = torch.exp2(exponent_bytes.float() - 127)
    want = ef.dequantize_fp8_block(q, as_float, (32, 32), torch.float32)
    assert torch.equal(ef.dequantize_fp8_block(q, exponent_bytes, (32, 32), torch.float32), want)
    assert torch.equal(ef.dequantize_fp8_block(q, as_float.to(torch.float8_e8m0fnu), (32, 32), torch.float32), want)
    assert torch.equal(Fp8Dequantize(None)._dequantize_one(q, exponent_bytes, torch.float32), want)


def test_fp8_quantize_zero_block_keeps_zeros():
    w = torch.zeros(64, 64)
    w[:32, :32] = torch.randn(32, 32)
    q, s = ef.quantize_fp8_block(w, (32, 32))
    assert s[1, 1] == 1.0 and torch.equal(ef.dequantize_fp8_block(q, s, (32, 32), torch.float32)[32:, 32:], w[32:, 32:])


# ---------------------------------------------------------------- mxfp4 vs transformers


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mxfp4_matches_transformers_convert_moe_packed_tensors(dtype):
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    g = torch.Generator().manual_seed(5)
    blocks = torch.randint(0, 256, (3, 96, 2, 16), dtype=torch.uint8, generator=g)  # E=3, R=96, C=64
    scales = torch.randint(100, 150, (3, 96, 2), dtype=torch.uint8, generator=g)
    theirs = convert_moe_packed_tensors(blocks, scales, dtype=dtype)
    assert theirs.shape == (3, 64, 96)  # transformers transposes [E, R, C] -> [E, C, R]
    stacked = ef.mxfp4_to_param(blocks, scales, dtype)
    assert stacked.dtype == dtype and torch.equal(stacked, theirs)
    for e in range(3):  # one expert's file holds [R, C/32, 16]
        assert torch.equal(ef.mxfp4_to_param(blocks[e], scales[e], dtype), theirs[e])
    flat = ef.dequantize_mxfp4(blocks, scales, dtype)
    assert flat.shape == (3, 96, 64) and torch.equal(flat.transpose(1, 2), theirs)


def test_mxfp4_layout_low_nibble_first_and_e8m0_scale():
    blocks = torch.zeros(1, 1, 16, dtype=torch.uint8)
    blocks[0, 0, 0] = 0x7A  # low nibble 0xA = -1.0, high nibble 0x7 = 6.0
    scales = torch.tensor([[128]], dtype=torch.uint8)  # 2^(128 - 127) = 2
    out = ef.dequantize_mxfp4(blocks, scales, torch.float32)
    assert out.shape == (1, 32) and out[0, :2].tolist() == [-2.0, 12.0] and not out[0, 2:].any()


def test_mxfp4_representable_values_roundtrip_exactly():
    g = torch.Generator().manual_seed(6)
    grid = torch.tensor(ef.FP4_VALUES)
    codes = torch.randint(0, 16, (4, 8, 64), generator=g)
    exponents = torch.randint(-20, 20, (4, 8, 2, 1), generator=g)
    w = torch.ldexp(grid[codes].unflatten(-1, (2, 32)), exponents).flatten(-2)
    blocks, scales = ef.quantize_mxfp4(w)
    assert blocks.shape == (4, 8, 2, 16) and scales.shape == (4, 8, 2)
    assert blocks.dtype == scales.dtype == torch.uint8
    assert torch.equal(ef.dequantize_mxfp4(blocks, scales, torch.float32), w)


def test_mxfp4_quantize_rounds_to_nearest_ties_to_even():
    x = torch.zeros(1, 32)
    x[0, :12] = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0, -0.3, -2.6, 0.1, 5.9])
    blocks, scales = ef.quantize_mxfp4(x)
    assert scales.item() == 127  # amax 6 -> scale 2^0
    out = ef.dequantize_mxfp4(blocks, scales, torch.float32)[0, :12]
    assert out.tolist() == [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, 6.0, -0.5, -3.0, 0.0, 6.0]


def test_mxfp4_quantize_error_bound_on_random_weights():
    g = torch.Generator().manual_seed(7)
    w = torch.randn(16, 128, generator=g) * 0.02
    blocks, scales = ef.quantize_mxfp4(w)
    back = ef.dequantize_mxfp4(blocks, scales, torch.float32)
    step = torch.exp2(scales.float() - 127).repeat_interleave(32, -1)
    scaled = (w / step).abs()
    assert torch.all(scaled <= 6.0)  # the shared scale is rounded up: nothing saturates
    half_gap = torch.where(scaled < 2, 0.25, torch.where(scaled < 4, 0.5, 1.0))  # e2m1's spacing is 0.5, 1, 2
    assert torch.all((back - w).abs() <= half_gap * step)


# ---------------------------------------------------------------- dequantize_expert


def test_dequantize_expert_float_casts():
    t = {"gate_up_proj": torch.randn(128, 64), "down_proj": torch.randn(64, 64)}
    out = ef.dequantize_expert(t, ef.FORMAT_FLOAT, torch.bfloat16)
    assert {k: v.dtype for k, v in out.items()} == {"gate_up_proj": torch.bfloat16, "down_proj": torch.bfloat16}
    with pytest.raises(CheckpointError, match="'down_proj'"):
        ef.dequantize_expert({"down_proj": torch.zeros(4, 4, dtype=torch.uint8)}, ef.FORMAT_FLOAT, torch.float32)


def fp8_expert(block=(32, 32)) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """A DeepSeek expert's store file (I=64, D=64) and the float weights it was made from."""
    g = torch.Generator().manual_seed(8)
    w = {"gate_up_proj": torch.randn(128, 64, generator=g) * 0.05, "down_proj": torch.randn(64, 64, generator=g) * 0.05}
    stored: dict[str, torch.Tensor] = {}
    for name, t in w.items():
        stored[name], stored[name + "_scale_inv"] = ef.quantize_fp8_block(t, block)
    return stored, w


def test_dequantize_expert_fp8_block():
    stored, _ = fp8_expert()
    out = ef.dequantize_expert(stored, ef.FORMAT_FP8_BLOCK, torch.float32, block=(32, 32))
    assert set(out) == {"gate_up_proj", "down_proj"}
    for name in out:
        want = naive_fp8_dequant(stored[name], stored[name + "_scale_inv"], (32, 32))
        assert out[name].dtype == torch.float32 and torch.equal(out[name], want)


@pytest.mark.parametrize(
    "damage, named",
    [
        (lambda t: t.pop("down_proj_scale_inv"), "'down_proj'"),  # fp8 without scales
        (lambda t: t.pop("down_proj"), "'down_proj_scale_inv'"),  # scales without weight
        (lambda t: t.update(down_proj_scale_inv=torch.ones(3, 2)), "'down_proj_scale_inv'"),
        (lambda t: t.update(down_proj=t["down_proj"].float()), "'down_proj'"),
    ],
)
def test_dequantize_expert_fp8_companion_errors(damage, named):
    stored, _ = fp8_expert()
    damage(stored)
    with pytest.raises(CheckpointError, match=named):
        ef.dequantize_expert(stored, ef.FORMAT_FP8_BLOCK, torch.float32, block=(32, 32))


def test_dequantize_expert_fp8_needs_block():
    stored, _ = fp8_expert()
    with pytest.raises(ConfigError, match="weight_block_size"):
        ef.dequantize_expert(stored, ef.FORMAT_FP8_BLOCK, torch.float32)


def mxfp4_expert() -> dict[str, torch.Tensor]:
    """One gpt-oss expert's store file (D=64, I=32): blocks/scales in the published orientation."""
    g = torch.Generator().manual_seed(9)
    gate_up_blocks, gate_up_scales = ef.quantize_mxfp4(torch.randn(64, 64, generator=g))  # [2I, D]
    down_blocks, down_scales = ef.quantize_mxfp4(torch.randn(64, 32, generator=g))  # [D, I]
    return {
        "gate_up_proj_blocks": gate_up_blocks,
        "gate_up_proj_scales": gate_up_scales,
        "gate_up_proj_bias": torch.randn(64, generator=g),
        "down_proj_blocks": down_blocks,
        "down_proj_scales": down_scales,
        "down_proj_bias": torch.randn(64, generator=g),
    }


def test_dequantize_expert_mxfp4_gives_in_memory_layout():
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    stored = mxfp4_expert()
    out = ef.dequantize_expert(stored, ef.FORMAT_MXFP4, torch.float32)
    assert {k: tuple(v.shape) for k, v in out.items()} == {
        "gate_up_proj": (64, 64),  # [D, 2I]
        "gate_up_proj_bias": (64,),
        "down_proj": (32, 64),  # [I, D]
        "down_proj_bias": (64,),
    }
    for proj in ("gate_up_proj", "down_proj"):
        blocks, scales = stored[f"{proj}_blocks"][None], stored[f"{proj}_scales"][None]
        assert torch.equal(out[proj], convert_moe_packed_tensors(blocks, scales, dtype=torch.float32)[0])
    assert torch.equal(out["down_proj_bias"], stored["down_proj_bias"])


@pytest.mark.parametrize(
    "damage, named",
    [
        (lambda t: t.pop("down_proj_scales"), "'down_proj_blocks'"),
        (lambda t: t.pop("down_proj_blocks"), "'down_proj_scales'"),
        (lambda t: t.update(down_proj_scales=t["down_proj_scales"][:32]), "'down_proj_blocks'"),
        (lambda t: t.update(down_proj_scales=t["down_proj_scales"].float()), "'down_proj_blocks'"),
    ],
)
def test_dequantize_expert_mxfp4_companion_errors(damage, named):
    stored = mxfp4_expert()
    damage(stored)
    with pytest.raises(CheckpointError, match=named):
        ef.dequantize_expert(stored, ef.FORMAT_MXFP4, torch.float32)


# ---------------------------------------------------------------- checkpoint writers

# D=64 everywhere; DeepSeek: I=64 per expert, 96 dense, kv_a_proj_with_mqa [48, 64]; gpt-oss: I=64, E=4.
DEEPSEEK_V3 = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=96,
    moe_intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=4,
    n_routed_experts=8,
    num_experts_per_tok=2,
    n_group=2,
    topk_group=1,
    q_lora_rank=32,
    kv_lora_rank=32,
    qk_rope_head_dim=16,
    qk_nope_head_dim=16,
    v_head_dim=16,
    first_k_dense_replace=1,
    max_position_embeddings=256,
)
GPT_OSS = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    num_local_experts=4,
    num_experts_per_tok=2,
    layer_types=["sliding_attention", "full_attention"],
    sliding_window=8,
    max_position_embeddings=256,
)


def tiny_deepseek_v3():
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("deepseek_v3", **DEEPSEEK_V3)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


def tiny_gpt_oss():
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("gpt_oss", **GPT_OSS)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def deepseek_float(tmp_path_factory):
    src = tmp_path_factory.mktemp("deepseek-float")
    tiny_deepseek_v3().save_pretrained(src)
    return src


@pytest.fixture(scope="module")
def gpt_oss_mxfp4(tmp_path_factory):
    model = tiny_gpt_oss()
    dst = qc.write_mxfp4_checkpoint(model, tmp_path_factory.mktemp("gpt-oss-mxfp4"))
    return model, dst


def checkpoint_layout(dst) -> dict[str, tuple[tuple[int, ...], str]]:
    with safe_open(dst / "model.safetensors", "pt") as f:
        return {k: (tuple(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype()) for k in f.keys()}


def test_fp8_writer_publishes_deepseek_v3_layout(deepseek_float, tmp_path):
    dst = qc.write_fp8_block_checkpoint(deepseek_float, tmp_path / "fp8", block=(32, 32))
    config = json.loads((dst / "config.json").read_text())
    assert config["quantization_config"] == {
        "activation_scheme": "dynamic",
        "fmt": "e4m3",
        "quant_method": "fp8",
        "weight_block_size": [32, 32],
    }
    layout = checkpoint_layout(dst)
    expert = "model.layers.1.mlp.experts.5."
    assert layout[expert + "gate_proj.weight"] == ((64, 64), "F8_E4M3")
    assert layout[expert + "gate_proj.weight_scale_inv"] == ((2, 2), "F32")
    assert layout[expert + "down_proj.weight"] == ((64, 64), "F8_E4M3")
    assert layout["model.layers.1.mlp.shared_experts.up_proj.weight_scale_inv"] == ((2, 2), "F32")
    assert layout["model.layers.0.mlp.down_proj.weight_scale_inv"] == ((2, 3), "F32")  # [64, 96]
    # [48, 64]: a partial edge block of rows, as DeepSeek-V3's [576, 7168] with scales [5, 56]
    assert layout["model.layers.0.self_attn.kv_a_proj_with_mqa.weight"] == ((48, 64), "F8_E4M3")
    assert layout["model.layers.0.self_attn.kv_a_proj_with_mqa.weight_scale_inv"] == ((2, 2), "F32")
    for float_name in (
        "model.embed_tokens.weight",
        "lm_head.weight",
        "model.norm.weight",
        "model.layers.1.mlp.gate.weight",
        "model.layers.1.mlp.gate.e_score_correction_bias",
        "model.layers.0.self_attn.kv_a_layernorm.weight",
    ):
        assert layout[float_name][1] == "F32" and float_name + "_scale_inv" not in layout
    quantized = {k for k, (_, dtype) in layout.items() if dtype == "F8_E4M3"}
    assert quantized == {k.removesuffix("_scale_inv") for k in layout if k.endswith("_scale_inv")}
    assert len([k for k in quantized if ".experts." in k]) == 8 * 3


def test_fp8_reference_is_transformers_dequantization(deepseek_float, tmp_path):
    """Blocks of 16 divide every dim, so transformers' load path dequantizes right (see the tripwire
    above): its float32 model holds exactly what dequantize_expert makes of each expert's slice."""
    block = (16, 16)
    assert qc.block_divides_all(deepseek_float, block) and not qc.block_divides_all(deepseek_float, (32, 32))
    dst = qc.write_fp8_block_checkpoint(deepseek_float, tmp_path / "fp8", block=block)
    reference = qc.reference_dequantized(dst)
    params = dict(reference.named_parameters())
    experts = "model.layers.1.mlp.experts."
    with safe_open(dst / "model.safetensors", "pt") as f:
        for e in (0, 7):
            # The store's file: the experts module's params, gate rows then up rows (I=64 is whole blocks).
            parts = {p: f.get_tensor(f"{experts}{e}.{p}_proj.weight") for p in ("gate", "up", "down")}
            scales = {p: f.get_tensor(f"{experts}{e}.{p}_proj.weight_scale_inv") for p in ("gate", "up", "down")}
            stored = {
                "gate_up_proj": torch.cat([parts["gate"], parts["up"]]),
                "gate_up_proj_scale_inv": torch.cat([scales["gate"], scales["up"]]),
                "down_proj": parts["down"],
                "down_proj_scale_inv": scales["down"],
            }
            out = ef.dequantize_expert(stored, ef.FORMAT_FP8_BLOCK, torch.float32, block=block)
            assert torch.equal(out["gate_up_proj"], params[experts + "gate_up_proj"][e])
            assert torch.equal(out["down_proj"], params[experts + "down_proj"][e])
        name = "model.layers.0.self_attn.kv_a_proj_with_mqa.weight"
        ours = ef.dequantize_fp8_block(f.get_tensor(name), f.get_tensor(name + "_scale_inv"), block, torch.float32)
        assert torch.equal(ours, params[name])
    from transformers import AutoModelForCausalLM

    original = dict(AutoModelForCausalLM.from_pretrained(deepseek_float, dtype=torch.float32).named_parameters())
    for name in (experts + "gate_up_proj", "model.layers.0.self_attn.q_b_proj.weight"):
        err = (params[name] - original[name]).abs()
        assert torch.all(err <= 2**-4 * original[name].abs() + 1e-4)
    out = reference.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 7)


def test_mxfp4_writer_publishes_gpt_oss_layout(gpt_oss_mxfp4):
    _, dst = gpt_oss_mxfp4
    config = json.loads((dst / "config.json").read_text())
    assert config["quantization_config"] == {
        "modules_to_not_convert": [
            "model.layers.*.self_attn",
            "model.layers.*.mlp.router",
            "model.embed_tokens",
            "lm_head",
        ],
        "quant_method": "mxfp4",
    }
    layout = checkpoint_layout(dst)
    experts = "model.layers.0.mlp.experts."
    # E=4, D=64, I=64: gate_up [E, 2I, D/32, 16], down [E, D, I/32, 16], as gpt-oss-20b's [32, 5760, 90, 16]
    assert layout[experts + "gate_up_proj_blocks"] == ((4, 128, 2, 16), "U8")
    assert layout[experts + "gate_up_proj_scales"] == ((4, 128, 2), "U8")
    assert layout[experts + "down_proj_blocks"] == ((4, 64, 2, 16), "U8")
    assert layout[experts + "down_proj_scales"] == ((4, 64, 2), "U8")
    assert layout[experts + "gate_up_proj_bias"] == ((4, 128), "F32")
    assert layout[experts + "down_proj_bias"] == ((4, 64), "F32")
    assert experts + "gate_up_proj" not in layout and experts + "down_proj" not in layout
    assert {dtype for k, (_, dtype) in layout.items() if not k.endswith(("_blocks", "_scales"))} == {"F32"}


def test_mxfp4_reference_is_transformers_dequantization(gpt_oss_mxfp4):
    model, dst = gpt_oss_mxfp4
    reference = qc.reference_dequantized(dst)
    params = dict(reference.named_parameters())
    original = dict(model.named_parameters())
    experts = "model.layers.1.mlp.experts."
    with safe_open(dst / "model.safetensors", "pt") as f:
        stacked = {k.removeprefix(experts): f.get_tensor(k) for k in f.keys() if k.startswith(experts)}
    for e in range(4):
        out = ef.dequantize_expert({k: v[e] for k, v in stacked.items()}, ef.FORMAT_MXFP4, torch.float32)
        for name, value in out.items():
            assert torch.equal(value, params[experts + name][e]), name
    # Quantized from the float model's in-memory params, transposes and all: within fp4's error.
    for name in ("gate_up_proj", "down_proj"):
        ours, theirs = params[experts + name], original[experts + name]
        assert (ours - theirs).abs().max() <= theirs.abs().amax() / 3  # half e2m1's widest gap, scaled
        assert torch.corrcoef(torch.stack([ours.flatten(), theirs.flatten()]))[0, 1] > 0.98
    q_proj = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(params[q_proj], original[q_proj])  # outside the experts: float, untouched
    out = reference.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 7)


def test_mxfp4_writer_refuses_other_models(deepseek_float, tmp_path):
    with pytest.raises(ValueError, match="gpt_oss"):
        qc.write_mxfp4_checkpoint(deepseek_float, tmp_path / "nope")
