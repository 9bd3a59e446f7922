"""GGUF checkpoints (store/gguf_reader.py): metadata mapping, tensor layout, and clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

gguf = pytest.importorskip("gguf")

from gguf_models import gguf_tensors, write_gguf  # noqa: E402
from tiny_models import build_hf_model  # noqa: E402

from neuro_dask.cli.main import main  # noqa: E402
from neuro_dask.errors import MissingTensorError, NeuroDaskError  # noqa: E402
from neuro_dask.model.keymap import TensorRef  # noqa: E402
from neuro_dask.store.gguf_reader import (  # noqa: E402
    GGUFCheckpoint,
    GGUFError,
    UnsupportedGGUFError,
    gguf_name,
    is_gguf,
    permute_qk,
    unpermute_qk,
)
from neuro_dask.store.manifest import Manifest  # noqa: E402
from neuro_dask.store.sharder import count_artifacts, shard_checkpoint  # noqa: E402


@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory):
    """(variant, qtype) -> a tiny GGUF file, written once per module."""
    cache: dict[tuple[str, str], Path] = {}

    def get(variant: str, qtype: str = "F32") -> Path:
        if (variant, qtype) not in cache:
            cache[variant, qtype] = write_gguf(
                variant, tmp_path_factory.mktemp("gguf") / f"{variant}-{qtype}.gguf", qtype
            )
        return cache[variant, qtype]

    return get


@pytest.mark.parametrize("rows, heads", [(64, 4), (32, 2), (96, 3), (8, 1)])
def test_unpermute_undoes_llama_cpp_permute(rows, heads):
    w = torch.randn(rows, 5)
    assert torch.equal(unpermute_qk(permute_qk(w, heads), heads), w)
    if heads * 2 < rows:
        assert not torch.equal(permute_qk(w, heads), w)


@pytest.mark.parametrize(
    "variant, expected",
    [
        (
            "mixtral",
            dict(
                model_type="mixtral",
                vocab_size=128,
                hidden_size=64,
                num_hidden_layers=3,
                num_attention_heads=4,
                num_key_value_heads=2,
                num_local_experts=8,
                num_experts_per_tok=2,
                intermediate_size=96,
                max_position_embeddings=256,
                rms_norm_eps=1e-5,
                rope_theta=1e6,
                tie_word_embeddings=False,
                bos_token_id=1,
                eos_token_id=2,
            ),
        ),
        (
            "qwen2_moe",
            dict(
                model_type="qwen2_moe",
                vocab_size=128,
                num_experts=6,
                moe_intermediate_size=48,
                shared_expert_intermediate_size=72,
                intermediate_size=80,
                mlp_only_layers=[1],
                qkv_bias=True,
                num_key_value_heads=2,
            ),
        ),
    ],
)
def test_metadata_maps_to_hf_config(gguf_file, variant, expected):
    ckpt = GGUFCheckpoint(gguf_file(variant))
    assert {k: ckpt.raw_config[k] for k in expected} == expected
    hf = build_hf_model(variant).config
    assert ckpt.config.num_experts == ckpt.raw_config.get("num_local_experts", ckpt.raw_config.get("num_experts"))
    assert ckpt.config.rms_norm_eps == hf.rms_norm_eps
    assert ckpt.raw_config["gguf"]["architecture"] == {"mixtral": "llama", "qwen2_moe": "qwen2moe"}[variant]


def test_f32_tensors_come_back_in_hf_layout(gguf_file):
    hf = {k: v.float() for k, v in build_hf_model("mixtral").state_dict().items()}
    ckpt = GGUFCheckpoint(gguf_file("mixtral"))
    for name in (
        "model.layers.1.self_attn.q_proj.weight",
        "model.layers.1.self_attn.k_proj.weight",
        "model.embed_tokens.weight",
        "lm_head.weight",
        "model.layers.2.mlp.gate.weight",
    ):
        assert torch.equal(ckpt.read(TensorRef(name)), hf[name]), name
    gate_up, down = hf["model.layers.0.mlp.experts.gate_up_proj"], hf["model.layers.0.mlp.experts.down_proj"]
    assert torch.equal(ckpt.read(TensorRef("model.layers.0.mlp.experts.5.gate_proj.weight")), gate_up[5, :96])
    assert torch.equal(ckpt.read(TensorRef("model.layers.0.mlp.experts.5.up_proj.weight")), gate_up[5, 96:])
    assert torch.equal(ckpt.read(TensorRef("model.layers.0.mlp.experts.5.down_proj.weight")), down[5])
    assert ckpt.spec(TensorRef("model.layers.0.mlp.experts.5.down_proj.weight")) == (torch.float32, (64, 96))


def test_q8_0_tensors_are_dequantized_exactly(gguf_file):
    _, tensors = gguf_tensors("mixtral")
    ckpt = GGUFCheckpoint(gguf_file("mixtral", "Q8_0"))
    q8 = gguf.GGMLQuantizationType.Q8_0

    def roundtrip(t: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(t.numpy(), q8), q8))

    up = ckpt.read(TensorRef("model.layers.2.mlp.experts.3.up_proj.weight"))
    assert up.dtype == torch.float32
    assert torch.equal(up, roundtrip(tensors["blk.2.ffn_up_exps.weight"][3]))
    k = ckpt.read(TensorRef("model.layers.0.self_attn.k_proj.weight"))
    assert torch.equal(k, unpermute_qk(roundtrip(tensors["blk.0.attn_k.weight"]), 2))
    router = ckpt.read(TensorRef("model.layers.0.mlp.gate.weight"))  # kept F32, as llama.cpp does
    assert torch.equal(router, tensors["blk.0.ffn_gate_inp.weight"])


@pytest.mark.parametrize("variant", ["mixtral", "qwen2_moe"])
def test_cli_shards_a_gguf_file(gguf_file, tmp_path, variant):
    src = gguf_file(variant, "Q8_0")
    assert is_gguf(src)
    assert main(["shard", str(src), str(tmp_path / "out"), "--quiet"]) == 0
    manifest = Manifest.read(tmp_path / "out")
    assert len(manifest.artifacts) == count_artifacts(src)
    assert manifest.architecture == {"mixtral": "mixtral", "qwen2_moe": "qwen2_moe"}[variant]
    assert manifest.tokenizer_files == ()
    assert {a.dtype for a in manifest.artifacts} == {"F32"}


def test_unsupported_architecture_is_refused(tmp_path):
    path = write_gguf("mixtral", tmp_path / "falcon.gguf", arch="falcon")
    with pytest.raises(UnsupportedGGUFError, match="'falcon' is not a supported MoE.*qwen2moe"):
        GGUFCheckpoint(path)


def test_dense_llama_is_refused(tmp_path):
    path = write_gguf("mixtral", tmp_path / "dense.gguf", metadata=False)
    with pytest.raises(UnsupportedGGUFError, match="without llama.expert_count"):
        shard_checkpoint(path, tmp_path / "out")


@pytest.mark.parametrize(
    "drop, hf_name",
    [
        ("blk.1.attn_k.weight", "(GGUF tensor 'blk.1.attn_k.weight'): tensor 'model.layers.1.self_attn.k_proj.weight'"),
        ("blk.2.ffn_up_exps.weight", "model.layers.2.mlp.experts.0.up_proj.weight"),
        ("output_norm.weight", "(GGUF tensor 'output_norm.weight'): tensor 'model.norm.weight'"),
    ],
)
def test_missing_tensor_names_it(tmp_path, drop, hf_name):
    path = write_gguf("mixtral", tmp_path / "m.gguf", drop=(drop,))
    with pytest.raises(MissingTensorError) as info:
        shard_checkpoint(path, tmp_path / "out")
    assert hf_name in str(info.value)
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_gguf_name_reverses_the_mapping():
    assert gguf_name("model.layers.3.mlp.shared_expert.up_proj.weight") == "blk.3.ffn_up_shexp.weight"
    assert gguf_name("model.layers.0.mlp.experts.7.down_proj.weight") == "blk.0.ffn_down_exps.weight[7]"


@pytest.mark.parametrize("damage", ["truncate", "garbage", "bad_magic", "empty"])
def test_corrupt_file_raises_a_clear_error(gguf_file, tmp_path, damage):
    good = gguf_file("mixtral").read_bytes()
    data = {
        "truncate": good[: len(good) // 2],
        "garbage": b"GGUF" + bytes(range(256)) * 4,
        "bad_magic": b"XXXX" + good[4:],
        "empty": b"",
    }[damage]
    path = tmp_path / "bad.gguf"
    path.write_bytes(data)
    with pytest.raises(GGUFError, match="not a readable GGUF file") as info:
        shard_checkpoint(path, tmp_path / "out")
    assert isinstance(info.value, NeuroDaskError)
