"""Every neuro_dask operation as a typed message both ends share (protocol/messages.py)."""

from __future__ import annotations

import asyncio

import pytest

from neuro_dask.protocol import messages, schemas
from neuro_dask.protocol.messages import (
    MESSAGES,
    Cancel,
    Dispute,
    ExpertsLoaded,
    Pause,
    ReportCalls,
    ReportLoad,
    ReportOutcomes,
    ReportPasses,
    RequestBegin,
    RequestEnd,
    Routes,
    Unreachable,
    VolunteerStatus,
    WorkerStatus,
    receiver,
)
from neuro_dask.protocol.records import CallReport, OutcomeReport, PassReport, PathReport
from neuro_dask.protocol.shapes import SchemaError

W = "tcp://127.0.0.1:4000"
RELAYED = "relay://203.0.113.1:8788/abcdefghijklmnopqrst"
OUTCOME = OutcomeReport(W, "validated", "call-1", 2, 5, 3, "req-1")
CALL = CallReport(1, 2, (W,), 0.01, 2, 0, "ok", "direct", 12, "req-1")

SAMPLES = [
    Routes("adder-1234"),
    RequestBegin("adder-1234", "alice", 40, "private"),
    RequestEnd("req-1"),
    ReportOutcomes("adder-1234", (OUTCOME,), ({"worker": "w1", "rows": 3},), "batch-1"),
    ReportLoad("adder-1234", ((0, 1, 3.0), (1, 7, 0.5))),
    ReportCalls("adder-1234", (CALL,), "direct"),
    ReportCalls("adder-1234", (CALL,), "direct", (PathReport(RELAYED, "punched", 12.5), PathReport(W, "direct"))),
    ReportPasses("adder-1234", (PassReport(4, 3, "req-1"), PassReport(0, 0))),
    Unreachable(W, "adder-1234", ((0, 1), (0, 2))),
    Dispute("adder-1234", {"receipt": {"a": 1}, "expert": 3}),
    ExpertsLoaded(W, "adder-1234", ((0, 1),), ((0, 2, "out of memory"),), "int8"),
    Pause(W, True, "other processes use 98% CPU"),
    VolunteerStatus("alice-laptop"),
    Cancel(("call-1", "call-2")),
    WorkerStatus(),
]


def test_every_message_has_a_sample_here():
    assert {type(m) for m in SAMPLES} == set(MESSAGES)


@pytest.mark.parametrize("message", SAMPLES, ids=lambda m: type(m).__name__)
def test_a_message_reads_back_as_itself_from_its_wire_form(message):
    wire = message.to_msg()
    assert type(message).from_msg(wire) == message
    # plain msgpack data only: lists and maps, never a tuple or a record object
    assert _plain(wire), wire


def _plain(value) -> bool:
    if isinstance(value, dict):
        return all(isinstance(k, str) and _plain(v) for k, v in value.items())
    if isinstance(value, list):
        return all(_plain(v) for v in value)
    return value is None or isinstance(value, (str, int, float, bool, bytes))


@pytest.mark.parametrize("message", MESSAGES, ids=lambda m: m.__name__)
def test_the_hardened_schema_of_each_operation_is_its_messages(message):
    assert schemas.SCHEMAS[message.OP] is message.SCHEMA
    assert schemas.has_schema(message.OP)


@pytest.mark.parametrize(
    "message, msg, field",
    [
        (Pause, {"worker": W, "paused": "yes"}, "paused"),  # a string is not a boolean
        (Pause, {"worker": W, "paused": True, "admin": True}, "admin"),  # unknown fields are refused
        (Pause, {"paused": True}, "worker"),  # missing
        (RequestBegin, {"model": "m", "expert_tokens": -1}, "expert_tokens"),
        (RequestBegin, {"model": "m", "tier": "platinum"}, "tier"),
        (RequestBegin, {"model": "m", "account": "a" * 65}, "account"),
        (RequestEnd, {"request": "../../etc"}, "request"),
        (Unreachable, {"worker": W, "model": "m", "experts": [[0, 1, 2]]}, "experts[0]"),
        (ReportLoad, {"model": "m", "load": [[0, 1, float("inf")]]}, "load[0][2]"),
        (ExpertsLoaded, {"worker": W, "model": "m", "loaded": [[True, 1]], "failed": []}, "loaded[0][0]"),
        (Cancel, {"calls": ["x"] * 1_001}, "calls"),
        (ReportCalls, {"model": "m", "calls": [], "paths": [[RELAYED, "punched", 1.0]] * 257}, "paths"),
        (WorkerStatus, {"everything": True}, "everything"),
    ],
)
def test_a_hostile_message_is_refused_naming_the_field(message, msg, field):
    with pytest.raises(SchemaError) as caught:
        message.from_msg(msg)
    assert caught.value.op == message.OP and caught.value.path == field


def test_a_malformed_row_costs_only_that_row():
    bad_kind = [W, "excellent", "c", 0, 0, 1, "r"]  # the schema's shape, not an outcome kind
    msg = {"model": "m", "outcomes": [OUTCOME.to_msg(), bad_kind]}
    report = ReportOutcomes.from_msg(msg)
    assert report.outcomes == (OUTCOME,) and report.dropped == 1

    calls = ReportCalls.from_msg({"model": "m", "calls": [CALL.to_msg(), [1, 2], "nonsense"]})
    assert calls.calls == (CALL,) and calls.dropped == 2


def test_a_pass_cannot_keep_more_than_it_drafted_nor_draft_without_bound():
    raw = {"model": "m", "passes": [[4, 5, ""], [5000, 1, ""], [3, -1, ""], [2, 2, "../x"], [8, 8, "r-1"]]}
    report = ReportPasses.from_msg(raw)
    assert report.passes == (PassReport(8, 8, "r-1"),) and report.dropped == 4


def test_a_path_row_that_is_not_one_of_the_paths_costs_only_that_row():
    """A client's paths move nothing but the dashboard's path column; each row is still checked."""
    good = [RELAYED, "lan", 0.4]
    bad = [
        [RELAYED, "teleported", 1.0],  # not a path
        [RELAYED, "punched", -5.0],  # a negative round trip
        [RELAYED, "punched", float("nan")],
        [RELAYED, "punched", True],
        ["x" * 230, "punched", 1.0],  # an address beyond the bound
        [RELAYED, "punched"],
    ]
    report = ReportCalls.from_msg({"model": "m", "calls": [CALL.to_msg()], "paths": [good, *bad]})
    assert report.paths == (PathReport(RELAYED, "lan", 0.4),) and report.dropped == len(bad)
    assert report.calls == (CALL,)


def test_a_call_report_of_an_older_client_reads_with_rows_unsaid():
    short = CALL.to_msg()[:8]
    [read] = ReportCalls.from_msg({"model": "m", "calls": [short]}).calls
    assert not read.says_rows and read.request == ""


def test_send_calls_the_operation_with_the_messages_keyword_arguments():
    class Rpc:
        def __getattr__(self, op):
            async def call(**kwargs):
                return op, kwargs

            return call

    op, kwargs = asyncio.run(RequestEnd("req-1").send(Rpc()))
    assert (op, kwargs) == ("neuro_request_end", {"request": "req-1"})


class Handlers:
    def __init__(self):
        self.seen = []

    def pause(self, msg: Pause):
        self.seen.append(msg)
        return {"status": "OK"}

    def with_comm(self, comm, msg: Pause):
        self.seen.append((comm, msg))
        return {"status": "OK"}

    async def later(self, comm, msg: RequestEnd):
        self.seen.append(msg)
        return {"status": "OK", "request": msg.request}


def test_a_receiver_hands_its_method_the_typed_message():
    h = Handlers()
    assert receiver(Pause, h.pause)(None, worker=W, paused=False) == {"status": "OK"}
    assert receiver(Pause, h.with_comm)("comm", worker=W, paused=True, reason="busy") == {"status": "OK"}
    assert h.seen == [Pause(W, False), ("comm", Pause(W, True, "busy"))]
    reply = asyncio.run(receiver(RequestEnd, h.later)(None, request="req-9"))
    assert reply == {"status": "OK", "request": "req-9"} and h.seen[-1] == RequestEnd("req-9")


def test_a_receiver_answers_a_malformed_message_and_never_runs_its_method():
    h = Handlers()
    reply = receiver(Pause, h.pause)(None, worker=W, paused=1)
    assert reply["status"] == "error" and reply["field"] == "paused" and "neuro_pause" in reply["message"]
    reply = asyncio.run(receiver(RequestEnd, h.later)(None, request="r", extra="x"))
    assert reply["status"] == "error" and reply["field"] == "extra"
    assert h.seen == []


def test_dask_passes_a_receiver_its_comm():
    from distributed.core import _expects_comm

    assert _expects_comm(receiver(Pause, Handlers().pause))  # whatever the method's own signature
    assert receiver(Pause, Handlers().pause).message is Pause


def test_two_messages_never_share_an_operation():
    assert len(messages.BY_OP) == len(MESSAGES)
