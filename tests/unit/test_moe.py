"""The MoE split: routing, grouping and combining must equal the dense definition."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from neuro_dask.model.moe import (
    ExpertWeights,
    LocalExpertExecutor,
    combine,
    group_by_expert,
    route_tokens,
    run_expert,
)


def _experts(num: int, d: int, i: int, seed: int) -> dict[tuple[int, int], ExpertWeights]:
    g = torch.Generator().manual_seed(seed)
    return {
        (0, e): ExpertWeights(
            torch.randn(i, d, generator=g), torch.randn(i, d, generator=g), torch.randn(d, i, generator=g)
        )
        for e in range(num)
    }


def _dense_reference(x, logits, experts, top_k, normalize):
    """sum over chosen experts of gate * expert(x), one token at a time."""
    probs = logits.softmax(-1)
    out = torch.zeros_like(x)
    for n in range(x.shape[0]):
        w, idx = probs[n].topk(top_k)
        if normalize:
            w = w / w.sum()
        for weight, e in zip(w, idx.tolist()):
            out[n] += weight * run_expert(x[n : n + 1], experts[(0, e)])[0]
    return out


@settings(max_examples=40, deadline=None)
@given(
    tokens=st.integers(1, 24),
    num_experts=st.integers(2, 8),
    top_k=st.integers(1, 3),
    normalize=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_grouped_dispatch_equals_dense_definition(tokens, num_experts, top_k, normalize, seed):
    top_k = min(top_k, num_experts)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, 8, generator=g)
    logits = torch.randn(tokens, num_experts, generator=g)
    experts = _experts(num_experts, 8, 6, seed)
    weights, chosen = route_tokens(logits, top_k, normalize)
    groups = group_by_expert(x, chosen)
    outputs = LocalExpertExecutor(experts).run_layer(0, groups.inputs)
    got = combine(groups, outputs, weights, x)
    torch.testing.assert_close(got, _dense_reference(x, logits, experts, top_k, normalize), atol=1e-4, rtol=1e-4)


def test_each_expert_is_called_once_with_all_of_its_tokens():
    x = torch.arange(12.0).reshape(6, 2)
    chosen = torch.tensor([[0, 2], [2, 0], [1, 2], [0, 1], [2, 1], [0, 2]])
    groups = group_by_expert(x, chosen)
    assert sorted(groups.inputs) == [0, 1, 2]
    assert groups.token_index[0].tolist() == [0, 1, 3, 5]
    assert groups.token_index[2].tolist() == [0, 1, 2, 4, 5]
    assert groups.slot_index[2].tolist() == [1, 0, 1, 0, 1]
    torch.testing.assert_close(groups.inputs[1], x[[2, 3, 4]])


def test_unused_experts_get_no_call():
    chosen = torch.tensor([[3, 1]])
    groups = group_by_expert(torch.ones(1, 4), chosen)
    assert sorted(groups.inputs) == [1, 3]


def test_router_renormalises_only_when_asked():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    raw, idx = route_tokens(logits, 2, normalize=False)
    norm, _ = route_tokens(logits, 2, normalize=True)
    assert idx.tolist() == [[0, 1]]
    torch.testing.assert_close(raw, logits.softmax(-1)[:, :2])
    torch.testing.assert_close(norm.sum(-1), torch.ones(1))


def test_combine_rejects_an_expert_output_of_the_wrong_shape():
    x = torch.ones(2, 4)
    weights, chosen = route_tokens(torch.zeros(2, 2), 1, True)
    groups = group_by_expert(x, chosen)
    bad = {e: torch.ones(rows.shape[0], 3) for e, rows in groups.inputs.items()}
    with pytest.raises(RuntimeError, match="returned shape"):
        combine(groups, bad, weights, x)
