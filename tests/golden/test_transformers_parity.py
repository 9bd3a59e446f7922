"""Golden checks: neuro_dask's split model against transformers' own implementation."""

from __future__ import annotations

import pytest
import torch
from tiny_models import VARIANTS, build_hf_model, padded_batch

import neuro_dask as nd

pytestmark = pytest.mark.golden
VARIANT_NAMES = sorted(VARIANTS)


@pytest.fixture(scope="module")
def pair(sharded):
    """variant -> (transformers model, neuro_dask model) with the same weights."""
    cache = {}

    def get(variant):
        if variant not in cache:
            cache[variant] = (build_hf_model(variant), nd.load(sharded(variant)))
        return cache[variant]

    return get


@pytest.mark.parametrize("variant", VARIANT_NAMES)
def test_logits_match_transformers_on_padded_batch(pair, variant):
    hf, model = pair(variant)
    ids, mask = padded_batch((5, 9, 13))
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
    with torch.no_grad():
        expected = hf(input_ids=ids, attention_mask=mask, position_ids=positions).logits
    actual = model.forward(ids, attention_mask=mask)
    assert actual.shape == expected.shape == (3, 13, hf.config.vocab_size)
    real = mask.bool()
    torch.testing.assert_close(actual[real], expected[real], atol=1e-4, rtol=0)


@pytest.mark.parametrize("variant", VARIANT_NAMES)
def test_unpadded_prompt_logits_match_transformers(pair, variant):
    hf, model = pair(variant)
    ids, _ = padded_batch((11,), seed=3)
    with torch.no_grad():
        expected = hf(input_ids=ids).logits
    torch.testing.assert_close(model.forward(ids), expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("variant", VARIANT_NAMES)
def test_greedy_generation_is_token_identical(pair, variant):
    hf, model = pair(variant)
    ids, mask = padded_batch((5, 9, 13), seed=1)
    with torch.no_grad():
        expected = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=24, do_sample=False)
    actual = model.generate(ids, attention_mask=mask, max_new_tokens=24)
    assert actual.shape == expected.shape
    assert torch.equal(actual[:, ids.shape[1] :], expected[:, ids.shape[1] :])


@pytest.mark.parametrize("variant", ["mixtral", "qwen2_moe"])
def test_list_prompts_are_padded_like_a_tensor_batch(pair, variant):
    _, model = pair(variant)
    ids, mask = padded_batch((4, 7), seed=2)
    rows = [row[m.bool()].tolist() for row, m in zip(ids, mask)]
    assert torch.equal(model.generate(rows, max_new_tokens=6), model.generate(ids, mask, max_new_tokens=6))


@pytest.mark.parametrize("variant", ["mixtral", "qwen3_moe"])
def test_seeded_sampling_repeats_and_seed_matters(pair, variant):
    _, model = pair(variant)
    ids, mask = padded_batch((5, 9, 13), seed=4)
    kwargs = dict(attention_mask=mask, max_new_tokens=16, do_sample=True, temperature=1.5, top_k=50, top_p=0.95)
    first = model.generate(ids, seed=7, **kwargs)
    assert torch.equal(first, model.generate(ids, seed=7, **kwargs))
    assert not torch.equal(first, model.generate(ids, seed=8, **kwargs))


def test_stream_yields_what_generate_returns(pair):
    _, model = pair("olmoe")
    ids, mask = padded_batch((3, 6), seed=5)
    steps = list(model.stream(ids, mask, max_new_tokens=10))
    out = model.generate(ids, mask, max_new_tokens=10)
    assert torch.equal(torch.stack(steps, 1), out[:, ids.shape[1] :])


@pytest.mark.parametrize("variant", ["mixtral", "qwen2_moe"])
def test_scores_match_transformers_loss(pair, variant):
    """model.score: each text's log-likelihood equals minus transformers' loss times its tokens."""
    hf, model = pair(variant)
    rows = [[5, 9, 17, 33, 60], [7, 8, 9, 10, 11, 12, 13, 14, 15]]
    scores = model.score(rows)
    for row, result in zip(rows, scores, strict=True):
        ids = torch.tensor([row])
        with torch.no_grad():
            loss = hf(input_ids=ids, labels=ids).loss  # mean NLL of tokens 2..n given their prefix
        assert len(result.logprobs) == len(row) - 1 and result.tokens == row
        assert result.total == pytest.approx(-loss.item() * (len(row) - 1), abs=1e-3)
        assert result.perplexity == pytest.approx(torch.exp(loss).item(), rel=1e-4)
