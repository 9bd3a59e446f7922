"""Bad input to a loaded model: each a specific NeuroDaskError that says what to do."""

from __future__ import annotations

import pytest
import torch

import neuro_dask as nd
from neuro_dask.errors import (
    EmptyPromptError,
    GenerationOptionError,
    PromptTooLongError,
    TokenizerMissingError,
    TokenOutOfRangeError,
)


@pytest.fixture(scope="module")
def model(sharded):
    return nd.load(sharded("mixtral"))


def test_empty_prompt(model):
    with pytest.raises(EmptyPromptError, match="prompt 1 is empty"):
        model.generate([[5, 6], []], max_new_tokens=2)


def test_token_outside_vocabulary(model):
    with pytest.raises(TokenOutOfRangeError, match=r"token id 128, outside the vocabulary \[0, 128\)"):
        model.forward(torch.tensor([[3, 128]]))


def test_prompt_longer_than_position_limit(model):
    limit = model.config.max_position_embeddings
    with pytest.raises(PromptTooLongError, match="max_position_embeddings"):
        model.forward(torch.full((1, limit + 1), 5))
    with pytest.raises(PromptTooLongError, match="max_new_tokens"):
        model.generate(torch.full((1, limit - 2), 5), max_new_tokens=3)


def test_negative_max_new_tokens(model):
    with pytest.raises(GenerationOptionError, match="max_new_tokens"):
        model.generate([[5]], max_new_tokens=-1)


def test_text_without_a_tokenizer(model):
    with pytest.raises(TokenizerMissingError, match="tokenizer.json"):
        model.generate_text(["hello"])


def test_zero_new_tokens_returns_the_prompt(model):
    out = model.generate([[5, 6, 7]], max_new_tokens=0)
    assert out.tolist() == [[5, 6, 7]]


def test_bfloat16_load_stays_close_to_float32(sharded, model):
    ids = torch.tensor([[5, 9, 22, 31, 7, 8]])
    low = nd.load(sharded("mixtral"), dtype=torch.bfloat16)
    assert low.trunk.lm_head.weight.dtype == torch.bfloat16
    torch.testing.assert_close(low.forward(ids).float(), model.forward(ids), atol=0.1, rtol=0.1)
