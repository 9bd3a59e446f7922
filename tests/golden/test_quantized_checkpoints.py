"""Golden: checkpoints as they are published quantized. FP8 e4m3 with block scales (DeepSeek-V3,
Kimi K2, Qwen3-MoE-FP8) and MXFP4 (gpt-oss), written in those layouts by
neuro_dask/testing/quantized_checkpoints.py, shard without dequantizing the experts on disk and
generate the same tokens as transformers' own dequantized model of the same checkpoint."""

from __future__ import annotations

import json

import pytest
import torch
from cluster_helpers import neuro_cluster

import neuro_dask as nd
from neuro_dask.cli.main import main
from neuro_dask.store.manifest import LAYOUT_TRANSFORMERS, Manifest
from neuro_dask.store.safetensors_io import SafetensorsFile
from neuro_dask.testing.quantized_checkpoints import (
    block_divides_all,
    reference_dequantized,
    write_fp8_block_checkpoint,
    write_mxfp4_checkpoint,
)
from neuro_dask.testing.tiny_transformers import build_tiny_model, padded_prompts

pytestmark = pytest.mark.timeout(600)
BLOCK = (16, 16)


def _expert_bytes_in_checkpoint(folder) -> int:
    total = 0
    for path in folder.glob("*.safetensors"):
        f = SafetensorsFile(path)
        for name in f.keys():
            if ".experts." in name:
                begin, end = f._entries[name]["data_offsets"]
                total += end - begin
    return total


def _quantized(model_type: str, tmp_path, write, **sizes):
    model = build_tiny_model(model_type, seed=5, **sizes)
    model.save_pretrained(tmp_path / "float")
    write(tmp_path / "float", tmp_path / "published")
    assert main(["shard", str(tmp_path / "published"), str(tmp_path / "sharded"), "--quiet"]) == 0
    return tmp_path / "published", tmp_path / "sharded"


@pytest.fixture(scope="module")
def cluster_client(tmp_path_factory):
    with neuro_cluster(3, tmp_path=tmp_path_factory.mktemp("quantized")) as (_, client):
        yield client


@pytest.mark.parametrize(
    "model_type, fmt, write, sizes",
    [
        ("deepseek_v3", "fp8-block", lambda s, d: write_fp8_block_checkpoint(s, d, block=BLOCK), {}),
        ("qwen3_moe", "fp8-block", lambda s, d: write_fp8_block_checkpoint(s, d, block=BLOCK), {}),
        ("gpt_oss", "mxfp4", write_mxfp4_checkpoint, dict(hidden_size=64, intermediate_size=64)),
    ],
)
def test_published_quantized_checkpoint_serves_like_transformers_dequantized(
    model_type, fmt, write, sizes, cluster_client, tmp_path
):
    published, store = _quantized(model_type, tmp_path, write, **sizes)
    if fmt == "fp8-block":
        assert block_divides_all(tmp_path / "float", BLOCK)  # transformers' own loader needs whole blocks
    manifest = Manifest.read(store)
    assert manifest.layout == LAYOUT_TRANSFORMERS and manifest.experts_spec["format"] == fmt
    # the experts stay as published: no float32 copy on disk (a float32 expert would be 4x / 8x)
    stored = sum(a.bytes for a in manifest.experts)
    assert stored < 1.1 * _expert_bytes_in_checkpoint(published) + 1024 * len(manifest.experts)
    quantized_dtype = "F8_E4M3" if fmt == "fp8-block" else "U8"
    assert all(quantized_dtype in a.dtype for a in manifest.experts)

    reference = reference_dequantized(published)
    ids, mask = padded_prompts(128, seed=6)
    expected = reference.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
    with nd.load(store, client=cluster_client) as model:
        tokens = model.generate(ids, mask, max_new_tokens=8)
        logits = model(ids, mask)
    width = ids.shape[1]
    assert torch.equal(tokens[:, width:], expected[:, width:])
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
    with torch.no_grad():
        want = reference(input_ids=ids, attention_mask=mask, position_ids=positions).logits
    torch.testing.assert_close(logits[mask.bool()], want[mask.bool()], atol=1e-4, rtol=1e-4)


def test_kimi_k2_config_is_served_as_the_deepseek_v3_it_is(tmp_path):
    """Kimi K2's config.json names model_type kimi_k2 (its code ships as remote code, never run
    here); the architecture is DeepSeek-V3's, which transformers implements."""
    model = build_tiny_model("deepseek_v3", seed=7)
    model.save_pretrained(tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    config.update(model_type="kimi_k2", auto_map={"AutoModelForCausalLM": "modeling_deepseek.DeepseekV3ForCausalLM"})
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
    assert main(["shard", str(tmp_path / "hf"), str(tmp_path / "sharded"), "--quiet"]) == 0
    assert Manifest.read(tmp_path / "sharded").architecture == "kimi_k2"
    ids, mask = padded_prompts(128, seed=8)
    expected = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
    out = nd.load(tmp_path / "sharded").generate(ids, mask, max_new_tokens=8)
    assert torch.equal(out[:, ids.shape[1] :], expected[:, ids.shape[1] :])
