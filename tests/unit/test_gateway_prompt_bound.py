"""The gateway's length bound on a prompt's tokens (neuro_dask/gateway/prompt_bound.py): never
above the true count, whatever the text, for each kind of tokenizer it claims to bound, and no
bound at all where one is not provable."""

from __future__ import annotations

import functools
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from neuro_dask.gateway.prompt_bound import prompt_bound

CORPUS = [
    "12+345=357",
    "hello world, hello there",
    "the quick brown fox jumps over the lazy dog",
    "naïve café — 東京 ☃ 😀",
    "\n\n  indented\tline\r\n",
] * 20


@functools.cache
def adder() -> Tokenizer:
    from neuro_dask.demo.addition import ASSET_DIR

    return Tokenizer.from_file(str(ASSET_DIR / "tokenizer.json"))


@functools.cache
def byte_level_bpe() -> Tokenizer:
    """GPT-2's family (Qwen, DeepSeek, Llama 3, gpt-oss): bytes as characters, nothing unknown."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=["<|endoftext|>"]
    )
    tok.train_from_iterator(CORPUS, trainer)
    tok.add_tokens(["<|im_start|>"])
    return tok


@functools.cache
def char_bpe(fuse_unk: bool) -> Tokenizer:
    tok = Tokenizer(models.BPE(unk_token="<unk>", fuse_unk=fuse_unk))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>"]))
    return tok


def spec(tok: Tokenizer) -> dict:
    return json.loads(tok.to_str())


PIECES = ["1", "+", "=", " ", "\n", "\r\n", "<s>", "</s>", "<pad>", "<|im_start|>", "hello", "▁", "東京", "😀", "é"]
texts = st.lists(st.one_of(st.sampled_from(PIECES), st.text(max_size=8)), max_size=40).map("".join)


@pytest.mark.parametrize(
    "build", [adder, byte_level_bpe, lambda: char_bpe(fuse_unk=False)], ids=["adder", "byte-level-bpe", "bpe-with-unk"]
)
@settings(max_examples=300, deadline=None)
@given(text=texts)
def test_the_bound_never_exceeds_the_true_count(build, text):
    tok = build()
    bound = prompt_bound(spec(tok))
    assert bound is not None
    assert bound.min_tokens(text) <= len(tok.encode(text, add_special_tokens=False).ids)


def test_the_adders_bound_refuses_long_prompts_but_not_runs_of_line_breaks():
    bound = prompt_bound(spec(adder()))
    assert bound.per_token == 5  # "<pad>", an added token, matched in text
    assert bound.min_tokens("1" * 3_000_000) == 600_000
    assert bound.min_tokens("\n" * 3_000_000) == 0  # one token per run: no proof of length
    assert len(adder().encode("\n" * 1000, add_special_tokens=False).ids) == 1


@pytest.mark.parametrize(
    "change",
    [
        lambda s: s.update(normalizer={"type": "NFC"}),  # composes: shortens
        lambda s: s.update(normalizer={"type": "Strip", "strip_left": True, "strip_right": True}),
        lambda s: s.update(normalizer={"type": "Replace", "pattern": {"String": "ab"}, "content": "c"}),
        lambda s: s.update(pre_tokenizer={"type": "Whitespace"}),  # drops whitespace
        lambda s: s.update(
            pre_tokenizer={"type": "Split", "pattern": {"String": " "}, "behavior": "Removed", "invert": False}
        ),
        lambda s: s.update(truncation={"max_length": 8}),
        lambda s: s["added_tokens"].append(
            {
                "id": 999,
                "content": "<mask>",
                "lstrip": True,
                "rstrip": False,
                "single_word": False,
                "normalized": False,
                "special": True,
            }
        ),
        lambda s: s["model"].update(fuse_unk=True),  # a run of unknown characters is one <unk>
        lambda s: s["model"].update(unk_token=None),  # unknown characters are dropped
        lambda s: s.update(model={"type": "WordPiece", "unk_token": "<unk>", "vocab": {"<unk>": 0}}),
        lambda s: s.update(model={"type": "Unigram", "unk_id": 0, "vocab": [["<unk>", 0.0]]}),
    ],
)
def test_no_bound_where_none_is_provable(change):
    s = spec(char_bpe(fuse_unk=False))
    assert prompt_bound(s) is not None
    change(s)
    assert prompt_bound(s) is None


def test_word_level_needs_one_word_per_character():
    s = spec(adder())
    s["pre_tokenizer"] = {"type": "WhitespaceSplit"}
    assert prompt_bound(s) is None
    s["pre_tokenizer"] = {"type": "Split", "pattern": {"Regex": "\\d+"}, "behavior": "Isolated", "invert": False}
    assert prompt_bound(s) is None  # a number of any length is one word, one token
