"""What a worker's or client's message must look like before any handler sees it (protocol/schemas.py)."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from neuro_dask.protocol import schemas
from neuro_dask.protocol.schemas import SchemaError, check

GOOD = {
    "neuro_routes": {"model": "mixtral-0123456789ab"},
    "neuro_request_begin": {"model": "m", "account": "alice", "expert_tokens": 640, "tier": "standard"},
    "neuro_unreachable": {"worker": "tls://10.0.0.1:4000", "model": "m", "experts": [[0, 1], [3, 7]]},
    "neuro_report_load": {"model": "m", "load": [[0, 1, 12.0], [1, 0, 3]]},
    "neuro_report_outcomes": {
        "model": "m",
        "outcomes": [["tls://10.0.0.1:4000", "validated", "c1", 0, 1, 4, "r1"]],
        "receipts": [],
        "batch": "b1",
    },
    "neuro_pause": {"worker": "tls://10.0.0.1:4000", "paused": True, "reason": "owner busy"},
    "neuro_expert": {
        "model": "m",
        "layer": 0,
        "experts": [0, 3],
        "counts": [2, 1],
        "dtype": "float32",
        "hidden": 4,
        "data": b"\0" * 48,
        "call": "c1",
        "request": "r1",
    },
    "neuro_cancel": {"calls": ["c1", "c2"]},
}


@pytest.mark.parametrize("op", sorted(GOOD))
def test_well_formed_messages_pass(op):
    check(op, GOOD[op])


@pytest.mark.parametrize(
    "op, change, path",
    [
        ("neuro_routes", {"model": 7}, "model"),
        ("neuro_routes", {"extra": 1}, "extra"),  # unknown fields are refused, not ignored
        ("neuro_routes", {"model": "x" * 1000}, "model"),
        ("neuro_request_begin", {"expert_tokens": True}, "expert_tokens"),  # a bool is not an integer
        ("neuro_request_begin", {"expert_tokens": -1}, "expert_tokens"),
        ("neuro_request_begin", {"tier": "gold"}, "tier"),
        ("neuro_request_begin", {"account": "alice\nbob"}, "account"),
        ("neuro_unreachable", {"experts": [[0, 1]] * 5000}, "experts"),  # bounded count
        ("neuro_unreachable", {"experts": [[0, "1"]]}, "experts[0][1]"),
        ("neuro_report_load", {"load": [[0, 1, math.inf]]}, "load[0][2]"),
        ("neuro_report_load", {"load": [[0, 1, math.nan]]}, "load[0][2]"),
        ("neuro_report_outcomes", {"outcomes": [["w", "validated", "c1", 0, 1, 4, "r1", True]]}, "outcomes[0]"),
        ("neuro_pause", {"paused": 1}, "paused"),
        ("neuro_expert", {"dtype": "object"}, "dtype"),
        ("neuro_expert", {"hidden": 2**40}, "hidden"),
        ("neuro_expert", {"data": "not bytes"}, "data"),
        ("neuro_cancel", {"calls": ["c"] * 2000}, "calls"),
    ],
)
def test_malformed_messages_name_the_field(op, change, path):
    msg = {**GOOD[op], **change}
    with pytest.raises(SchemaError) as err:
        check(op, msg)
    assert err.value.path == path
    assert err.value.op == op and path in str(err.value)


def test_a_missing_field_is_named():
    with pytest.raises(SchemaError, match="model is missing"):
        check("neuro_routes", {})


def test_opaque_fields_are_bounded_in_depth_and_size():
    deep: object = 1
    for _ in range(50):
        deep = [deep]
    heartbeat = {"address": "tls://10.0.0.1:1", "metrics": {"x": deep}}
    with pytest.raises(SchemaError, match="deeper"):
        check("heartbeat_worker", heartbeat)
    with pytest.raises(SchemaError, match="more than"):
        check("heartbeat_worker", {"address": "tls://10.0.0.1:1", "metrics": {"x": list(range(100_000))}})
    with pytest.raises(SchemaError, match="not plain data"):
        check("heartbeat_worker", {"address": "tls://10.0.0.1:1", "metrics": {"x": object()}})


def test_ops_without_a_schema_are_not_checked_here():
    check("neuro_publish", {"anything": object()})  # operator-only: roles.py keeps others out
    assert not schemas.has_schema("neuro_publish")


def test_every_rate_class_has_a_budget():
    from neuro_dask.security.guards import RateBook

    for cls in {*schemas.RATE_CLASSES.values(), schemas.DEFAULT_RATE_CLASS}:
        assert cls in RateBook.MULTIPLES


@settings(max_examples=300, deadline=None)
@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20) | st.binary(max_size=20),
        lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
        max_leaves=30,
    ),
    st.sampled_from(sorted(schemas.SCHEMAS)),
)
def test_any_plain_value_is_accepted_or_refused_with_a_schema_error(value, op):
    try:
        check(op, value if isinstance(value, dict) else {"x": value})
    except SchemaError:
        pass
