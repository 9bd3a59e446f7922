"""Every feature on the transformers trunk's architectures, on in-process clusters: trust quorums
against lying volunteers, hedged stragglers, the private tier where an expert's maps allow it
(and its refusal where not), concurrent generations sharing expert calls, micro-batch lanes,
scoring and map, and `inspect`'s parameter counts of quantized stores."""

from __future__ import annotations

import json
import threading

import dask
import pytest
import torch
from cluster_helpers import add_worker, neuro_cluster, trust_events

import neuro_dask as nd
from neuro_dask.cli.main import main
from neuro_dask.errors import ConfigError
from neuro_dask.testing.tiny_transformers import build_tiny_model, padded_prompts, write_tiny_checkpoint

TRUST = {"neuro.scheduler.trusted": ["0"], "neuro.client.trust": True, "neuro.client.seed": 0}


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    """model type -> (its sharded store, the transformers reference model)."""
    out = {}
    for model_type in ("deepseek_v3", "gpt_oss", "glm4_moe"):
        root = tmp_path_factory.mktemp(model_type)
        write_tiny_checkpoint(model_type, root / "hf", seed=2)
        assert main(["shard", str(root / "hf"), str(root / "sharded"), "--quiet"]) == 0
        out[model_type] = (root / "sharded", build_tiny_model(model_type, seed=2))
    return out


def _rows(count: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 128, (3 + i % 5,), generator=g).tolist() for i in range(count)]


def test_lying_volunteers_change_nothing_on_deepseek(stores, tmp_path):
    store, _ = stores["deepseek_v3"]
    rows = _rows(6, seed=1)
    reference = nd.load(store).generate(rows, max_new_tokens=12)
    perturb = json.dumps({"mode": "perturb", "scale": 0.05, "seed": 0})
    with dask.config.set(TRUST), neuro_cluster(4, tmp_path=tmp_path) as (cluster, client):
        liar = add_worker(
            client, cluster.scheduler_address, "bad0", "--neuro-adversary", perturb, "--neuro-owner", "mallory"
        )
        client.wait_for_workers(5)
        with nd.load(store, client=client) as model:
            out = model.generate(rows, max_new_tokens=12)
            model.executor.flush_reports()
        caught = [e for e in trust_events(client) if e.get("action") == "invalid" and e.get("worker") == liar.address]
        client.sync(liar.close)
    assert torch.equal(out, reference)
    assert caught  # its wrong answers were refuted, not just outvoted by luck


def test_stragglers_are_hedged_on_gpt_oss(stores, tmp_path):
    store, _ = stores["gpt_oss"]
    rows = _rows(4, seed=2)
    reference = nd.load(store).generate(rows, max_new_tokens=10)
    straggle = json.dumps({"mode": "straggle", "probability": 0.25, "delay": 0.05})
    with (
        dask.config.set(TRUST),
        neuro_cluster(4, replicas=3, tmp_path=tmp_path, worker_args=["--neuro-adversary", straggle]) as (_, client),
    ):
        with nd.load(store, client=client) as model:
            model.generate(rows, max_new_tokens=6)  # latency samples for the estimates
            out = model.generate(rows, max_new_tokens=10)
            latency = model.executor.trusted.latency
    assert torch.equal(out, reference)
    assert latency.hedges > 0


def test_private_tier_serves_plain_swiglu_experts_and_refuses_gpt_oss_with_the_reason(stores, tmp_path):
    store, _ = stores["glm4_moe"]
    ids, mask = padded_prompts(128, seed=4)
    with neuro_cluster(0, tmp_path=tmp_path) as (cluster, client):
        for name in ("alice", "bob", "carol"):
            add_worker(client, cluster.scheduler_address, f"w-{name}", "--neuro-owner", name)
        client.wait_for_workers(3, timeout=30)
        with nd.load(store, client=client) as standard, nd.load(store, client=client, privacy="private") as private:
            torch.testing.assert_close(private.forward(ids, mask), standard.forward(ids, mask), atol=1e-3, rtol=0)
            assert torch.equal(
                private.generate(ids, mask, max_new_tokens=8), standard.generate(ids, mask, max_new_tokens=8)
            )
        with pytest.raises(ConfigError, match="GptOssExperts experts are not plain SwiGLU"):
            nd.load(stores["gpt_oss"][0], client=client, privacy="private")


def test_concurrent_generations_lanes_score_and_map_on_gpt_oss(stores, tmp_path):
    store, reference = stores["gpt_oss"]
    rows = _rows(6, seed=3)
    local = nd.load(store)
    expected = [local.generate([r], max_new_tokens=8)[0].tolist() for r in rows]
    with (
        dask.config.set({"neuro.client.micro-batches": 2}),
        neuro_cluster(3, tmp_path=tmp_path) as (_, client),
        nd.load(store, client=client) as model,
    ):
        assert model.micro_batches == 2
        lanes = model.generate(rows, max_new_tokens=8)  # two lanes, each its own cache
        results: dict[int, list[int]] = {}
        threads = [
            threading.Thread(
                target=lambda i=i: results.__setitem__(i, model.generate([rows[i]], max_new_tokens=8)[0].tolist())
            )
            for i in range(len(rows))
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        scores = model.score(rows[:2])
        mapped = model.map(rows[:3], max_new_tokens=4, batch_size=2, progress=False)
    width = lanes.shape[1] - 8
    for i in range(len(rows)):
        assert lanes[i, width:].tolist() == expected[i][-8:]
        assert results[i] == expected[i]
    with torch.no_grad():
        logits = reference(input_ids=torch.tensor([rows[0]])).logits.log_softmax(-1)[0]
    want = logits[:-1].gather(1, torch.tensor(rows[0][1:])[:, None])[:, 0]
    torch.testing.assert_close(torch.tensor(scores[0].logprobs), want, atol=1e-4, rtol=1e-4)
    assert mapped == local.map(rows[:3], max_new_tokens=4, batch_size=2, progress=False)
    assert len(mapped) == 3 and all(len(m) == 4 for m in mapped)


def test_inspect_counts_the_parameters_of_quantized_experts_as_the_model_has(tmp_path, capsys):
    from neuro_dask.store.manifest import Manifest
    from neuro_dask.store.summary import summarize
    from neuro_dask.testing.quantized_checkpoints import write_mxfp4_checkpoint

    model = build_tiny_model("gpt_oss", seed=3, hidden_size=64, intermediate_size=64)
    model.save_pretrained(tmp_path / "float")
    write_mxfp4_checkpoint(tmp_path / "float", tmp_path / "mxfp4")
    assert main(["shard", str(tmp_path / "mxfp4"), str(tmp_path / "sharded"), "--quiet"]) == 0
    summary = summarize(Manifest.read(tmp_path / "sharded"))
    total = sum(p.numel() for p in model.parameters())
    experts = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    assert summary["parameters_total"] == total
    assert summary["expert_format"] == "mxfp4" and summary["layout"] == "transformers"
    per_layer_active = experts // summary["moe_layers"] // summary["experts_per_layer"] * 2
    assert summary["parameters_active_per_token"] == total - experts + per_layer_active * summary["moe_layers"]
    assert main(["inspect", str(tmp_path / "sharded")]) == 0
    assert "mxfp4 experts" in capsys.readouterr().out
