"""The golden check of one architecture, shared by tests/golden and tests/slow: a tiny random
checkpoint written by transformers, sharded with the CLI, served with its experts on a cluster,
against transformers' own greedy tokens and logits (1e-4, float32), plain and speculative."""

from __future__ import annotations

import pytest
import torch

from neuro_dask.testing.tiny_transformers import TinyModelUnavailable, padded_prompts, tiny_config

# Speculative decoding must give transformers' greedy tokens too, with every kind of draft:
# prompt lookup (short drafts), the self-draft (bfloat16 copies: some drafts rejected, so the
# cache is rolled back), and a float32 draft model (long chains kept).
SPECULATIVE_KINDS = ("prompt-lookup", "self", "draft-model")


def _reference(checkpoint, model_type: str):
    """transformers' own model of the checkpoint, with the attention the tiny config chose."""
    from transformers import AutoModelForCausalLM

    attn = tiny_config(model_type)._attn_implementation
    return AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32, attn_implementation=attn).eval()


def check_architecture(model_type: str, client, tmp_path) -> None:
    import neuro_dask as nd
    from neuro_dask.cli.main import main
    from neuro_dask.testing.tiny_transformers import write_tiny_checkpoint

    try:
        checkpoint = write_tiny_checkpoint(model_type, tmp_path / "hf", seed=1)
    except TinyModelUnavailable as exc:  # pragma: no cover - the enumeration test says which and why
        pytest.skip(str(exc))
    store = tmp_path / "sharded"
    assert main(["shard", str(checkpoint), str(store), "--quiet", "--layout", "transformers"]) == 0
    reference = _reference(checkpoint, model_type)
    ids, mask = padded_prompts(reference.config.get_text_config().vocab_size)
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)  # what transformers' generate passes
    with torch.no_grad():
        expected_logits = reference(input_ids=ids, attention_mask=mask, position_ids=positions).logits
    expected = reference.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
    draft = nd.load(store)  # a local float32 copy: a draft whose tokens are nearly all kept
    with nd.load(store, client=client) as model:
        assert type(model.hf) is type(reference)
        tokens = model.generate(ids, mask, max_new_tokens=8)
        logits = model(ids, mask)
        served = model.executor.routes.routes
        speculative = {
            kind: model.generate(ids, mask, max_new_tokens=8, speculative=kind, draft_model=draft)
            for kind in SPECULATIVE_KINDS
        }
    width = ids.shape[1]
    assert torch.equal(tokens[:, width:], expected[:, width:]), f"{model_type}: greedy tokens differ"
    for kind, got in speculative.items():
        assert torch.equal(got[:, width:], expected[:, width:]), f"{model_type}: speculative ({kind}) tokens differ"
    real = mask.bool()
    torch.testing.assert_close(logits[real], expected_logits[real], atol=1e-4, rtol=1e-4)
    assert len({w for ws in served.values() for w in ws}) >= 2  # the experts really are on the workers
