"""Speculative decoding's rules (model/speculation.py): what a verification pass keeps, exactly."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from neuro_dask.model.generation import SamplingOptions, next_token_probs
from neuro_dask.model.speculation import (
    DraftLength,
    DraftTree,
    PromptLookup,
    committed,
    pad_drafts,
    verify,
    verify_tree,
)

GREEDY = SamplingOptions()
SAMPLE = SamplingOptions(do_sample=True, temperature=1.0)


def _logits_preferring(*tokens: int, vocab: int = 6) -> torch.Tensor:
    """[1, len, V]: position i's argmax is tokens[i]."""
    out = torch.zeros(1, len(tokens), vocab)
    for i, t in enumerate(tokens):
        out[0, i, t] = 5.0
    return out


def test_greedy_keeps_drafts_while_they_are_the_argmax_then_corrects():
    logits = _logits_preferring(3, 1, 4, 2)  # the model would say 3, 1, 4, then 2
    v = verify(logits, torch.tensor([[3, 1, 5]]), GREEDY, None)
    assert v.accepted.tolist() == [2] and v.tokens[0, :3].tolist() == [3, 1, 4]


def test_greedy_with_every_draft_kept_adds_the_bonus_token():
    v = verify(_logits_preferring(3, 1, 4, 2), torch.tensor([[3, 1, 4]]), GREEDY, None)
    assert v.accepted.tolist() == [3] and v.tokens[0].tolist() == [3, 1, 4, 2]


def test_no_drafts_is_a_plain_step():
    v = verify(_logits_preferring(5), torch.empty(1, 0, dtype=torch.long), GREEDY, None)
    assert v.accepted.tolist() == [0] and v.tokens[0].tolist() == [5]


def test_a_batch_commits_the_fewest_drafts_any_unfinished_row_kept():
    logits = torch.cat([_logits_preferring(1, 2, 3), _logits_preferring(1, 0, 0)])
    v = verify(logits, torch.tensor([[1, 2], [1, 2]]), GREEDY, None)
    assert v.accepted.tolist() == [2, 1]
    assert committed(v, torch.tensor([True, True])) == 1
    assert committed(v, torch.tensor([True, False])) == 2  # a finished row holds nobody back
    # each row's token after the committed prefix is its own: row 0 its kept draft, row 1 its correction
    assert v.tokens[:, 1].tolist() == [2, 0]


def test_drafts_of_the_wrong_shape_are_refused():
    with pytest.raises(ValueError, match="drafts"):
        verify(_logits_preferring(1, 2), torch.tensor([[1, 2]]), GREEDY, None)


def _first_token_law(p: torch.Tensor, draft: int) -> torch.Tensor:
    """P(the token a pass yields at position 0 = x) under the rule, computed exactly: keep the
    draft with p(d), else draw from p without d, renormalised."""
    keep = float(p[draft])
    residual = p.clone()
    residual[draft] = 0
    residual = residual / residual.sum() if residual.sum() > 0 else residual
    law = (1 - keep) * residual
    law[draft] += keep
    return law


@pytest.mark.parametrize("draft", [0, 2, 5])
def test_the_sampling_rule_yields_the_models_own_distribution_exactly(draft):
    p = torch.tensor([0.05, 0.4, 0.2, 0.1, 0.25, 0.0])
    torch.testing.assert_close(_first_token_law(p, draft), p)


def _chi_square(a: list[int], b: list[int]) -> tuple[float, int]:
    """Two-sample chi-square statistic over the cells either sample hit, and its degrees of freedom."""
    cells = sorted(set(a) | set(b))
    na, nb = len(a), len(b)
    ca = {c: 0 for c in cells}
    cb = dict(ca)
    for x in a:
        ca[x] += 1
    for x in b:
        cb[x] += 1
    stat = 0.0
    for c in cells:
        total = ca[c] + cb[c]
        ea, eb = total * na / (na + nb), total * nb / (na + nb)
        stat += (ca[c] - ea) ** 2 / ea + (cb[c] - eb) ** 2 / eb
    return stat, len(cells) - 1


def _chi_square_critical(df: int, alpha: float) -> float:
    """Wilson-Hilferty approximation of the chi-square quantile (accurate to ~1% for df >= 3)."""
    z = {0.001: 3.0902, 0.01: 2.3263}[alpha]
    h = 2 / (9 * df)
    return df * (1 - h + z * math.sqrt(h)) ** 3


def test_speculative_sampling_matches_plain_sampling_over_sequences():
    """A bigram language model (logits from the last token), sampled plainly and speculatively
    with a draft from a different bigram model: the joint law of 3 tokens must agree. Fixed
    seeds; two-sample chi-square at significance 0.001 over the 5^3 = 125 sequences."""
    vocab, n, length = 5, 12_000, 3
    g = torch.Generator().manual_seed(7)
    model = torch.randn(vocab, vocab, generator=g) * 1.5
    draft_model = torch.randn(vocab, vocab, generator=g) * 1.5  # deliberately a different model
    opts = SamplingOptions(do_sample=True, temperature=0.9, top_k=4)

    def plain(gen: torch.Generator) -> tuple[int, ...]:
        last, out = 0, []
        for _ in range(length):
            last = int(torch.multinomial(next_token_probs(model[last][None], opts)[0], 1, generator=gen))
            out.append(last)
        return tuple(out)

    def speculative(gen: torch.Generator) -> tuple[int, ...]:
        last, out = 0, []
        while len(out) < length:
            k = length - len(out)
            drafts, prev = [], last
            for _ in range(k):  # the draft model's greedy chain
                prev = int(draft_model[prev].argmax())
                drafts.append(prev)
            inputs = [last, *drafts]
            logits = torch.stack([model[t] for t in inputs])[None]
            v = verify(logits, torch.tensor([drafts]), opts, gen)
            m = int(v.accepted[0])
            out.extend(v.tokens[0, : m + 1].tolist())
            last = out[-1]
        return tuple(out[:length])

    gp, gs = torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)
    a = [plain(gp) for _ in range(n)]
    b = [speculative(gs) for _ in range(n)]
    stat, df = _chi_square(a, b)
    assert stat < _chi_square_critical(df, 0.001), (stat, df)


def test_the_chi_square_check_can_fail():
    """The same check tells two different laws apart (else the test above could not fail)."""
    g = torch.Generator().manual_seed(0)
    a = [int(torch.multinomial(torch.tensor([0.5, 0.3, 0.2]), 1, generator=g)) for _ in range(3000)]
    b = [int(torch.multinomial(torch.tensor([0.4, 0.35, 0.25]), 1, generator=g)) for _ in range(3000)]
    stat, df = _chi_square(a, b)
    assert stat > _chi_square_critical(max(df, 3), 0.001)


def test_pad_drafts_fills_short_rows_and_cuts_long_ones():
    out = pad_drafts([[4, 5, 6], [], [7]], k=2, filler=0)
    assert out.tolist() == [[4, 5], [0, 0], [7, 0]]
    assert pad_drafts([[], []], k=4).shape == (2, 0)


@pytest.mark.parametrize(
    "context, k, expected",
    [
        ([1, 2, 3, 9, 1, 2, 3], 3, [9, 1, 2]),  # the 3-gram [1, 2, 3] was followed by 9
        ([5, 1, 2, 7, 8, 1, 2], 2, [7, 8]),  # the 2-gram [1, 2]
        ([4, 6, 4], 2, [6, 4]),  # the 1-gram [4]
        ([1, 2, 3, 4], 3, []),  # nothing repeats: no draft
        ([1, 2, 1, 2, 1, 3, 1, 2], 2, [1, 3]),  # the latest earlier occurrence wins
    ],
)
def test_prompt_lookup_drafts_what_followed_the_context_tail_before(context, k, expected):
    assert PromptLookup(max_ngram=3).propose(context, k) == expected


def test_draft_length_drafts_longer_when_drafts_are_kept_and_a_pass_costs_a_round_trip():
    lengths = DraftLength(max_k=8)
    for _ in range(40):
        k = lengths.choose()
        lengths.observe(k, k, 0.100 + 0.001 * k)  # network-bound: each token more costs 1% of a pass
    assert lengths.acceptance > 0.95 and lengths.choose() == 8


def test_draft_length_turns_speculation_off_when_drafts_are_rejected():
    lengths = DraftLength(max_k=8, explore_every=1_000)
    for _ in range(40):
        k = lengths.choose()
        lengths.observe(k, 0, 0.010 + 0.004 * k)  # compute-bound, and nothing kept
    assert lengths.acceptance < 0.5 and lengths.choose() == 0  # (no drafts: no more evidence)


def test_draft_length_tries_again_now_and_then():
    lengths = DraftLength(max_k=4, explore_every=5)
    for _ in range(20):
        lengths.observe(2, 0, 0.01)
    choices = [lengths.choose() for _ in range(10)]
    assert 0 in choices and 1 in choices


def test_draft_length_respects_the_limit():
    lengths = DraftLength(max_k=8)
    assert lengths.choose(limit=3) <= 3 and lengths.choose(limit=0) == 0


@pytest.mark.parametrize("a, k", list(itertools.product([0.0, 0.5, 0.9], [0, 1, 4])))
def test_expected_tokens_is_the_geometric_sum(a, k):
    lengths = DraftLength(prior_acceptance=a)
    assert lengths.expected_tokens(k) == pytest.approx(sum(a**i for i in range(k + 1)))


# ---- trees ------------------------------------------------------------------------------------------


def test_a_draft_tree_knows_its_depths_and_who_sees_whom():
    # root -> 7 -> 8, root -> 9 (a sibling of 7)
    tree = DraftTree((7, 9, 8), (0, 0, 1))
    assert tree.depths() == [0, 1, 1, 2]
    assert tree.children(0) == [1, 2] and tree.children(1) == [3]
    assert tree.visible().tolist() == [
        [True, False, False, False],
        [True, True, False, False],
        [True, False, True, False],
        [True, True, False, True],
    ]


def test_a_trie_merges_shared_prefixes():
    tree = DraftTree.from_paths([[1, 2, 3], [1, 2, 4], [5]])
    assert tree.tokens == (1, 2, 3, 4, 5) and tree.parents == (0, 1, 2, 2, 0)
    assert DraftTree.chain([4, 4, 4]).parents == (0, 1, 2)


@pytest.mark.parametrize("tokens, parents", [((1, 2), (0, 2)), ((1, 1), (0, 0)), ((1,), (0, 0))])
def test_a_malformed_tree_is_refused(tokens, parents):
    with pytest.raises(ValueError):
        DraftTree(tokens, parents)


def test_greedy_tree_verification_follows_the_argmax_through_a_second_choice():
    tree = DraftTree((7, 9, 8, 3), (0, 0, 1, 2))  # root -> 7 -> 8; root -> 9 -> 3
    logits = torch.zeros(5, 10)
    logits[0, 9] = 5  # after the root the model says 9: the sibling
    logits[2, 3] = 5  # after 9, it says 3
    logits[4, 6] = 5  # after 3, 6: the bonus
    path, tokens = verify_tree(logits, tree, GREEDY, None)
    assert path == [2, 4] and tokens == [9, 3, 6]
    logits[0] = 0
    logits[0, 1] = 5  # a token no node holds: only the correction
    assert verify_tree(logits, tree, GREEDY, None) == ([], [1])


def _children_law(p: torch.Tensor, children: list[int]) -> torch.Tensor:
    """Exactly: P(the pass's first token = x) when the root's children are tried in order."""
    law = torch.zeros_like(p)
    residual, reach = p.clone(), 1.0
    for d in children:
        keep = float(residual[d] / residual.sum())
        law[d] += reach * keep
        reach *= 1 - keep
        residual[d] = 0
    return law + reach * residual / residual.sum()


@pytest.mark.parametrize("children", [[1, 4], [4, 1, 0], [5, 2]])
def test_trying_children_in_turn_yields_the_models_distribution_exactly(children):
    p = torch.tensor([0.05, 0.4, 0.2, 0.1, 0.25, 0.0])
    torch.testing.assert_close(_children_law(p, children), p)


def test_speculative_sampling_over_trees_matches_plain_sampling():
    """As the chain test above, with the draft's first and second choices at every depth."""
    vocab, n, length = 5, 10_000, 3
    g = torch.Generator().manual_seed(11)
    model = torch.randn(vocab, vocab, generator=g) * 1.5
    draft_model = torch.randn(vocab, vocab, generator=g) * 1.5
    opts = SamplingOptions(do_sample=True, temperature=1.1)

    def plain(gen):
        last, out = 0, []
        for _ in range(length):
            last = int(torch.multinomial(next_token_probs(model[last][None], opts)[0], 1, generator=gen))
            out.append(last)
        return tuple(out)

    def speculative(gen):
        last, out = 0, []
        while len(out) < length:
            tokens, parents, main, prev = [], [], 0, last
            for _ in range(length - len(out)):
                first, second = draft_model[prev].topk(2).indices.tolist()
                tokens += [first, second]
                parents += [main, main]
                main, prev = len(tokens) - 1, first
            tree = DraftTree(tuple(tokens), tuple(parents))
            inputs = [last, *tokens]
            # a node's logits: the bigram model after that node's own token
            path, new = verify_tree(torch.stack([model[t] for t in inputs]), tree, opts, gen)
            out.extend(new)
            last = out[-1]
        return tuple(out[:length])

    gp, gs = torch.Generator().manual_seed(3), torch.Generator().manual_seed(4)
    stat, df = _chi_square([plain(gp) for _ in range(n)], [speculative(gs) for _ in range(n)])
    assert stat < _chi_square_critical(df, 0.001), (stat, df)


def test_prompt_lookup_offers_several_continuations_for_a_tree():
    context = [1, 2, 3, 1, 2, 4, 1, 2]
    assert PromptLookup().propose_many(context, 2, width=3) == [[4, 1], [3, 1]]
    assert PromptLookup().propose_many([1, 2, 3], 2, width=2) == []


def test_draft_length_adds_second_choices_when_a_pass_is_network_bound():
    lengths = DraftLength(max_k=6, prior_acceptance=0.5, prior_sibling=0.5)
    lengths.passes = [(k, 0.100 + 0.0005 * k) for k in (1, 2, 4, 8, 12)]  # a 100 ms pass, nodes nearly free
    depth, width = lengths.choose_shape()
    assert width == 2 and depth >= 3
    lengths.passes = [(k, 0.010 + 0.010 * k) for k in (1, 2, 4, 8, 12)]  # compute-bound: a node costs a pass
    assert lengths.choose_shape()[1] == 1
