"""Sharding and loading: layout, manifest, integrity, and the errors for damaged input."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import neuro_dask as nd
from neuro_dask.errors import (
    IntegrityError,
    ManifestError,
    MissingConfigError,
    MissingTensorError,
    TensorShapeError,
    TruncatedFileError,
    UnsupportedModelError,
)
from neuro_dask.store.manifest import FORMAT_VERSION, Manifest, expert_path
from neuro_dask.store.safetensors_io import SafetensorsFile, StreamingWriter, sha256_file
from neuro_dask.store.sharder import shard_checkpoint


def test_manifest_lists_every_artifact_with_hash_and_size(sharded):
    root = sharded("qwen2_moe")
    m = Manifest.read(root)
    cfg = m.model_config
    assert m.architecture == "qwen2_moe" and m.format_version == FORMAT_VERSION
    assert {(a.layer, a.expert) for a in m.experts} == {(l, e) for l in cfg.moe_layers for e in range(cfg.num_experts)}
    for a in m.artifacts:
        path = root / a.path
        assert a.sha256 == sha256_file(path) and a.bytes == path.stat().st_size
    assert m.trunk.path == "trunk.safetensors"
    assert (root / expert_path(0, 5)).is_file()
    assert not (root / "experts" / "layer-001").exists()  # layer 1 is dense (mlp_only_layers)


def test_trunk_never_holds_routed_expert_weights(sharded):
    trunk = SafetensorsFile(sharded("mixtral") / "trunk.safetensors")
    assert not [k for k in trunk.keys() if ".experts." in k]
    assert "layers.0.router.weight" in trunk.keys()


def test_expert_files_hold_exactly_the_transformers_weights(hf_checkpoint, sharded):
    src = load_file(hf_checkpoint("mixtral") / "model.safetensors")
    expert = load_file(sharded("mixtral") / expert_path(2, 5))
    prefix = "model.layers.2.block_sparse_moe.experts.5"
    assert torch.equal(expert["gate_proj"], src[f"{prefix}.w1.weight"])
    assert torch.equal(expert["up_proj"], src[f"{prefix}.w3.weight"])
    assert torch.equal(expert["down_proj"], src[f"{prefix}.w2.weight"])


def test_stacked_and_per_expert_layouts_shard_to_the_same_experts(hf_checkpoint, sharded):
    stacked = load_file(hf_checkpoint("mixtral_stacked") / "model.safetensors")
    expert = load_file(sharded("mixtral_stacked") / expert_path(1, 3))
    gate_up = stacked["model.layers.1.mlp.experts.gate_up_proj"][3]
    half = gate_up.shape[0] // 2
    assert torch.equal(expert["gate_proj"], gate_up[:half])
    assert torch.equal(expert["up_proj"], gate_up[half:])
    assert torch.equal(expert["down_proj"], stacked["model.layers.1.mlp.experts.down_proj"][3])


def test_multi_file_checkpoint_with_index(hf_checkpoint, tmp_path):
    src = hf_checkpoint("olmoe")
    tensors = load_file(src / "model.safetensors")
    names = sorted(tensors)
    parts = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    multi = tmp_path / "multi"
    multi.mkdir()
    for file, keys in parts.items():
        save_file({k: tensors[k] for k in keys}, str(multi / file))
    (multi / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": {k: f for f, ks in parts.items() for k in ks}})
    )
    shutil.copy(src / "config.json", multi / "config.json")
    one = shard_checkpoint(src, tmp_path / "one")
    two = shard_checkpoint(multi, tmp_path / "two")
    assert [a.sha256 for a in one.artifacts] == [a.sha256 for a in two.artifacts]


def test_streaming_writer_output_is_standard_safetensors(tmp_path):
    tensors = {"a": torch.randn(3, 5), "b": torch.randn(7).to(torch.bfloat16), "c": torch.arange(4)}
    writer = StreamingWriter(tmp_path / "x.safetensors", [(k, v.dtype, tuple(v.shape)) for k, v in tensors.items()])
    writer.write(iter(tensors.values()))
    loaded = load_file(tmp_path / "x.safetensors")
    for k, v in tensors.items():
        assert torch.equal(loaded[k], v)
    assert writer.sha256 == sha256_file(tmp_path / "x.safetensors")
    assert writer.bytes == (tmp_path / "x.safetensors").stat().st_size


def test_reader_slices_one_expert_and_half_of_it(tmp_path):
    stacked = torch.arange(2 * 6 * 3, dtype=torch.float32).reshape(2, 6, 3)
    save_file({"w": stacked}, str(tmp_path / "s.safetensors"))
    f = SafetensorsFile(tmp_path / "s.safetensors")
    assert torch.equal(f.read("w", 1), stacked[1])
    assert torch.equal(f.read("w", 1, 1), stacked[1, 3:])


# ---- bad input: each gives a specific NeuroDaskError that names the file or field ----------------


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_changed_shard_is_refused_naming_the_file(sharded, tmp_path):
    root = _copy(sharded("mixtral"), tmp_path / "m")
    victim = root / expert_path(0, 1)
    data = bytearray(victim.read_bytes())
    data[-1] ^= 0xFF
    victim.write_bytes(bytes(data))
    with pytest.raises(IntegrityError) as err:
        nd.load(root)
    assert err.value.path == str(victim) and str(victim) in str(err.value)


def test_truncated_checkpoint_file_is_named(hf_checkpoint, tmp_path):
    src = _copy(hf_checkpoint("mixtral"), tmp_path / "hf")
    weights = src / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(TruncatedFileError) as err:
        shard_checkpoint(src, tmp_path / "out")
    assert str(weights) in str(err.value)


def test_truncated_shard_is_named_even_without_hash_checks(sharded, tmp_path):
    root = _copy(sharded("mixtral"), tmp_path / "m")
    trunk = root / "trunk.safetensors"
    trunk.write_bytes(trunk.read_bytes()[:100])
    with pytest.raises(TruncatedFileError, match="trunk.safetensors"):
        nd.load(root, verify=False)


def test_missing_tensor_is_named(hf_checkpoint, tmp_path):
    src = _copy(hf_checkpoint("qwen3_moe"), tmp_path / "hf")
    tensors = load_file(src / "model.safetensors")
    del tensors["model.layers.1.mlp.experts.2.up_proj.weight"]
    save_file(tensors, str(src / "model.safetensors"))
    with pytest.raises(MissingTensorError, match=r"model\.layers\.1\.mlp\.experts\.2\.up_proj\.weight"):
        shard_checkpoint(src, tmp_path / "out")


def test_wrong_shape_is_named_with_both_shapes(hf_checkpoint, tmp_path):
    src = _copy(hf_checkpoint("qwen3_moe"), tmp_path / "hf")
    tensors = load_file(src / "model.safetensors")
    tensors["model.layers.0.self_attn.q_proj.weight"] = torch.zeros(7, 64)
    save_file(tensors, str(src / "model.safetensors"))
    with pytest.raises(TensorShapeError) as err:
        shard_checkpoint(src, tmp_path / "out")
    assert err.value.name == "model.layers.0.self_attn.q_proj.weight"
    assert err.value.actual == (7, 64)


def test_missing_config_and_unsupported_type(hf_checkpoint, tmp_path):
    src = _copy(hf_checkpoint("mixtral"), tmp_path / "hf")
    raw = json.loads((src / "config.json").read_text())
    # a dense architecture, or one no transformers knows: no routed experts to serve
    for model_type in ("llama", "not-a-model"):
        (src / "config.json").write_text(json.dumps(dict(raw, model_type=model_type)))
        with pytest.raises(UnsupportedModelError, match="no routed experts.*deepseek_v3.*gpt_oss.*mixtral"):
            shard_checkpoint(src, tmp_path / "out")
    # an MoE architecture whose config leaves no layer with routed experts (all dense)
    (src / "config.json").write_text(json.dumps(dict(raw, model_type="deepseek_v3", first_k_dense_replace=8)))
    with pytest.raises(UnsupportedModelError, match="no layer with routed experts"):
        shard_checkpoint(src, tmp_path / "out")
    (src / "config.json").unlink()
    with pytest.raises(MissingConfigError):
        shard_checkpoint(src, tmp_path / "out")
    with pytest.raises(MissingConfigError):
        nd.load(tmp_path / "nothing-here")


def test_loading_an_unsharded_checkpoint_says_to_shard_it(hf_checkpoint):
    with pytest.raises(ManifestError, match="neuro-dask shard"):
        nd.load(hf_checkpoint("mixtral"))


def test_a_half_written_store_has_no_manifest(hf_checkpoint, tmp_path, monkeypatch):
    import neuro_dask.store.sharder as sharder

    calls = []

    def fail_on_third(name):
        calls.append(name)
        if len(calls) == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        sharder.shard_checkpoint(hf_checkpoint("mixtral"), tmp_path / "out", progress=fail_on_third)
    assert not (tmp_path / "out" / "manifest.json").exists()
