"""GGUF route against the safetensors route: the same tiny model, sharded from a .gguf file.

F32 GGUF files (with llama.cpp's Q/K permutation applied by the writer and undone by the reader)
give bit-identical logits and greedy tokens. Q8_0 files (every matrix but the F32 router
quantized, as llama.cpp's Q8_0 does) are compared with a documented tolerance, measured on these
tiny random models over 4 batches of 4 prompts (docs/model-and-store.md, "GGUF checkpoints"):
mean |logit difference| 0.010-0.024, max 0.05-0.98 (the max comes from a token whose top-2
expert choice flips near a routing tie), teacher-forced top-1 agreement 0.94-1.0. Greedy
sequences then agree until the first flip: random tiny models have near-flat logits, so 65-70%
of 24 generated tokens agree, which is why greedy decoding is not compared token for token.
"""

from __future__ import annotations

import pytest
import torch
from tiny_models import padded_batch

import neuro_dask as nd
from neuro_dask.cli.main import main

pytest.importorskip("gguf")
from gguf_models import write_gguf  # noqa: E402

pytestmark = pytest.mark.golden
Q8_MEAN_ATOL = 0.05
Q8_MAX_ATOL = 1.5
Q8_TOP1_AGREEMENT = 0.9


@pytest.fixture(scope="module")
def from_gguf(tmp_path_factory):
    """(variant, qtype) -> nd model loaded from the GGUF file sharded through the CLI."""
    cache = {}

    def get(variant, qtype):
        if (variant, qtype) not in cache:
            root = tmp_path_factory.mktemp(f"gguf-{variant}-{qtype}")
            src = write_gguf(variant, root / "model.gguf", qtype)
            assert main(["shard", str(src), str(root / "store"), "--quiet"]) == 0
            cache[variant, qtype] = nd.load(root / "store")
        return cache[variant, qtype]

    return get


@pytest.mark.parametrize("variant", ["mixtral", "qwen2_moe"])
def test_f32_gguf_generates_exactly_like_safetensors(sharded, from_gguf, variant):
    reference = nd.load(sharded(variant))
    model = from_gguf(variant, "F32")
    ids, mask = padded_batch((5, 9, 13), seed=1)
    assert torch.equal(model.forward(ids, attention_mask=mask), reference.forward(ids, attention_mask=mask))
    expected = reference.generate(ids, attention_mask=mask, max_new_tokens=24)
    assert torch.equal(model.generate(ids, attention_mask=mask, max_new_tokens=24), expected)


@pytest.mark.parametrize("variant", ["mixtral", "qwen2_moe"])
def test_q8_0_gguf_logits_stay_close(sharded, from_gguf, variant):
    reference = nd.load(sharded(variant))
    model = from_gguf(variant, "Q8_0")
    ids, mask = padded_batch((5, 9, 13, 20), seed=2)
    real = mask.bool()
    expected = reference.forward(ids, attention_mask=mask)[real]
    actual = model.forward(ids, attention_mask=mask)[real]
    diff = (actual - expected).abs()
    assert diff.mean() < Q8_MEAN_ATOL
    assert diff.max() < Q8_MAX_ATOL
    assert (actual.argmax(-1) == expected.argmax(-1)).float().mean() >= Q8_TOP1_AGREEMENT
    assert not torch.equal(actual, expected)  # the quantization really happened
