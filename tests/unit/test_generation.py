from __future__ import annotations

import pytest
import torch

from neuro_dask.errors import (
    EmptyPromptError,
    GenerationOptionError,
    InputError,
    PromptTooLongError,
    TokenOutOfRangeError,
)
from neuro_dask.model.generation import (
    SamplingOptions,
    check_length,
    make_generator,
    positions_from_mask,
    prepare_batch,
    select_next,
)
from neuro_dask.model.layers import attention_mask


def test_ragged_lists_are_left_padded_with_a_mask():
    batch = prepare_batch([[5, 6, 7], [8]], None, pad_id=0, vocab_size=10)
    assert batch.ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert batch.mask.tolist() == [[True, True, True], [False, False, True]]


def test_positions_count_real_tokens_only():
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]], dtype=torch.bool)
    assert positions_from_mask(mask).tolist() == [[1, 1, 0, 1], [0, 1, 2, 3]]  # pads at 1, as generate does


@pytest.mark.parametrize(
    "prompts, error, index",
    [
        ([[1, 2], []], EmptyPromptError, 1),
        ([[1, 2, 99]], TokenOutOfRangeError, 0),
        ([[3], [-1]], TokenOutOfRangeError, 1),
    ],
)
def test_bad_prompts_name_the_prompt(prompts, error, index):
    with pytest.raises(error) as err:
        prepare_batch(prompts, None, pad_id=0, vocab_size=10)
    assert err.value.index == index
    assert f"prompt {index}" in str(err.value)


def test_fully_masked_tensor_row_is_an_empty_prompt():
    ids = torch.tensor([[1, 2], [3, 4]])
    mask = torch.tensor([[1, 1], [0, 0]])
    with pytest.raises(EmptyPromptError):
        prepare_batch(ids, mask, 0, 10)


def test_mask_shape_and_dtype_are_checked():
    with pytest.raises(InputError, match="attention_mask shape"):
        prepare_batch(torch.ones(2, 3, dtype=torch.long), torch.ones(2, 2), 0, 10)
    with pytest.raises(InputError, match="integer token ids"):
        prepare_batch(torch.ones(2, 3), None, 0, 10)


def test_length_limit_covers_prompt_and_new_tokens():
    mask = torch.ones(1, 8, dtype=torch.bool)
    check_length(mask, 8, 16)
    with pytest.raises(PromptTooLongError, match="max_new_tokens"):
        check_length(mask, 9, 16)
    with pytest.raises(PromptTooLongError, match="needs 8 positions"):
        check_length(mask, 0, 7)


@pytest.mark.parametrize("opts", [dict(temperature=0.0), dict(top_k=0), dict(top_p=0.0), dict(top_p=1.5)])
def test_bad_sampling_options_are_refused(opts):
    with pytest.raises(GenerationOptionError):
        SamplingOptions(do_sample=True, **opts)


def test_greedy_is_argmax():
    logits = torch.tensor([[0.1, 3.0, 0.2], [5.0, 1.0, 0.0]])
    assert select_next(logits, SamplingOptions(), None).tolist() == [1, 0]


def test_top_k_one_and_tiny_top_p_are_greedy():
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0))
    greedy = logits.argmax(-1)
    for opts in (SamplingOptions(True, top_k=1), SamplingOptions(True, top_p=1e-6)):
        assert torch.equal(select_next(logits, opts, make_generator(3)), greedy)


def test_top_k_and_top_p_never_pick_outside_their_set():
    logits = torch.tensor([[4.0, 3.0, 2.0, -5.0, -6.0]]).repeat(200, 1)
    picks = select_next(logits, SamplingOptions(True, top_k=2), make_generator(1))
    assert set(picks.tolist()) <= {0, 1}
    picks = select_next(logits, SamplingOptions(True, top_p=0.7), make_generator(1))
    assert set(picks.tolist()) <= {0, 1}


def test_same_seed_same_samples():
    logits = torch.randn(8, 30, generator=torch.Generator().manual_seed(0))
    opts = SamplingOptions(True, temperature=2.0)
    assert torch.equal(select_next(logits, opts, make_generator(5)), select_next(logits, opts, make_generator(5)))


def test_attention_mask_is_causal_hides_pads_and_never_empties_a_row():
    key_valid = torch.tensor([[False, True, True]])
    m = attention_mask(key_valid, 0, 3, None)[0, 0]
    assert m.tolist() == [[True, False, False], [False, True, False], [False, True, True]]


def test_sliding_window_limits_how_far_back_a_query_sees():
    m = attention_mask(torch.ones(1, 5, dtype=torch.bool), 0, 5, 2)[0, 0]
    assert m[4].tolist() == [False, False, False, True, True]


def test_streaming_a_prompt_string_yields_the_answer_as_text_pieces():
    import neuro_dask as nd
    from neuro_dask.demo.addition import ASSET_DIR

    model = nd.load(ASSET_DIR)
    steps = list(model.stream("123+456=", max_new_tokens=8))
    assert all(isinstance(s.token, int) and isinstance(s.text, str) for s in steps)
    assert "".join(s.text for s in steps) == model.generate_text(["123+456="], max_new_tokens=8)[0] == "579"
