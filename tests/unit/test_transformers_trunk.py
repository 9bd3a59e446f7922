"""The transformers trunk's pieces: the registered experts function, the meta skeleton, the
transformers-layout sharder, the workers' runners, precision choice, and hostile stores."""

from __future__ import annotations

import json
import logging
import threading

import pytest
import torch
from tiny_models import padded_batch

import neuro_dask as nd
from neuro_dask.errors import ConfigError, ManifestError, TensorShapeError, UnsupportedModelError
from neuro_dask.model.hf_trunk import (
    build_skeleton,
    expert_calls,
    experts_modules,
    neuro_experts_forward,
    on_meta,
    register_experts_implementation,
)
from neuro_dask.model.moe import run_expert
from neuro_dask.runtime import hf_experts
from neuro_dask.runtime.hf_experts import (
    STORED,
    TransformersExpert,
    choose_precision,
    experts_template,
    transformers_runner,
)
from neuro_dask.store.expert_files import ExpertLayoutError, read_expert_tensors, swiglu_weights
from neuro_dask.store.manifest import LAYOUT_TRANSFORMERS, Manifest
from neuro_dask.store.shard_store import ShardStore
from neuro_dask.store.sharder import shard_checkpoint

SIZES = dict(
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    vocab_size=128,
    max_position_embeddings=256,
    initializer_range=0.15,
)


def _model(model_type: str, **extra):
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **SIZES, **extra)).eval()


def _qwen3():
    return _model("qwen3_moe", num_experts=6, num_experts_per_tok=2, moe_intermediate_size=32)


def _gpt_oss():
    return _model(
        "gpt_oss",
        num_local_experts=4,
        num_experts_per_tok=2,
        intermediate_size=32,
        layer_types=["sliding_attention", "full_attention"],
        sliding_window=8,
    )


@pytest.fixture(scope="module")
def qwen3_store(tmp_path_factory):
    root = tmp_path_factory.mktemp("qwen3")
    model = _qwen3()
    model.save_pretrained(root / "hf")
    shard_checkpoint(root / "hf", root / "sh", layout="transformers")
    return model, root


@pytest.fixture(scope="module")
def gpt_oss_store(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpt_oss")
    model = _gpt_oss()
    model.save_pretrained(root / "hf")
    shard_checkpoint(root / "hf", root / "sh")  # auto: not a hand-written family
    return model, root


def test_registered_function_equals_transformers_own_experts_and_skips_unrouted_rows():
    model = _qwen3()
    experts = experts_modules(model)[1]
    x = torch.randn(10, 64)
    index = torch.stack([torch.randperm(6)[:2] for _ in range(10)])
    weights = torch.softmax(torch.randn(10, 2), -1)
    reference = experts(x, index, weights)  # transformers' own implementation (grouped_mm/eager)

    def dispatch(layer, groups):
        assert layer == 1
        gate, up = experts.gate_up_proj.chunk(2, dim=1)
        return {
            e: run_expert(
                rows, type("W", (), {"gate_proj": gate[e], "up_proj": up[e], "down_proj": experts.down_proj[e]})
            )
            for e, rows in groups.items()
        }

    experts._neuro_layer = 1
    with expert_calls(dispatch):
        out = neuro_experts_forward(experts, x, index, weights)
    torch.testing.assert_close(out, reference, atol=1e-6, rtol=1e-5)
    routed = torch.tensor([True, False] * 5)
    sent = []
    with expert_calls(
        lambda layer, groups: sent.append(sum(r.shape[0] for r in groups.values())) or dispatch(layer, groups), routed
    ):
        partial = neuro_experts_forward(experts, x, index, weights)
    assert sent == [5 * 2]  # only the routed rows' top-2 choices crossed the executor
    torch.testing.assert_close(partial[routed], reference[routed], atol=1e-6, rtol=1e-5)
    assert not partial[~routed].any()


def test_experts_outside_neuro_dask_say_how_to_connect_them():
    register_experts_implementation()
    experts = experts_modules(_qwen3())[0]
    experts._neuro_layer = 0
    with pytest.raises(RuntimeError, match="nd.load"):
        neuro_experts_forward(experts, torch.randn(2, 64), torch.zeros(2, 2, dtype=torch.long), torch.ones(2, 2))


def test_skeleton_is_all_meta_until_loaded_then_only_the_experts_are(qwen3_store):
    hf, root = qwen3_store
    raw = hf.config.to_dict()
    model = build_skeleton(raw)
    assert all(t.device.type == "meta" for t in (*model.parameters(), *model.buffers()))
    assert {m._neuro_layer for m in experts_modules(model).values()} == {0, 1}
    loaded = nd.load(root / "sh").hf
    for name, t in (*loaded.named_parameters(), *loaded.named_buffers()):
        assert (t.device.type == "meta") == (".experts." in name), name
    for name, buffer in hf.named_buffers():  # the rotary tables, recomputed, not left empty
        torch.testing.assert_close(loaded.get_buffer(name), buffer, rtol=0, atol=0)
    with on_meta():
        layer = torch.nn.Linear(3, 4)
        elsewhere = []  # another thread (an in-process worker beside a client) is not affected
        thread = threading.Thread(target=lambda: elsewhere.append(torch.nn.Linear(3, 4)))
        thread.start()
        thread.join()
    assert layer.weight.device.type == "meta"
    assert elsewhere[0].weight.device.type == "cpu"
    assert torch.nn.Linear(3, 4).weight.device.type == "cpu"  # nor is this thread after the block


def test_a_full_size_deepseek_v3_skeleton_builds_without_allocating_its_experts():
    """DeepSeek-V3 as published: 61 layers, 256 experts of 2048 x 7168 (a 30 GB tensor a layer)."""
    from transformers import AutoConfig

    model = build_skeleton(AutoConfig.for_model("deepseek_v3").to_dict())
    experts = experts_modules(model)
    assert len(experts) == 58 and experts[3].gate_up_proj.shape == (256, 4096, 7168)


def test_hostile_configs_are_refused_before_building_anything():
    raw = _qwen3().config.to_dict()
    with pytest.raises(ConfigError, match="num_hidden_layers"):
        build_skeleton(dict(raw, num_hidden_layers=10**9))
    with pytest.raises(ConfigError, match="num_hidden_layers"):
        build_skeleton(dict(raw, num_hidden_layers="3"))
    with pytest.raises(UnsupportedModelError, match="no routed experts"):
        build_skeleton(dict(raw, model_type="llama"))


def test_transformers_layout_store_generates_as_transformers_does(qwen3_store):
    hf, root = qwen3_store
    manifest = Manifest.read(root / "sh")
    assert manifest.layout == LAYOUT_TRANSFORMERS and manifest.experts_spec["swiglu"]
    assert manifest.model_config.moe_layers == (0, 1) and manifest.model_config.num_experts == 6
    ids, mask = padded_batch((4, 7), seed=3)
    model = nd.load(root / "sh")
    assert isinstance(model.hf, type(hf))  # a real PreTrainedModel
    reference = hf.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False)
    assert torch.equal(model.generate(ids, mask, max_new_tokens=10)[:, ids.shape[1] :], reference[:, ids.shape[1] :])
    with torch.no_grad():
        torch.testing.assert_close(
            model(ids, mask)[mask.bool()], hf(ids, attention_mask=mask).logits[mask.bool()], atol=1e-4, rtol=1e-4
        )


def test_transformers_native_generate_runs_with_streamers_and_prompt_lookup(qwen3_store):
    from transformers.generation.streamers import BaseStreamer

    hf, root = qwen3_store
    model = nd.load(root / "sh")
    ids = torch.tensor([[5, 9, 11, 5, 9, 11, 5, 9]])

    class Collect(BaseStreamer):
        def __init__(self):
            self.seen = []

        def put(self, value):
            self.seen.append(value.reshape(-1).tolist())

        def end(self):
            self.seen.append("end")

    streamer = Collect()
    out = model.hf_generate(ids, max_new_tokens=6, do_sample=False, streamer=streamer)
    expected = hf.generate(ids, max_new_tokens=6, do_sample=False)
    assert torch.equal(out, expected)
    assert streamer.seen[-1] == "end" and len(streamer.seen) >= 6
    lookup = model.hf_generate(ids, max_new_tokens=6, do_sample=False, prompt_lookup_num_tokens=3)
    assert torch.equal(lookup, expected)  # speculative lookup changes nothing in the tokens
    assisted = model.hf_generate(ids, max_new_tokens=6, do_sample=False, assistant_model=hf)  # a local draft model
    assert torch.equal(assisted, expected)


def test_per_expert_and_stacked_checkpoints_shard_to_the_same_expert_files(tmp_path):
    from safetensors.torch import save_file

    hf = _qwen3()
    hf.save_pretrained(tmp_path / "per-expert")  # transformers writes experts.{e}.gate_proj...
    (tmp_path / "stacked").mkdir()
    hf.config.save_pretrained(tmp_path / "stacked")
    save_file({k: v.contiguous() for k, v in hf.state_dict().items()}, str(tmp_path / "stacked" / "model.safetensors"))
    a = shard_checkpoint(tmp_path / "per-expert", tmp_path / "a", layout="transformers")
    b = shard_checkpoint(tmp_path / "stacked", tmp_path / "b", layout="transformers")
    assert [x.sha256 for x in a.experts] == [x.sha256 for x in b.experts]
    assert a.trunk.sha256 == b.trunk.sha256
    tensors = read_expert_tensors(tmp_path / "a" / a.expert(1, 4).path, a.experts_spec)
    torch.testing.assert_close(tensors["gate_up_proj"], hf.model.layers[1].mlp.experts.gate_up_proj[4], rtol=0, atol=0)


def test_swiglu_experts_become_expert_weights_and_run_at_every_precision(qwen3_store):
    hf, root = qwen3_store
    manifest = Manifest.read(root / "sh")
    path = root / "sh" / manifest.expert(0, 2).path
    experts = hf.model.layers[0].mlp.experts
    x = torch.randn(5, 64)
    reference = experts(x, torch.full((5, 1), 2), torch.ones(5, 1))
    w = swiglu_weights(read_expert_tensors(path, manifest.experts_spec), manifest.experts_spec)
    torch.testing.assert_close(run_expert(x, w), reference, atol=1e-6, rtol=1e-5)
    for precision, tol in (("float32", 1e-6), ("bfloat16", 5e-2), ("int8", 5e-2), ("int4", 2e-1)):
        runner = transformers_runner(path, manifest.experts_spec, manifest.config, 0, precision)
        assert runner.precision == precision
        torch.testing.assert_close(runner(x), reference, atol=tol * reference.abs().max().item(), rtol=tol)


def test_plain_swiglu_experts_run_on_the_onnx_backend_too(qwen3_store):
    hf, root = qwen3_store
    manifest = Manifest.read(root / "sh")
    x = torch.randn(3, 64)
    reference = hf.model.layers[1].mlp.experts(x, torch.full((3, 1), 5), torch.ones(3, 1))
    runner = transformers_runner(
        root / "sh" / manifest.expert(1, 5).path, manifest.experts_spec, manifest.config, 1, "float32", backend="onnx"
    )
    assert type(runner).__name__ == "OnnxExpert"
    torch.testing.assert_close(runner(x), reference, atol=1e-5, rtol=1e-4)


def test_gpt_oss_experts_run_through_their_own_class(gpt_oss_store):
    hf, root = gpt_oss_store
    manifest = Manifest.read(root / "sh")
    spec = manifest.experts_spec
    assert manifest.layout == LAYOUT_TRANSFORMERS and not spec["swiglu"]
    assert spec["flags"]["has_bias"] and spec["flags"]["is_transposed"] and not spec["flags"]["is_concatenated"]
    experts = hf.model.layers[1].mlp.experts
    x = torch.randn(6, 64)
    reference = experts(x, torch.full((6, 1), 3), torch.ones(6, 1))
    path = root / "sh" / manifest.expert(1, 3).path
    runner = transformers_runner(path, spec, manifest.config, 1, "float32")
    assert isinstance(runner, TransformersExpert)
    torch.testing.assert_close(runner(x), reference, atol=1e-5, rtol=1e-5)
    with pytest.raises(ExpertLayoutError, match="biases"):
        swiglu_weights(read_expert_tensors(path, spec), spec)
    with pytest.raises(ExpertLayoutError, match="not plain SwiGLU"):
        ShardStore(root / "sh").read_expert(1, 3)


def test_precisions_that_do_not_apply_fall_back_and_say_so(gpt_oss_store, caplog):
    hf, root = gpt_oss_store
    manifest = Manifest.read(root / "sh")
    hf_experts._WARNED.clear()
    with caplog.at_level(logging.WARNING, logger="neuro_dask.runtime.hf_experts"):
        runner = transformers_runner(
            root / "sh" / manifest.expert(0, 0).path, manifest.experts_spec, manifest.config, 0, "int8"
        )
    assert runner.precision == "bfloat16"
    assert "int8 on torch does not apply" in caplog.text and "biases" in caplog.text


def test_auto_precision_walks_down_to_the_stored_quantized_form():
    spec = {"swiglu": False, "format": "mxfp4", "parameters": {"gate_up_proj": [64, 128], "down_proj": [64, 64]}}
    params = 64 * 128 + 64 * 64
    stored = params // 2 + 1024
    assert choose_precision(spec, stored, 10, 10 * 4 * params) == "float32"
    assert choose_precision(spec, stored, 10, 10 * 2 * params) == "bfloat16"
    assert choose_precision(spec, stored, 10, 10 * stored) == STORED
    assert choose_precision(spec, stored, 10, 1) == STORED  # the smallest when nothing fits
    assert choose_precision({**spec, "format": "float"}, stored, 10, 1) == "bfloat16"


def test_a_tampered_expert_file_or_manifest_is_refused(gpt_oss_store, tmp_path):
    from safetensors.torch import save_file

    _, root = gpt_oss_store
    manifest = Manifest.read(root / "sh")
    spec = manifest.experts_spec
    tensors = read_expert_tensors(root / "sh" / manifest.expert(0, 0).path, spec)
    tensors["down_proj"] = tensors["down_proj"][:, :-1].contiguous()
    save_file(tensors, str(tmp_path / "bad.safetensors"))
    with pytest.raises(TensorShapeError, match="down_proj"):
        read_expert_tensors(tmp_path / "bad.safetensors", spec)
    raw = json.loads(manifest.to_json())
    with pytest.raises(ManifestError, match="layout"):
        Manifest.from_dict(dict(raw, layout="pickle"))
    with pytest.raises(ManifestError, match="experts_spec"):
        Manifest.from_dict(dict(raw, experts_spec=None))
    # how the experts run is part of the model's identity: a store that says otherwise is another model
    assert Manifest.from_dict(dict(raw, experts_spec=dict(spec, swiglu=True))).model_id != manifest.model_id


def test_experts_template_is_the_architectures_own_module(gpt_oss_store):
    _, root = gpt_oss_store
    manifest = Manifest.read(root / "sh")
    template = experts_template(manifest.config, 1)
    assert type(template).__name__ == "GptOssExperts" and template.limit > 0


def test_device_option(qwen3_store, sharded):
    _, root = qwen3_store
    assert nd.load(root / "sh", device="cpu").device.type == "cpu"
    with pytest.raises(ConfigError, match="--layout transformers"):
        nd.load(sharded("mixtral"), device="cuda")


def test_private_tier_refuses_experts_it_cannot_run_with_the_reason(gpt_oss_store):
    from neuro_dask.client.dispatch.session import _check_private

    _, root = gpt_oss_store
    with pytest.raises(ConfigError, match="privacy='private' cannot serve gpt_oss: GptOssExperts.*biases"):
        _check_private(ShardStore(root / "sh"))


def test_stored_quantized_experts_answer_as_their_dequantized_form(tmp_path):
    """`stored`: MXFP4 tensors stay resident (about a quarter of bfloat16) and are dequantized
    at each call; the answer is the dequantized expert's."""
    from neuro_dask.testing.quantized_checkpoints import write_mxfp4_checkpoint

    model = _model(
        "gpt_oss",
        num_local_experts=4,
        num_experts_per_tok=2,
        intermediate_size=64,
        layer_types=["sliding_attention", "full_attention"],
        sliding_window=8,
    )
    model.save_pretrained(tmp_path / "float")
    write_mxfp4_checkpoint(tmp_path / "float", tmp_path / "mxfp4")
    manifest = shard_checkpoint(tmp_path / "mxfp4", tmp_path / "sh")
    spec, path = manifest.experts_spec, tmp_path / "sh" / manifest.expert(1, 2).path
    stored = transformers_runner(path, spec, manifest.config, 1, STORED)
    full = transformers_runner(path, spec, manifest.config, 1, "float32")
    assert stored.precision == STORED and stored.nbytes() * 3 < full.nbytes()
    x = torch.randn(4, 64)
    torch.testing.assert_close(stored(x), full(x), atol=1e-6, rtol=1e-6)
