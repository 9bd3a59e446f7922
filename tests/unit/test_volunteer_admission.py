"""The neuro_worker preload's rules without a worker: tables of inputs -> decisions."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from neuro_dask.volunteer import admission


@pytest.mark.parametrize("paused, refusal", [("", None), ("owner busy", "paused: owner busy")])
def test_a_paused_worker_refuses_expert_calls(paused, refusal):
    assert admission.paused_refusal(paused) == refusal


@pytest.mark.parametrize(
    "identity, caller",
    [
        (None, (None, False)),
        (SimpleNamespace(name="alice", role="client"), ("alice", False)),
        (SimpleNamespace(name="sched", role="scheduler"), ("sched", True)),
        (SimpleNamespace(name="w2", role="worker"), ("w2", False)),
    ],
)
def test_caller_of(identity, caller):
    assert admission.caller_of(identity) == caller


@pytest.mark.parametrize(
    "caller, call, key",
    [
        ("alice", "c1", "alice\x00c1"),
        (None, "c1", "\x00c1"),
        ("alice", None, None),  # a call without an id is never dropped
        ("alice", 7, "alice\x007"),
    ],
)
def test_drop_key_is_the_callers_own(caller, call, key):
    assert admission.drop_key(caller, call) == key


@pytest.mark.parametrize("n, kept", [(0, 0), (3, 3), (admission.MAX_CANCELS + 10, admission.MAX_CANCELS)])
def test_one_cancel_message_drops_at_most_max_cancels(n, kept):
    keys = admission.cancel_keys("c", [f"call{i}" for i in range(n)])
    assert len(keys) == kept and keys[:1] == (["c\x00call0"] if n else [])


@pytest.mark.parametrize("experts, pairs", [([[0, 1], ["2", "3"]], [(0, 1), (2, 3)]), ([], [])])
def test_expert_pairs(experts, pairs):
    assert admission.expert_pairs(experts) == pairs


@pytest.mark.parametrize("failed, listed", [({(0, 1): "bad"}, [[0, 1, "bad"]]), ({}, [])])
def test_failed_list(failed, listed):
    assert admission.failed_list(failed) == listed


@pytest.mark.parametrize(
    "status, precision",
    [
        ({"precision": {"m": "int8"}}, "int8"),
        ({"precision": {}}, "float32"),
        ({}, "float32"),
    ],
)
def test_reported_precision(status, precision):
    assert admission.reported_precision(status, "m") == precision


@pytest.mark.parametrize("nanny, main, leaves", [(True, True, True), (True, False, False), (False, True, False)])
def test_only_a_nannys_worker_leaves_signals_to_it(nanny, main, leaves):
    assert admission.leaves_signals_to_nanny(nanny, main) is leaves
