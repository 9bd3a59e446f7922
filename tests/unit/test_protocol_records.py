"""neuro_dask.protocol.records: the reports a client sends, typed, with one wire form both ends read."""

from __future__ import annotations

import pytest

from neuro_dask.client.dispatch.trusted import Outcome
from neuro_dask.protocol.records import (
    NO_KEY,
    NOT_HOSTED,
    OTHER,
    PAUSED,
    CallReport,
    OutcomeReport,
    RecordError,
    Refusal,
)
from neuro_dask.protocol.schemas import SchemaError, check

WORKER = "tls://10.0.0.1:4000"


def test_an_outcome_report_round_trips_in_the_wire_form_the_hardened_schema_takes():
    report = OutcomeReport.of(Outcome(WORKER, "validated", "c1", 0, 1, 4), "r1")
    msg = report.to_msg()
    assert msg == [WORKER, "validated", "c1", 0, 1, 4, "r1"]
    check("neuro_report_outcomes", {"model": "m", "outcomes": [msg]})
    assert OutcomeReport.from_msg(msg) == report
    assert OutcomeReport.from_msg(tuple(msg)) == report
    late = OutcomeReport.of(Outcome(WORKER, "late", "c2", 3, -1), "")
    assert OutcomeReport.from_msg(late.to_msg()) == late and late.rows == 0


@pytest.mark.parametrize(
    "bad",
    [
        [WORKER, "validated", "c1", 0, 1, 4, "r1", True],  # 8 fields
        [WORKER, "proven", "c1", 0, 1, 4, "r1"],  # no such kind
        [7, "validated", "c1", 0, 1, 4, "r1"],  # a worker is an address
        [WORKER, "validated", "c1", True, 1, 4, "r1"],  # a bool is no layer
        [WORKER, "validated", "c1", 0, 1, -4, "r1"],  # negative rows
        [WORKER, "validated", "c" * 129, 0, 1, 4, "r1"],  # a cause id past the schema's bound
        {"worker": WORKER},
        None,
    ],
)
def test_a_malformed_outcome_report_is_refused_with_a_value_error(bad):
    with pytest.raises(RecordError) as caught:
        OutcomeReport.from_msg(bad)
    assert isinstance(caught.value, ValueError) and "outcome report" in str(caught.value)


def test_a_call_report_sends_the_long_form_when_it_knows_its_rows_else_the_short_one():
    full = CallReport(2, 3, ("tcp://a:1", "tcp://b:1"), 0.02, 4, 1, "checked", "direct", 12, "req-1")
    assert full.to_msg() == [2, 3, ["tcp://a:1", "tcp://b:1"], 0.02, 4, 1, "checked", "direct", 12, "req-1"]
    assert CallReport.from_msg(full.to_msg()) == full
    private = CallReport(0, 2, ("tcp://a:1",), 0.5, 6, 0, "ok", "private")
    assert private.to_msg() == [0, 2, ["tcp://a:1"], 0.5, 6, 0, "ok", "private"]
    assert CallReport.from_msg(private.to_msg()) == private
    check("neuro_report_calls", {"model": "m", "calls": [full.to_msg(), private.to_msg()], "transport": "direct"})


def test_a_call_report_keeps_what_the_dashboard_shows_within_its_bounds():
    raw = [0, 2, [f"tcp://w{i}:1" + "x" * 300 for i in range(40)], 1, 2, 0, "a-very-long-outcome", "direct"]
    report = CallReport.from_msg(raw)
    assert len(report.workers) == 16 and all(len(w) == 200 for w in report.workers)
    assert report.outcome == "a-very-long-outc" and isinstance(report.seconds, float)
    for bad in (
        [0, 2, ["w"], 0.1, 2, 0, "ok", "direct", 3, "<script>"],
        [0, 2, ["w"], 86_400, 2, 0, "ok", "d"],
        [0, 2, ["w"], 0.1, 2, 0, 5, "direct"],
        [0, 2, [1], 0.1, 2, 0, "ok", "direct"],
    ):
        with pytest.raises(RecordError):
            CallReport.from_msg(bad)


def test_a_record_the_client_builds_passes_the_schema_and_a_bad_one_is_refused_by_both_ends():
    with pytest.raises(SchemaError):
        check("neuro_report_outcomes", {"model": "m", "outcomes": [[WORKER, "validated", "c1", 0, 1, -1, "r"]]})
    with pytest.raises(RecordError):
        OutcomeReport.from_msg([WORKER, "validated", "c1", 0, 1, -1, "r"])


def test_a_workers_refusal_is_read_as_a_code():
    paused = Refusal.from_msg({"status": "error", "message": "paused: other processes use 98% CPU"})
    assert paused == Refusal(PAUSED, "paused: other processes use 98% CPU") and paused.routine
    moved = Refusal.from_msg(
        {
            "status": "error",
            "message": "expert 1 of layer 0 of model 'm' is not hosted here; the client's routes are stale",
        }
    )
    assert moved.code == NOT_HOSTED and moved.routine
    ticket = Refusal.from_msg({"status": "error", "message": "ticket expired"})
    assert ticket.code == OTHER and not ticket.routine
    from neuro_dask.trust.receipts import TicketChecker, TicketError

    with pytest.raises(TicketError) as no_key:  # a worker registered, its ticket key not yet in
        TicketChecker(lambda: 0.0).check({"any": "ticket"}, "m", None)
    keyless = Refusal.from_msg({"status": "error", "message": str(no_key.value)})
    assert keyless.code == NO_KEY and keyless.routine  # the worker's own words, read as routine
    assert Refusal.from_msg({"status": "OK", "data": b""}) is None
    assert Refusal.from_msg(TimeoutError("late")) is None and Refusal.from_msg(None) is None
    assert Refusal.from_msg({"status": "closing"}).code == OTHER


def test_a_refusal_is_read_back_from_the_error_decode_response_raises():
    import torch

    from neuro_dask.protocol.wire import WireFormatError, decode_response

    with pytest.raises(WireFormatError) as caught:
        decode_response({"status": "error", "message": "paused: the owner is typing"}, {0: torch.zeros(1, 2)})
    assert Refusal.from_error(caught.value) == Refusal(PAUSED, "paused: the owner is typing")
    assert Refusal.from_error(TimeoutError("no answer")) is None
