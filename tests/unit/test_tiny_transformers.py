"""Tiny random MoE causal LMs for every transformers model type with hooked experts."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from transformers import AutoModelForCausalLM  # noqa: E402

from neuro_dask.testing import tiny_transformers as tt  # noqa: E402

_MODELS: dict[str, object] = {}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny matmuls gain nothing from threads and slow down badly on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny(model_type: str):
    """Each required model is built once per session (seed 0)."""
    if model_type not in _MODELS:
        _MODELS[model_type] = tt.build_tiny_model(model_type)
    return _MODELS[model_type]


def test_enumeration_covers_required_and_accounts_for_every_type():
    assert tt.HOOKED_MODEL_TYPES
    assert set(tt.REQUIRED) <= set(tt.HOOKED_MODEL_TYPES)
    skipped, built = tt.skipped(), set(tt.buildable())
    for model_type in tt.HOOKED_MODEL_TYPES:
        assert (model_type in built) != (model_type in skipped), model_type
        if model_type in skipped:
            assert skipped[model_type].strip(), model_type
    assert all(reason.strip() for reason in skipped.values())
    assert not set(tt.REQUIRED) & set(skipped), {t: skipped[t] for t in set(tt.REQUIRED) & set(skipped)}


def test_unknown_and_multimodal_only_types_raise():
    with pytest.raises(tt.TinyModelUnavailable):
        tt.tiny_config("no_such_model_type")
    multimodal_only = set(tt.skipped()) - set(tt.HOOKED_MODEL_TYPES)
    for model_type in sorted(multimodal_only)[:3]:
        with pytest.raises(tt.TinyModelUnavailable):
            tt.tiny_config(model_type)


def test_tiny_config_applies_overrides():
    config = tt.tiny_config("mixtral", num_local_experts=4)
    assert config.num_local_experts == 4
    assert config.hidden_size == 64 and config.vocab_size == 128


@pytest.mark.parametrize("model_type", tt.REQUIRED)
def test_required_type_builds_routes_and_generates(model_type):
    model = tiny(model_type)
    config = model.config.get_text_config()
    assert next(model.parameters()).dtype == torch.float32 and not model.training
    experts = tt.experts_modules(model)
    assert len(experts) >= 1
    assert all(tt.expert_count(e) >= 4 for e in experts)
    assert tt.config_top_k(model.config) >= 2
    assert config.vocab_size == 128 and config.hidden_size == 64

    ids, mask = tt.padded_prompts(config.vocab_size, lengths=(4, 7))
    assert mask[0, 0] == 0 and mask[1, 0] == 1  # left padding
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
    assert out.shape == (2, ids.shape[1] + 8)
    assert torch.equal(out[:, : ids.shape[1]], ids)
    assert int(out.max()) < config.vocab_size


@pytest.mark.parametrize("model_type", tt.REQUIRED)
def test_checkpoint_reloads_with_identical_logits(model_type, tmp_path):
    model = tiny(model_type)
    root = tt.write_tiny_checkpoint(model_type, tmp_path / model_type)
    assert (root / "config.json").is_file()
    assert list(root.glob("*.safetensors"))
    reloaded = AutoModelForCausalLM.from_pretrained(
        root, dtype=torch.float32, attn_implementation=model.config._attn_implementation
    ).eval()
    expected_state, state = model.state_dict(), reloaded.state_dict()
    assert set(state) == set(expected_state)
    assert all(torch.equal(state[k], expected_state[k]) for k in expected_state)

    ids, mask = tt.padded_prompts(model.config.get_text_config().vocab_size, lengths=(5, 9), seed=1)
    with torch.no_grad():
        expected = model(ids, attention_mask=mask).logits
        # Weights memory-mapped from safetensors are not 16-byte aligned, and CPU matmul kernels
        # may then round differently (~1e-6 on logits of ~4): same bits, other path.
        torch.testing.assert_close(reloaded(ids, attention_mask=mask).logits, expected, atol=1e-5, rtol=0)
        for param in reloaded.parameters():
            param.data = param.data.clone()
        got = reloaded(ids, attention_mask=mask).logits
    assert expected.abs().max() > 0
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)


def test_overrides_reach_the_text_config_of_composite_types():
    config = tt.tiny_config("qwen3_5_moe", num_experts=4)
    assert tt.config_num_experts(config) == 4
