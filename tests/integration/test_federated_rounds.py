"""Federated rounds through Dask: participants as actors pinned to workers, one dropping mid-round,
the result written as a new store version that nd.load reads."""

from __future__ import annotations

import random

import dask
import numpy as np
from distributed import Client, LocalCluster

import neuro_dask as nd
from neuro_dask.demo.addition import ASSET_DIR, sample_problems
from neuro_dask.federated.dask_rounds import CONFIG_DATA_PATH, run_federated
from neuro_dask.federated.rounds import FederatedCoordinator, Participant, write_problems
from neuro_dask.federated.training import VERSION_FILE, LocalSteps, get_flat, non_iid_split, set_flat, write_version
from neuro_dask.store.manifest import Manifest

LOCAL = LocalSteps(steps=2, batch_size=8)


def _local_data(k: int):
    """Runs on the participant's worker: the data is made there and never travels."""
    return non_iid_split(64, seed=3)[k]


def test_rounds_on_dask_workers_survive_a_dropout_and_make_a_new_version(tmp_path):
    base = nd.load(ASSET_DIR)
    start = get_flat(base)
    write_problems(tmp_path / "p3.jsonl", non_iid_split(64, seed=3)[3])
    with (
        LocalCluster(n_workers=4, threads_per_worker=1, processes=False, dashboard_address=None) as cluster,
        Client(cluster) as client,
        dask.config.set({CONFIG_DATA_PATH: str(tmp_path / "p3.jsonl")}),
    ):
        addrs = sorted(client.scheduler_info()["workers"])
        workers = {f"p{k}": addr for k, addr in enumerate(addrs)}
        data = {f"p{k}": (lambda k=k: _local_data(k)) for k in range(3)}  # p3 reads its worker's config path
        coord = run_federated(
            client,
            workers,
            str(ASSET_DIR),
            start,
            rounds=2,
            data=data,
            local=LOCAL,
            seed=1,
            drop_in_rounds=(),
            coordinator_kwargs={"timeout": 120},
        )
        assert [r.dropped for r in coord.history] == [[], []]
        # a second federation in which p2 leaves in the middle of round 0
        from neuro_dask.federated.dask_rounds import start_participants

        handles = start_participants(
            client,
            {"q0": addrs[0], "q1": addrs[1], "q2": addrs[2]},
            str(ASSET_DIR),
            {f"q{k}": (lambda k=k: _local_data(k)) for k in range(3)},
            local=LOCAL,
            seed=2,
        )
        drop = client.submit(
            Participant,
            "q3",
            str(ASSET_DIR),
            lambda: _local_data(3),
            local=LOCAL,
            seed=2,
            drop_in_rounds=[0],
            actor=True,
            workers=[addrs[3]],
        ).result()
        coord2 = FederatedCoordinator({**handles, "q3": drop}, start, timeout=120)
        coord2.setup_keys()
        r0 = coord2.run_round()
        r1 = coord2.run_round()
    assert r0.dropped == ["q3"] and r0.survivors == ["q0", "q1", "q2"]
    assert r1.survivors == ["q0", "q1", "q2"] and r1.dropped == []
    assert r0.update_norm > 0 and np.isfinite(coord2.global_flat).all()
    assert not np.array_equal(coord.global_flat, start)

    set_flat(base, coord.global_flat)
    manifest = write_version(base, ASSET_DIR, tmp_path / "v2", {"version": 1, "rounds": 2})
    parent = Manifest.read(ASSET_DIR)
    assert manifest.trunk.sha256 != parent.trunk.sha256  # routers changed
    assert {a.sha256 for a in manifest.experts}.isdisjoint({a.sha256 for a in parent.experts})
    reloaded = nd.load(tmp_path / "v2")  # every file sha256-verified against the new manifest
    assert np.array_equal(get_flat(reloaded), coord.global_flat)
    assert (tmp_path / "v2" / VERSION_FILE).is_file()
    assert reloaded.generate_text(["12+34="], max_new_tokens=4)


def test_in_process_round_with_a_dropout_averages_exactly_the_survivors():
    start = get_flat(nd.load(ASSET_DIR))
    data = non_iid_split(32, seed=4)
    parts = {
        f"p{k}": Participant(
            f"p{k}", str(ASSET_DIR), data[k], local=LOCAL, seed=5, drop_in_rounds=[0] if k == 3 else ()
        )
        for k in range(4)
    }
    # The same survivors' updates, computed by twins with the same seeds, without masking.
    twins = {f"p{k}": Participant(f"p{k}", str(ASSET_DIR), data[k], local=LOCAL, seed=5) for k in range(3)}
    expected = np.mean([t.trainer.local_update(start, t.data, t.rng) for t in twins.values()], axis=0)
    coord = FederatedCoordinator(parts, start)
    coord.setup_keys()
    r = coord.run_round()
    assert r.dropped == ["p3"]
    got = coord.global_flat.astype(np.float64) - start
    assert np.max(np.abs(got - expected)) < 1e-6  # fixed-point resolution and float32 storage


def test_held_out_problems_never_reach_participants():
    rng = random.Random(0)
    assert all(p.a % 10 not in (1, 5, 9) for p in non_iid_split(50, seed=0)[0])
    assert sample_problems(1, rng, held_out=True)
