"""The bundled demo model shows correctness by itself: it adds numbers it never saw."""

from __future__ import annotations

import random

import pytest

import neuro_dask as nd
from neuro_dask.demo.addition import ASSET_DIR, Problem, exact_match, is_held_out, sample_problems


@pytest.fixture(scope="module")
def adder():
    return nd.load(ASSET_DIR)


def test_held_out_split_is_disjoint_and_covers_every_length():
    rng = random.Random(123)
    held = sample_problems(300, rng, held_out=True)
    train = sample_problems(300, rng, held_out=False)
    assert all(is_held_out(p.a, p.b) for p in held)
    assert not any(is_held_out(p.a, p.b) for p in train)
    assert {len(str(p.a)) for p in held} == {1, 2, 3}
    assert {p.answer[-1] for p in held} == set("0123456789")  # no arithmetic structure in the split
    assert 0.01 < sum(is_held_out(a, b) for a in range(200) for b in range(200)) / 200**2 < 0.03


def test_bundled_model_is_a_small_mixtral_with_a_tokenizer(adder):
    assert adder.config.model_type == "mixtral"
    assert adder.config.num_experts >= 4 and adder.config.num_experts_per_tok == 2
    assert adder.tokenizer.decode(adder.tokenizer.encode("12+34=")) == "12+34="
    total = sum(p.stat().st_size for p in ASSET_DIR.rglob("*") if p.is_file())
    assert total < 16 * 2**20


def test_exact_match_accuracy_on_held_out_problems(adder):
    # Seed 2024 is not the trainer's evaluation seed: these are unseen problems, unseen checks.
    problems = sample_problems(1000, random.Random(2024), held_out=True)
    answers = [
        adder.generate_text([p.prompt for p in problems[i : i + 250]], max_new_tokens=5)
        for i in range(0, len(problems), 250)
    ]
    accuracy = exact_match([a for chunk in answers for a in chunk], problems)
    assert accuracy >= 0.95, f"held-out exact match {accuracy:.3f}"


def test_a_prompt_by_hand(adder):
    assert adder.generate_text(["123+456="], max_new_tokens=5) == [Problem(123, 456).answer]
