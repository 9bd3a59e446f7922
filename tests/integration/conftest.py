from __future__ import annotations

import pytest
from cluster_helpers import neuro_cluster


@pytest.fixture(scope="module")
def shared_cluster(tmp_path_factory):
    with neuro_cluster(3, tmp_path=tmp_path_factory.mktemp("cluster")) as (cluster, client):
        yield cluster, client
