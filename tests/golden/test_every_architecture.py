"""Golden: every MoE architecture transformers implements, served with its experts on workers.

For each model type whose experts use transformers' experts hook (enumerated from the installed
transformers: neuro_dask/testing/tiny_transformers.py, which also says why any is skipped), a
tiny random checkpoint written by transformers is sharded with the CLI, published to a local
cluster of preloaded workers, and must generate the same greedy tokens as transformers, logits
within 1e-4 in float32. All of them together take about half a minute on 2 cores.
"""

from __future__ import annotations

import pytest
from architecture_golden import check_architecture

from neuro_dask.testing.tiny_transformers import HOOKED_MODEL_TYPES, REQUIRED, skipped

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def cluster_client(tmp_path_factory):
    from cluster_helpers import neuro_cluster

    with neuro_cluster(3, tmp_path=tmp_path_factory.mktemp("every-arch")) as (_, client):
        yield client


@pytest.mark.parametrize("model_type", HOOKED_MODEL_TYPES)
def test_architecture_matches_transformers_with_experts_on_workers(model_type, cluster_client, tmp_path):
    """A type a tiny config could not be built for would skip with the reason (none in 5.24)."""
    check_architecture(model_type, cluster_client, tmp_path)


def test_every_named_family_is_enumerated_and_buildable():
    missing = [t for t in REQUIRED if t not in HOOKED_MODEL_TYPES or t in skipped()]
    assert not missing
