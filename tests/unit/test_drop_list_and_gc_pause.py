"""Small runtime pieces: the worker's list of dropped calls, and the token loop's GC pause."""

from __future__ import annotations

import gc

from neuro_dask.model.gc_pause import collect_young, full_collections_deferred
from neuro_dask.runtime.drop_list import DropList


def test_a_dropped_call_is_skipped_once():
    drops = DropList()
    drops.add("call-1")
    assert drops.take("call-1")
    assert not drops.take("call-1")  # taken: a retry with the same id would run
    assert not drops.take("call-2") and not drops.take(None)


def test_the_drop_list_forgets_the_oldest_beyond_its_limit():
    drops = DropList(limit=3)
    for i in range(5):
        drops.add(f"c{i}")
    assert len(drops) == 3
    assert not drops.take("c0") and not drops.take("c1")
    assert drops.take("c2") and drops.take("c4")


def test_full_collections_are_deferred_while_any_generation_runs():
    assert gc.isenabled()
    with full_collections_deferred():
        assert not gc.isenabled()
        with full_collections_deferred():  # nested or concurrent generations share one pause
            assert not gc.isenabled()
        assert not gc.isenabled()
    assert gc.isenabled()


def test_the_pause_restores_a_collector_the_user_had_disabled_as_disabled():
    gc.disable()
    try:
        with full_collections_deferred():
            pass
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_young_collections_still_run_during_the_pause():
    with full_collections_deferred():
        junk = [[] for _ in range(gc.get_threshold()[0] * 2)]  # containers count toward generation 0
        assert gc.get_count()[0] >= gc.get_threshold()[0]  # (freeing them would lower the count again)
        stats = gc.get_stats()
        young, full = stats[0]["collections"] + stats[1]["collections"], stats[2]["collections"]
        collect_young()
        stats = gc.get_stats()
        assert stats[0]["collections"] + stats[1]["collections"] == young + 1
        assert stats[2]["collections"] == full  # never the full pass
        assert gc.get_count()[0] < gc.get_threshold()[0]
        del junk
