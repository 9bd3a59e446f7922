"""model.map over Dask collections on a local cluster, and model.score, against local runs."""

from __future__ import annotations

import random

import dask.bag as db
import dask.dataframe as dd
import pandas as pd
import pytest
from distributed import Client

import neuro_dask as nd
from neuro_dask.client.cluster import local_cluster
from neuro_dask.demo.addition import ASSET_DIR, sample_problems


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    import dask

    cache = tmp_path_factory.mktemp("map-cache")
    with (
        dask.config.set({"neuro.worker.cache-dir": str(cache)}),
        local_cluster(2, processes=False, worker_args=["--neuro-no-benchmark"], dashboard_address=None) as cluster,
        Client(cluster) as client,
    ):
        with nd.load(ASSET_DIR, client=client) as remote:
            yield remote, nd.load(ASSET_DIR)


def test_map_over_a_2000_row_dask_dataframe_returns_every_row_with_the_failure_recorded(models):
    remote, local = models
    problems = sample_problems(2_000, random.Random(7), held_out=True)
    prompts = [p.prompt for p in problems]
    prompts[123] = ""  # malformed on purpose
    frame = dd.from_pandas(pd.DataFrame({"prompt": prompts}), npartitions=8)
    result = remote.map(frame["prompt"], max_new_tokens=8, batch_size=128, progress=False)
    assert isinstance(result, dd.Series) and result.npartitions == 8
    out = result.compute()
    assert len(out) == 2_000 and list(out.index) == list(range(2_000))
    failed = nd.failures(out)
    assert [f.prompt for f in failed] == [""] and isinstance(out[123], nd.MapFailure)
    expected = local.map(prompts, max_new_tokens=8, batch_size=256, progress=False)
    assert [str(x) for x in out.tolist()] == [str(x) for x in expected]
    correct = sum(o == p.answer for o, p in zip(out.tolist(), problems, strict=True) if isinstance(o, str))
    assert correct >= 0.95 * 1_999
    assert sum(s["prompts"] for s in remote.last_map_stats) == 1_999  # batched: 16 batches, not 1,999 calls
    assert len(remote.last_map_stats) == 16


def test_map_keeps_the_kind_of_collection(models):
    remote, _ = models
    prompts = [p.prompt for p in sample_problems(10, random.Random(3), held_out=True)]
    bag = remote.map(db.from_sequence(prompts, npartitions=3), max_new_tokens=8, progress=False)
    assert isinstance(bag, db.Bag) and bag.npartitions == 3 and len(bag.compute()) == 10
    series = remote.map(pd.Series(prompts, index=range(100, 110)), max_new_tokens=8, progress=False)
    assert isinstance(series, pd.Series) and list(series.index) == list(range(100, 110))
    assert remote.map(prompts, max_new_tokens=8, progress=False) == series.tolist()
    with pytest.raises(TypeError):
        remote.map({"not": "a collection"})


def test_scores_over_the_cluster_match_local_ones(models):
    remote, local = models
    texts = [p.prompt + p.answer for p in sample_problems(5, random.Random(5), held_out=True)]
    far, near = remote.score(texts), local.score(texts)
    for a, b in zip(far, near, strict=True):
        assert a.tokens == b.tokens and a.total == pytest.approx(b.total, abs=1e-4)
    mapped = remote.map(texts, task="score", progress=False)
    assert mapped == pytest.approx([r.total for r in near], abs=1e-4)
