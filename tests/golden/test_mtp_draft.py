"""Golden: a checkpoint's multi-token-prediction layer (DeepSeek-V3's num_nextn_predict_layers) as a draft.

The tiny checkpoints are laid out as DeepSeek-V3 and GLM-4.5 publish theirs: N decoder layers,
then `model.layers.{N}` with its enorm, hnorm, eh_proj and shared head, which transformers
itself never loads (neuro_dask/testing/tiny_transformers.py: write_tiny_mtp_checkpoint). The
sharder keeps the layer apart from what workers serve; the draft must give transformers' own
greedy tokens over a cluster, and its proposals must be what the layer computes from scratch
(the main model's states paired with the next tokens, its own states for the chain).
"""

from __future__ import annotations

import json
import logging

import pytest
import torch
from safetensors.torch import save_file

import neuro_dask as nd
from neuro_dask.cli.main import main
from neuro_dask.client.mtp_draft import mtp_draft
from neuro_dask.errors import ConfigError, TensorShapeError
from neuro_dask.model.hf_trunk import expert_calls
from neuro_dask.model.speculative import SpeculationError
from neuro_dask.store.manifest import ROLE_MTP_EXPERT, Manifest
from neuro_dask.store.safetensors_io import read_tensors, sha256_file
from neuro_dask.testing.tiny_transformers import padded_prompts, tiny_config, write_tiny_mtp_checkpoint

pytestmark = pytest.mark.timeout(600)

MTP_TYPES = ("deepseek_v3", "glm4_moe")


def _sharded(model_type: str, root, seed: int = 1):
    checkpoint = write_tiny_mtp_checkpoint(model_type, root / "hf", seed=seed)
    store = root / "sharded"
    assert main(["shard", str(checkpoint), str(store), "--quiet", "--layout", "transformers"]) == 0
    return checkpoint, store


@pytest.fixture(scope="module")
def deepseek(tmp_path_factory):
    return _sharded("deepseek_v3", tmp_path_factory.mktemp("mtp-deepseek"))


@pytest.fixture(scope="module")
def cluster_client(tmp_path_factory):
    from cluster_helpers import neuro_cluster

    with neuro_cluster(2, tmp_path=tmp_path_factory.mktemp("mtp-cluster")) as (_, client):
        yield client


# ---- the store ------------------------------------------------------------------------------------


def test_the_sharder_keeps_the_layer_apart_from_what_workers_serve(tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        checkpoint, store = _sharded("deepseek_v3", tmp_path)
    assert "not used" not in caplog.text  # the layer's tensors are all placed somewhere
    manifest = Manifest.read(store)
    n = manifest.config["num_hidden_layers"]
    assert manifest.mtp is not None
    assert sorted(a.expert for a in manifest.mtp_experts) == list(range(manifest.config["n_routed_experts"]))
    assert {a.layer for a in manifest.mtp_experts} == {n}
    assert all(a.layer < n for a in manifest.experts)  # the workers' experts are the model's only
    assert n not in manifest.model_config.moe_layers
    names = set(read_tensors(store / manifest.mtp.path))
    assert {"0.enorm.weight", "0.hnorm.weight", "0.eh_proj.weight", "0.shared_head.norm.weight"} <= names
    assert "0.self_attn.q_a_proj.weight" in names and "0.mlp.gate.weight" in names
    assert not any("embed_tokens" in k or "shared_head.head" in k for k in names)  # the trunk's own


def test_a_checkpoint_that_declares_the_layer_but_lacks_it_shards_without_it(tmp_path):
    from neuro_dask.testing.tiny_transformers import write_tiny_checkpoint

    checkpoint = write_tiny_checkpoint("deepseek_v3", tmp_path / "hf", seed=1)
    assert json.loads((checkpoint / "config.json").read_text())["num_nextn_predict_layers"] == 1
    assert main(["shard", str(checkpoint), str(tmp_path / "st"), "--quiet", "--layout", "transformers"]) == 0
    model = nd.load(tmp_path / "st")
    assert model.store.manifest.mtp is None
    with pytest.raises(SpeculationError, match="num_nextn_predict_layers"):
        model.generate(torch.tensor([[3, 4, 5]]), max_new_tokens=2, speculative="mtp")


def test_a_hostile_layer_count_is_refused_before_anything_is_built(tmp_path, capsys):
    from neuro_dask.store.hf_sharder import TransformersSharder

    checkpoint = write_tiny_mtp_checkpoint("deepseek_v3", tmp_path / "hf", seed=1)
    raw = json.loads((checkpoint / "config.json").read_text())
    (checkpoint / "config.json").write_text(json.dumps({**raw, "num_nextn_predict_layers": 10**9}))
    with pytest.raises(ConfigError, match="num_nextn_predict_layers"):
        TransformersSharder(checkpoint).count()
    assert main(["shard", str(checkpoint), str(tmp_path / "st"), "--quiet", "--layout", "transformers"]) != 0
    assert "num_nextn_predict_layers must be an integer in 0..8" in capsys.readouterr().err
    assert not (tmp_path / "st" / "manifest.json").exists()


def test_a_layer_tensor_of_the_wrong_shape_is_named(deepseek, tmp_path):
    """A mirror that re-hashes its manifest passes the sha256 checks: the shapes still are checked."""
    import shutil

    store = shutil.copytree(deepseek[1], tmp_path / "forged")
    manifest = Manifest.read(store)
    path = store / manifest.mtp.path
    tensors = read_tensors(path)
    tensors["0.eh_proj.weight"] = tensors["0.eh_proj.weight"][:, :-1].contiguous()
    save_file(tensors, path, metadata={"format": "pt"})
    raw = json.loads((store / "manifest.json").read_text())
    for a in raw["artifacts"]:
        if a["path"] == manifest.mtp.path:
            a["sha256"], a["bytes"] = sha256_file(path), path.stat().st_size
    (store / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(TensorShapeError, match="eh_proj"):
        mtp_draft(nd.load(store))


def test_a_client_mirror_of_a_remote_store_fetches_the_layer_when_first_read(deepseek, tmp_path):
    import fsspec

    from neuro_dask.client.dispatch.session import open_store

    fs = fsspec.filesystem("memory")
    root = f"/mtp-{tmp_path.name}"
    for path in deepseek[1].rglob("*"):
        if path.is_file():
            fs.pipe(f"{root}/{path.relative_to(deepseek[1]).as_posix()}", path.read_bytes())
    _, mirror = open_store(f"memory://{root}", verify=True, cache_dir=tmp_path / "cache")
    manifest = mirror.manifest
    assert not (mirror.root / manifest.mtp.path).exists()  # the trunk and tokenizer only, at first
    assert "0.eh_proj.weight" in mirror.read_mtp()
    n = manifest.config["num_hidden_layers"]
    assert mirror.read_expert(n, 0, role=ROLE_MTP_EXPERT).as_dict()
    assert (mirror.root / manifest.mtp_expert(n, 0).path).is_file()


# ---- the layer's computation ---------------------------------------------------------------------


def _reference_chain(model, draft, context: list[int], k: int) -> list[int]:
    """From scratch, no cache: the main model's final states over the whole context; the layer over
    every (state_i, token_i+1) pair, embedding zeroed at position 0; then its own last state
    stands for the next position's, k times."""
    from transformers.masking_utils import create_causal_mask

    hf, layer = model.hf, draft.mtp.layer
    ids = torch.tensor([context])
    with torch.inference_mode(), expert_calls(draft.mtp.experts.run_layer):
        with expert_calls(model._dispatch):
            states = hf.model(input_ids=ids).last_hidden_state[:, :-1]
        tokens, out = ids[:, 1:], []
        for _ in range(k):
            n = tokens.shape[1]
            positions = torch.arange(n)[None]
            embeds = hf.get_input_embeddings()(tokens)
            embeds[:, 0] = 0
            x = layer.eh_proj(torch.cat([layer.enorm(embeds), layer.hnorm(states)], dim=-1))
            mask = create_causal_mask(
                config=hf.config,
                inputs_embeds=x,
                attention_mask=torch.ones(1, n, dtype=torch.long),
                cache=None,
                position_ids=positions,
            )
            g = layer.block(
                x, attention_mask=mask, position_ids=positions, position_embeddings=hf.model.rotary_emb(x, positions)
            )
            token = hf.get_output_embeddings()(layer.shared_head.norm(g[:, -1])).argmax(-1)
            out.append(int(token))
            states = torch.cat([states, g[:, -1:]], dim=1)
            tokens = torch.cat([tokens, token[:, None]], dim=1)
    return out


def _states(model, context: list[int]) -> torch.Tensor:
    with torch.inference_mode(), expert_calls(model._dispatch):
        return model.hf.model(input_ids=torch.tensor([context])).last_hidden_state


def test_proposals_are_the_layers_own_computation_across_commits(deepseek):
    """The session feeds the pairs incrementally and takes its drafts back out of its cache:
    what it proposes after each commit is what the layer computes from scratch."""
    model = nd.load(deepseek[1])
    draft = mtp_draft(model)
    prompt = [5, 17, 3, 29, 11, 8]
    session = draft.start([prompt], capacity=32)
    session.commit(torch.tensor([[40]]), _states(model, prompt))  # the prefill's states, all of them
    context = [*prompt, 40]
    assert session.propose(3)[0] == _reference_chain(model, draft, context, 3)
    # a pass kept one draft and added one token: the states of its two kept positions
    kept = [21, 9]
    session.commit(torch.tensor([kept]), _states(model, [*context, kept[0]])[:, len(context) - 1 :])
    context += kept
    assert session.propose(4)[0] == _reference_chain(model, draft, context, 4)


def test_the_recorded_states_are_the_final_norms_output(deepseek):
    model = nd.load(deepseek[1])
    prompt = [5, 17, 3, 29, 11]
    with model.final_hidden() as seen, torch.inference_mode():
        model(torch.tensor([prompt]))
    torch.testing.assert_close(seen[-1], _states(model, prompt))


def test_a_hand_written_model_has_no_mtp_layer():
    with pytest.raises(SpeculationError, match="no multi-token-prediction layer: only a store sharded with"):
        nd.load("neuro_dask/assets/adder").generate(torch.tensor([[3, 4, 5]]), max_new_tokens=2, speculative="mtp")


# ---- over a cluster --------------------------------------------------------------------------------


@pytest.mark.parametrize("model_type", MTP_TYPES)
def test_mtp_drafts_give_transformers_greedy_tokens_with_experts_on_workers(model_type, cluster_client, tmp_path):
    from transformers import AutoModelForCausalLM

    checkpoint, store = _sharded(model_type, tmp_path)
    attn = tiny_config(model_type)._attn_implementation
    reference = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32, attn_implementation=attn)
    ids, mask = padded_prompts(reference.config.vocab_size)
    expected = reference.eval().generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
    expected_one = reference.generate(ids[1:], attention_mask=mask[1:], max_new_tokens=8, do_sample=False)
    with nd.load(store, client=cluster_client) as model:
        got = model.generate(ids, mask, max_new_tokens=8, speculative="mtp")
        one = model.generate(ids[1:], mask[1:], max_new_tokens=8, speculative="mtp")
        stats = model.stats()["speculation"]
    width = ids.shape[1]
    assert torch.equal(got[:, width:], expected[:, width:])
    assert torch.equal(one[:, width:], expected_one[:, width:])
    assert stats["drafted"] > 0  # the layer drafted: its tokens were verified, not skipped
