"""Unreachable reports are probed by the scheduler before they change routes (trust/probes.py)."""

from __future__ import annotations

from neuro_dask.trust.probes import Probe, ProbeBook


def test_reports_merge_and_one_probe_per_worker_goes_out():
    book = ProbeBook(interval=5.0)
    book.report("w1", "m", [(0, 1)])
    book.report("w1", "m", [(0, 2), (0, 1)])
    book.report("w2", "m", [(1, 3)])
    assert book.due(0.0) == [Probe("w1", "m", ((0, 1), (0, 2))), Probe("w2", "m", ((1, 3),))]
    assert book.due(0.1) == []  # nothing new


def test_a_flood_of_reports_costs_one_probe_per_worker_per_interval():
    book = ProbeBook(interval=5.0)
    probes = []
    for i in range(10_000):
        book.report("w1", "m", [(0, i % 8)])
        probes += book.due(i * 0.001)  # 10 s of reports
        if probes and probes[-1].worker == "w1":
            book.done("w1")
    assert len(probes) == 2  # at 0 s and at 5 s
    assert {le for p in probes for le in p.experts} == {(0, e) for e in range(8)}


def test_a_probe_in_flight_is_not_repeated_until_done():
    book = ProbeBook(interval=0.0)
    book.report("w1", "m", [(0, 0)])
    assert len(book.due(0.0)) == 1
    book.report("w1", "m", [(0, 1)])
    assert book.due(1.0) == []
    book.done("w1")
    assert book.due(1.0) == [Probe("w1", "m", ((0, 1),))]


def test_bounded_experts_per_probe_and_workers_waiting():
    book = ProbeBook(interval=0.0, max_experts=2, max_workers=2)
    book.report("w1", "m", [(0, e) for e in range(5)])
    book.report("w2", "m", [(0, 0)])
    book.report("w3", "m", [(0, 0)])  # a third worker waiting: dropped
    assert book.dropped == 1
    first = book.due(0.0)
    assert [len(p.experts) for p in first] == [2, 1]
    book.done("w1")
    assert book.due(1.0)[0].experts == ((0, 2), (0, 3))


def test_a_departed_worker_is_forgotten():
    book = ProbeBook()
    book.report("w1", "m", [(0, 0)])
    book.forget("w1")
    assert book.due(100.0) == []
