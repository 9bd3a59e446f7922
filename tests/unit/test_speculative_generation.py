"""Speculative generation on a model (model/speculative.py): the same output as plain decoding,
fewer passes over the layers, the cache rolled back exactly, the hold sized for the drafts."""

from __future__ import annotations

import pytest
import torch
from doubles import RoundTripExecutor

import neuro_dask as nd
from neuro_dask.model.generation import positions_from_mask
from neuro_dask.model.model import SPECULATIVE_FEED
from neuro_dask.model.moe import NoRequests
from neuro_dask.model.speculation import DraftTree
from neuro_dask.model.speculative import ModelDraft, PromptLookupDrafter, SpeculationError

ADDER = "neuro_dask/assets/adder"
PROMPTS = ["12+345=", "999+1=", "7+8=", "450+450="]


def _remote_like(seconds: float = 0.002):
    """The adder with a wait per layer call: over a network, where drafting pays (a model whose
    experts run in process starts plain and drafts only once it measures that it pays). Tests
    whose assertions need the controller to draft long use 20 ms: a pass then costs far more
    than a drafted token even on a machine busy with other work."""
    model = nd.load(ADDER)
    model.executor = RoundTripExecutor(model.executor, seconds)
    return model


@pytest.fixture(scope="module")
def adder():
    return _remote_like()


@pytest.fixture(scope="module")
def draft():
    return nd.load(ADDER)


def _plain(model, ids, max_new_tokens=10, **kw):
    return model.generate(ids, max_new_tokens=max_new_tokens, speculative=None, **kw)


@pytest.mark.parametrize("kind", ["prompt-lookup", "self", "draft-model"])
def test_greedy_speculative_generation_is_plain_greedy_token_for_token(adder, draft, kind):
    ids = adder.tokenizer.encode_batch(PROMPTS)
    expected = _plain(adder, ids)
    got = adder.generate(ids, max_new_tokens=10, speculative=kind, draft_model=draft if kind == "draft-model" else None)
    assert torch.equal(got, expected)
    one = adder.generate(ids[:1], max_new_tokens=10, speculative=kind, draft_model=draft)
    assert torch.equal(one, _plain(adder, ids[:1]))


def test_a_good_draft_yields_many_tokens_per_pass_and_counts_them(draft):
    model = _remote_like(0.02)
    counting = model.executor
    ids = model.tokenizer.encode_batch(["123+456="])
    plain = _plain(model, ids)
    plain_calls = counting.calls
    got = model.generate(ids, max_new_tokens=10, speculative="draft-model", draft_model=draft)
    assert torch.equal(got, plain)
    stats = model.stats()["speculation"]
    assert stats["tokens_per_pass"] >= 3 and stats["acceptance"] > 0.9, stats
    assert counting.calls - plain_calls < plain_calls  # fewer layer calls than plain decoding made


def test_stream_and_text_streams_speculate_too(adder, draft):
    ids = adder.tokenizer.encode_batch(PROMPTS[:2])
    plain = [t.tolist() for t in adder.stream(ids, max_new_tokens=8, speculative=None)]
    spec = [t.tolist() for t in adder.stream(ids, max_new_tokens=8, speculative="draft-model", draft_model=draft)]
    assert spec == plain
    text = "".join(s.text for s in adder.stream("12+345=", max_new_tokens=8, speculative="self"))
    assert text == "357"


def test_map_passes_speculation_through(adder):
    plain = adder.map(PROMPTS, max_new_tokens=8, progress=False)
    spec = adder.map(PROMPTS, max_new_tokens=8, progress=False, speculative="prompt-lookup")
    assert spec == plain == ["357", "1000", "15", "900"]


def test_max_new_tokens_is_exact_whatever_a_pass_yields(adder, draft):
    ids = adder.tokenizer.encode_batch(["123+456="])
    for n in (1, 2, 3, 5):
        got = adder.generate(ids, max_new_tokens=n, speculative="draft-model", draft_model=draft)
        assert torch.equal(got, _plain(adder, ids, n))  # n tokens, or fewer where the answer ended


def test_seeded_speculative_sampling_is_repeatable_and_well_formed(adder, draft):
    ids = adder.tokenizer.encode_batch(PROMPTS)
    kw = dict(max_new_tokens=8, do_sample=True, temperature=1.3, seed=5, speculative="draft-model", draft_model=draft)
    a, b = adder.generate(ids, **kw), adder.generate(ids, **kw)
    assert torch.equal(a, b) and a.shape[0] == 4 and a.shape[1] <= max(map(len, ids)) + 8
    assert bool(((a >= 0) & (a < adder.config.vocab_size)).all())


def test_rollback_leaves_the_cache_as_a_plain_run_would(adder):
    """Verify [t, d1, d2, d3] in one pass, keep t and d1: the cache equals decoding t, d1 one by one."""
    model = adder
    prompt = torch.tensor([model.tokenizer.encode("12+345=")])
    mask = torch.ones_like(prompt, dtype=torch.bool)
    t = prompt.shape[1]
    pos = positions_from_mask(mask)
    key_valid = torch.zeros(1, t + 8, dtype=torch.bool)
    key_valid[:, :t] = True
    steps = torch.tensor([[3, 5, 7, 9]])
    routed = torch.ones(1, 1, dtype=torch.bool)
    with torch.inference_mode():
        _, plain = model._prefill(prompt, pos, key_valid[:, :t], mask, t + 8)
        for i in range(2):
            key_valid[:, t + i] = True
            model._decode(steps[:, i : i + 1], pos[:, -1:] + 1 + i, key_valid[:, : t + i + 1], plain, routed)
        _, spec = model._prefill(prompt, pos, key_valid[:, :t], mask, t + 8)
        key_valid[:, t : t + 4] = True
        model._verify(steps, pos[:, -1:] + 1 + torch.arange(4), key_valid[:, : t + 4], spec, routed.expand(1, 4))
        model._rollback(spec, t + 2)
    assert spec.length == plain.length == t + 2
    for layer in range(len(plain.keys)):
        torch.testing.assert_close(spec.keys[layer][:, :, : t + 2], plain.keys[layer][:, :, : t + 2])
        torch.testing.assert_close(spec.values[layer][:, :, : t + 2], plain.values[layer][:, :, : t + 2])


class RecordingRequests(NoRequests):
    def __init__(self):
        self.holds = []

    def begin(self, expert_tokens: int) -> None:
        self.holds.append(expert_tokens)


def test_a_model_in_process_starts_plain_and_stays_exact():
    model = nd.load(ADDER)
    ids = model.tokenizer.encode_batch(PROMPTS)
    assert torch.equal(model.generate(ids, max_new_tokens=10, speculative="self"), _plain(model, ids))
    stats = model.stats()["speculation"]
    assert stats["drafted"] == 0, stats  # a drafted token would cost about what a pass costs here


def test_the_request_holds_for_every_position_a_speculative_generation_may_send():
    model = nd.load(ADDER)
    requests = RecordingRequests()
    model.use_requests(requests)
    ids = model.tokenizer.encode_batch(["12+345="])
    model.generate(ids, max_new_tokens=6, speculative=None)
    model.generate(ids, max_new_tokens=6, speculative="prompt-lookup")
    per_token = model.config.num_hidden_layers * model.config.num_experts_per_tok * 2
    t = len(ids[0])
    assert requests.holds == [(t + 6) * per_token, (t + 6 * SPECULATIVE_FEED) * per_token]


def test_bad_speculation_choices_are_refused_before_any_work(adder):
    with pytest.raises(SpeculationError, match="prompt-lookup"):
        adder.generate([[1, 2]], speculative="oracle")
    with pytest.raises(SpeculationError, match="draft_model="):
        adder.generate([[1, 2]], speculative="draft-model")

    class Other:
        class config:
            vocab_size = 7

    with pytest.raises(SpeculationError, match="vocabulary"):
        adder.generate([[1, 2]], speculative="draft-model", draft_model=Other())


def test_a_drafter_object_may_be_passed_directly(adder, draft):
    ids = adder.tokenizer.encode_batch(PROMPTS)
    for drafter in (PromptLookupDrafter(), ModelDraft(draft, max_k=2)):
        assert torch.equal(adder.generate(ids, max_new_tokens=8, speculative=drafter), _plain(adder, ids, 8))


def test_the_config_turns_speculation_on(adder):
    import dask

    ids = adder.tokenizer.encode_batch(PROMPTS)
    before = adder.speculation.snapshot()["passes"]
    with dask.config.set({"neuro.client.speculative": "prompt-lookup"}):
        got = adder.generate(ids, max_new_tokens=10)
    assert torch.equal(got, _plain(adder, ids)) and adder.speculation.snapshot()["passes"] > before


def test_a_kept_tree_path_leaves_the_cache_as_a_plain_run_would(adder):
    """Verify the tree root -> [3 -> 5, 9 -> 7] in one pass and keep root, 9, 7: the cache must
    equal decoding 9 and 7 one by one (the kept slots moved next to the root's)."""
    model = adder
    prompt = torch.tensor([model.tokenizer.encode("12+345=")])
    mask = torch.ones_like(prompt, dtype=torch.bool)
    t = prompt.shape[1]
    pos = positions_from_mask(mask)
    root = 4
    key_valid = torch.zeros(1, t + 8, dtype=torch.bool)
    key_valid[:, :t] = True
    one = torch.ones(1, 1, dtype=torch.bool)
    with torch.inference_mode():
        _, plain = model._prefill(prompt, pos, key_valid[:, :t], mask, t + 8)
        for i, tok in enumerate([root, 9, 7]):
            key_valid[:, t + i] = True
            model._decode(torch.tensor([[tok]]), pos[:, -1:] + 1 + i, key_valid[:, : t + i + 1], plain, one)
        tree = DraftTree((3, 9, 5, 7), (0, 0, 1, 2))
        _, spec = model._prefill(prompt, pos, key_valid[:, :t], mask, t + 8)
        key_valid[:, t : t + 5] = True
        ids = torch.tensor([[root, *tree.tokens]])
        positions = pos[:, -1:] + 1 + torch.tensor([tree.depths()])
        routed = torch.ones(1, 5, dtype=torch.bool)
        logits = model._verify_tree(ids, positions, key_valid[:, : t + 5], spec, routed, tree.visible())
        model._keep(spec, t + 1, [t + 2, t + 4])
    assert spec.length == plain.length == t + 3
    for layer in range(len(plain.keys)):
        torch.testing.assert_close(spec.keys[layer][:, :, : t + 3], plain.keys[layer][:, :, : t + 3])
        torch.testing.assert_close(spec.values[layer][:, :, : t + 3], plain.values[layer][:, :, : t + 3])
    # and the logits after the kept leaf are those a plain run computes there
    with torch.inference_mode():
        key_valid[:, t + 3] = True
        after = model._decode(torch.tensor([[2]]), pos[:, -1:] + 4, key_valid[:, : t + 4], plain, one)
    assert logits.shape == (1, 5, model.config.vocab_size) and after.shape == (1, model.config.vocab_size)


class TreeDrafter:
    """Always a tree: the draft model's chain, and beside each token a wrong second choice."""

    name = "forced-tree"

    def __init__(self, draft):
        self.inner = ModelDraft(draft)

    def start(self, rows, capacity):
        session = self.inner.start(rows, capacity)
        return ForcedTree(session)


class ForcedTree:
    def __init__(self, session):
        self.session = session
        self.trees = 0

    def propose(self, k):
        return self.session.propose(k)

    def propose_tree(self, k, width):
        self.trees += 1
        return self.session.propose_tree(max(k, 2), 2)

    def commit(self, tokens):
        self.session.commit(tokens)


def test_tree_passes_give_plain_greedy_and_sampled_output(draft):
    model = _remote_like(0.02)
    drafter = TreeDrafter(draft)
    for prompt in PROMPTS:
        ids = [model.tokenizer.encode(prompt)]
        assert torch.equal(model.generate(ids, max_new_tokens=10, speculative=drafter), _plain(model, ids))
    stats = model.stats()["speculation"]
    assert stats["passes"] >= len(PROMPTS) and stats["drafted"] >= 4 * stats["passes"] - 4  # trees of 2 x depth
    kw = dict(max_new_tokens=8, do_sample=True, temperature=1.5, seed=3)
    a = model.generate([model.tokenizer.encode("5+5=")], speculative=drafter, **kw)
    assert torch.equal(a, model.generate([model.tokenizer.encode("5+5=")], speculative=drafter, **kw))


def test_a_self_draft_copies_the_experts_the_model_used_most_first():
    from neuro_dask.client.self_draft import PartialExpertExecutor, self_draft

    model = nd.load(ADDER)
    model.generate(model.tokenizer.encode_batch(PROMPTS), max_new_tokens=6, speculative=None)
    assert sum(model.expert_load.values()) > 0
    hottest = sorted(model.expert_load, key=lambda k: (-model.expert_load[k], k))[:3]
    one = 3 * model.config.hidden_size * model.config.moe_intermediate_size * 4  # an expert in float32
    draft = self_draft(model, memory_budget=3 * one, dtype=torch.float32).draft
    assert isinstance(draft.executor, PartialExpertExecutor)
    assert sorted(draft.executor.weights) == sorted(hottest)
    ids = model.tokenizer.encode_batch(PROMPTS)
    # a draft missing most experts drafts badly, and the output is still plain decoding's
    assert torch.equal(model.generate(ids, max_new_tokens=8, speculative=ModelDraft(draft)), _plain(model, ids, 8))
