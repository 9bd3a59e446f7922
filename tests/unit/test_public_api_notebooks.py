"""The public calls the notebooks use instead of internals: nd.network_status, model.stats() /
model.model_id / model.tier, and neuro_dask.federated's entry points with per-round metrics.

No cluster: a stand-in client answers `neuro_status`, stand-in executors carry counters, and the
federated rounds run over in-process participants (as neuro_dask/federated/rounds.py allows).
"""

from __future__ import annotations

import random
import subprocess
import sys
from collections import deque
from types import SimpleNamespace

import pytest

import neuro_dask as nd
from neuro_dask.client.network import NetworkStatus, NetworkStatusUnavailableError, network_status
from neuro_dask.demo.addition import ASSET_DIR, sample_problems

REPLY = {
    "workers": {
        "tcp://10.0.0.2:1": {
            "name": "b",
            "owner": "bob",
            "speed": 1.0,
            "memory_budget": 2**30,
            "serving": [["m1", 1, 0], ["m1", 0, 3]],
            "trust_score": 0.9,
            "trust_routable": True,
        },
        "tcp://10.0.0.1:1": {
            "name": "a",
            "owner": "alice",
            "speed": 2.0,
            "memory_budget": 2**31,
            "serving": [("m1", 0, 1)],
        },
    },
    "models": {"m1": {"store_url": "file:///s", "experts": 3, "summary": {"layers": 2}}},
    "versions": {"channels": {}},
    "something_new": 1,
}


class StandInClient:
    """client.sync(client.scheduler.neuro_status) as distributed's Client does it, without a network."""

    def __init__(self, answer):
        self.scheduler = SimpleNamespace(address="tcp://sched:8786", neuro_status=answer)

    @staticmethod
    def sync(fn, *args, **kwargs):
        return fn(*args, **kwargs)


# ---- nd.network_status -----------------------------------------------------------------------------


def test_network_status_is_exported():
    assert nd.network_status is network_status and nd.NetworkStatus is NetworkStatus
    assert {"network_status", "NetworkStatus"} <= set(nd.__all__)


def test_network_status_is_plain_data_from_the_scheduler():
    status = nd.network_status(StandInClient(lambda: REPLY))
    assert isinstance(status, NetworkStatus)
    assert set(status.workers) == {"tcp://10.0.0.1:1", "tcp://10.0.0.2:1"}
    assert status.workers["tcp://10.0.0.2:1"]["trust_score"] == 0.9
    assert status.workers["tcp://10.0.0.1:1"]["serving"] == [["m1", 0, 1]]  # tuples from msgpack or not: lists
    assert status.models["m1"]["experts"] == 3 and status.versions == {"channels": {}}
    assert status.as_dict() == {"workers": status.workers, "models": status.models, "versions": status.versions}


def test_placement_is_one_sorted_row_per_replica_named_by_worker():
    status = NetworkStatus.from_reply(REPLY)
    assert status.placement() == [("a", "m1", 0, 1), ("b", "m1", 0, 3), ("b", "m1", 1, 0)]
    assert NetworkStatus.from_reply({}).placement() == []


def _unknown_handler():
    raise KeyError("neuro_status")


@pytest.mark.parametrize(
    "answer",
    [
        lambda: None,  # distributed's scheduler without the handler closes the call without a reply
        _unknown_handler,
    ],
)
def test_a_scheduler_without_the_plugin_is_named_with_the_fix(answer):
    with pytest.raises(NetworkStatusUnavailableError, match="neuro_scheduler") as info:
        nd.network_status(StandInClient(answer))
    assert info.value.address == "tcp://sched:8786" and isinstance(info.value, nd.NeuroDaskError)


def test_other_failures_propagate():
    def down():
        raise OSError("connection refused")

    with pytest.raises(OSError):
        nd.network_status(StandInClient(down))


# ---- model.stats(), model.model_id, model.tier ---------------------------------------------------------


@pytest.fixture(scope="module")
def adder():
    return nd.load(ASSET_DIR)


@pytest.fixture
def model(adder):
    local = adder.executor
    yield adder
    adder.executor = local


def test_a_local_model_has_no_id_and_nothing_to_count(model):
    assert model.model_id is None and model.tier == "local"
    assert model.stats() == {"tier": "local", "model_id": None}


def test_standard_tier_stats_from_the_distributed_executor(model):
    from neuro_dask.client.dispatch.executor import DistributedExecutor, standard_counters

    trusted = SimpleNamespace(units=7, replicas_sent=9, unchecked=2, hedges=1, disputes=[])
    counted = standard_counters(deque([0.003, 0.001, 0.002]), {"sent": 100, "received": 80}, trusted)
    model.executor = SimpleNamespace(model_id="mixtral-1", tier=DistributedExecutor.tier, counters=lambda: counted)
    assert model.model_id == "mixtral-1" and model.tier == "standard"
    assert model.stats() == {
        "tier": "standard",
        "model_id": "mixtral-1",
        "layers": 3,
        "layer_ms_p50": 2.0,
        "bytes_sent": 100,
        "bytes_received": 80,
        "units": 7,
        "replicas_sent": 9,
        "unchecked": 2,
        "hedges": 1,
    }
    assert standard_counters(deque(), {"sent": 0, "received": 0}, None) == {  # trust off
        "layers": 0,
        "layer_ms_p50": None,
        "bytes_sent": 0,
        "bytes_received": 0,
    }


def test_private_tier_stats_are_a_snapshot_of_its_counters(model):
    from neuro_dask.client.dispatch.private_executor import PrivateExecutor

    private = PrivateExecutor(SimpleNamespace(model_id="mixtral-2"))
    private.stats.update(layers=4, round_trips=8, bytes_sent=1000, bytes_received=900)
    model.executor = private
    assert model.tier == "private" and model.model_id == "mixtral-2"
    stats = model.stats()
    assert stats == {"tier": "private", "model_id": "mixtral-2", **private.stats}
    private.stats["layers"] += 1
    assert stats["layers"] == 4  # a copy: later calls do not change it
    assert {"verified", "unverified", "disputes", "caught", "rows", "messages"} <= set(stats)


def test_a_following_model_reports_its_current_version(model):
    from neuro_dask.client.following import FollowingModel

    model.executor = SimpleNamespace(model_id="v1", tier="standard", counters=dict)
    following = FollowingModel.__new__(FollowingModel)
    following.__dict__["model"] = model
    assert following.model_id == "v1" and following.stats()["model_id"] == "v1" and following.tier == "standard"


# ---- neuro_dask.federated ----------------------------------------------------------------------------


def test_the_federated_package_exports_its_public_api():
    import neuro_dask.federated as fed

    for name in fed.__all__:
        assert getattr(fed, name) is not None, name
    from neuro_dask.federated.dask_rounds import run_federated
    from neuro_dask.federated.training import evaluator

    assert fed.run_federated is run_federated and fed.evaluator is evaluator
    with pytest.raises(AttributeError):
        fed.no_such_name  # noqa: B018


def test_importing_the_federated_errors_does_not_load_torch():
    code = "import sys, neuro_dask.federated.errors, neuro_dask.federated; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "False"


HELD_OUT = sample_problems(64, random.Random(7), held_out=True)


def test_evaluate_model_on_the_trained_and_an_untrained_adder():
    from neuro_dask.federated import evaluate_model, reinitialise_moe

    trained = evaluate_model(nd.load(ASSET_DIR), HELD_OUT)
    assert trained["accuracy"] >= 0.95 and trained["loss"] < 0.05, trained
    untrained = nd.load(ASSET_DIR)
    reinitialise_moe(untrained, seed=0)
    measured = evaluate_model(untrained, HELD_OUT, batch_size=16)  # batches: the same figures as one
    assert measured["accuracy"] <= 0.05 and measured["loss"] > 2.0, measured
    assert measured == pytest.approx(evaluate_model(untrained, HELD_OUT))


class InProcessActors:
    """`client.submit(Participant, ..., actor=True)` made in this process: run_federated's wiring
    without a cluster (the coordinator resolves plain return values as it does futures)."""

    def __init__(self):
        self.placed: dict[str, str] = {}

    def submit(self, cls, pid, store_path, source, actor, workers, allow_other_workers, key, **kwargs):
        assert actor and not allow_other_workers
        self.placed[pid] = workers[0]
        return SimpleNamespace(result=lambda: cls(pid, store_path, source, **kwargs))


def test_run_federated_measures_the_global_model_round_by_round():
    from neuro_dask.federated import (
        LocalSteps,
        RoundResult,
        evaluator,
        get_flat,
        non_iid_split,
        reinitialise_moe,
        run_federated,
    )

    base = nd.load(ASSET_DIR)
    reinitialise_moe(base, seed=0)
    split = non_iid_split(64, seed=0)
    ids = ["p0", "p1", "p2"]
    client, seen = InProcessActors(), []
    coordinator = run_federated(
        client,
        {pid: f"tcp://w{k}" for k, pid in enumerate(ids)},
        str(ASSET_DIR),
        get_flat(base),
        rounds=2,
        data={pid: split[k] for k, pid in enumerate(ids)},
        local=LocalSteps(steps=5, batch_size=32, lr=1e-2),
        seed=0,
        evaluate=evaluator(base, HELD_OUT),
        on_round=seen.append,
    )
    assert client.placed == {"p0": "tcp://w0", "p1": "tcp://w1", "p2": "tcp://w2"}
    assert [type(r) for r in seen] == [RoundResult, RoundResult] and seen == coordinator.history
    table = coordinator.table()
    assert [row["rounds"] for row in table] == [0, 1, 2]
    assert table[0]["update_norm"] is None and all(row["survivors"] == 3 and row["dropped"] == 0 for row in table)
    assert table[0]["loss"] == coordinator.initial_metrics["loss"]
    assert [row["loss"] for row in table[1:]] == [r.metrics["loss"] for r in coordinator.history]
    losses = [row["loss"] for row in table]
    assert losses[2] < losses[1] < losses[0], losses


def test_without_evaluate_the_table_has_no_start_row_and_no_metrics():
    from neuro_dask.federated import FederatedCoordinator, LocalSteps, Participant, get_flat, non_iid_split

    split = non_iid_split(32, seed=1)
    handles = {
        pid: Participant(pid, str(ASSET_DIR), split[k], local=LocalSteps(steps=1, batch_size=8))
        for k, pid in enumerate(["p0", "p1"])
    }
    coordinator = FederatedCoordinator(handles, get_flat(nd.load(ASSET_DIR)))
    coordinator.setup_keys()
    result = coordinator.run_round()
    assert result.metrics == {} and coordinator.initial_metrics == {}
    assert coordinator.table() == [
        {"rounds": 1, "survivors": 2, "dropped": 0, "update_norm": result.update_norm, "epsilon": None}
    ]
