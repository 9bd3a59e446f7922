"""The two protocols MoEModel speaks (model/moe.py): an ExpertExecutor runs layers and closes; a
RequestScope begins and ends requests. No probing: a local model has NoRequests, a distributed
one PaidRequests (client/dispatch/requests.py), and its reports live in Reports (reports.py)."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from types import SimpleNamespace

import pytest
from tiny_models import padded_batch

import neuro_dask as nd
from neuro_dask.client.dispatch.private_executor import PrivateExecutor, make_private
from neuro_dask.client.dispatch.reports import MAX_PENDING_CALLS, Reports
from neuro_dask.client.dispatch.requests import PaidRequests, PaymentRefusedError
from neuro_dask.errors import NeuroDaskError
from neuro_dask.model.moe import NoRequests
from neuro_dask.protocol.messages import RequestBegin
from neuro_dask.protocol.records import CallReport, OutcomeReport
from neuro_dask.settings import ClientSettings


class RecordingScope:
    """A RequestScope that remembers what the model asked of it, and which request each thread's
    expert calls worked for."""

    def __init__(self, micro_batches: int = 1):
        self.micro_batches = micro_batches
        self.current_version = None
        self.events: list[tuple] = []
        self._thread = threading.local()
        self._accounts = threading.local()
        self.begun = 0

    def begin(self, expert_tokens: int) -> None:
        self.begun += 1
        self.events.append(("begin", expert_tokens))
        self._thread.stamp = {"request": f"r{self.begun}", "ticket": {"sig": b"t"}}

    def end(self) -> None:
        self.events.append(("end", self.stamp().get("request")))
        self._thread.stamp = {}

    def stamp(self) -> dict:
        return dict(getattr(self._thread, "stamp", {}))

    def note_pass(self, drafted, kept) -> None:
        self.events.append(("pass", drafted, kept))

    @contextlib.contextmanager
    def lane(self, stamp):
        before = self.stamp()
        self._thread.stamp = dict(stamp)
        try:
            yield
        finally:
            self._thread.stamp = before

    @contextlib.contextmanager
    def charging(self, account):
        before = getattr(self._accounts, "who", None)
        self._accounts.who = account
        try:
            yield
        finally:
            self._accounts.who = before

    @property
    def account(self):
        return getattr(self._accounts, "who", None) or "default"


class StampingExecutor:
    """Records the request each expert call works for, as a distributed executor would stamp it."""

    def __init__(self, inner, scope: RecordingScope):
        self.inner, self.scope = inner, scope
        self.seen: set[str] = set()
        self.threads: set[int] = set()
        self.closed = False
        self._lock = threading.Lock()

    def run_layer(self, layer, groups):
        with self._lock:
            self.seen.add(self.scope.stamp().get("request", ""))
            self.threads.add(threading.get_ident())
        return self.inner.run_layer(layer, groups)

    def close(self) -> None:
        self.closed = True


def test_local_executors_and_the_null_scope_declare_the_whole_protocol(sharded):
    model = nd.load(sharded("mixtral"))
    assert isinstance(model.requests, NoRequests) and model.micro_batches == 1
    scope = model.requests
    scope.begin(10)
    assert scope.stamp() == {} and scope.account is None and scope.current_version is None
    with scope.lane({"request": "r"}), scope.charging("alice"):
        assert scope.stamp() == {}
    scope.end()
    model.executor.close()  # a no-op in process
    model.close()


def test_a_generation_is_one_request_and_its_lanes_join_it_without_touching_the_executor(sharded):
    model = nd.load(sharded("mixtral"))
    ids, mask = padded_batch((5, 9, 13, 7), seed=4)
    expected = model.generate(ids, mask, max_new_tokens=5)
    scope = RecordingScope(micro_batches=2)
    model.use_requests(scope)
    model.executor = StampingExecutor(model.executor, scope)
    assert model.micro_batches == 2
    assert (model.generate(ids, mask, max_new_tokens=5) == expected).all()
    assert [e[0] for e in scope.events] == ["begin", "end"]  # one request for the whole generation
    assert model.executor.seen == {"r1"} and len(model.executor.threads) >= 2  # every lane worked for it
    assert "request" not in vars(model.executor)  # nothing is written on the executor
    model.close()
    assert model.executor.closed


def test_charging_and_the_payer_go_through_the_scope(sharded):
    model = nd.load(sharded("mixtral"))
    scope = RecordingScope()
    model.use_requests(scope)
    assert model._payer() == "default"
    with model.charging("alice"):
        assert model._payer() == "alice"
    with model.charging(None):  # no account: the scope is not asked
        assert model._payer() == "default"


# ---- PaidRequests and Reports against a stand-in scheduler -------------------------------------------


class StandInScheduler:
    address = "tcp://scheduler:8786"

    def __init__(self, begin_reply=None):
        self.sent: list[tuple[str, dict]] = []
        self.begin_reply = begin_reply or {"status": "OK", "request": "req-1", "ticket": {"sig": b"s"}, "current": "v2"}

    async def neuro_routes(self, model):
        self.sent.append(("routes", {"model": model}))
        return {"status": "OK", "version": 1, "routes": [[0, 0, ["tcp://w:1"]]]}

    async def neuro_request_begin(self, **kw):
        self.sent.append(("begin", kw))
        return self.begin_reply

    async def neuro_request_end(self, request):
        self.sent.append(("end", {"request": request}))
        return {"status": "OK", "tier": "standard", "fee": 3}

    async def neuro_report_load(self, **kw):
        self.sent.append(("load", kw))

    async def neuro_report_outcomes(self, **kw):
        self.sent.append(("outcomes", kw))

    async def neuro_report_calls(self, **kw):
        self.sent.append(("calls", kw))


class StandInClient:
    def __init__(self, scheduler: StandInScheduler):
        self.scheduler = scheduler

    def sync(self, fn, *args, **kwargs):
        result = fn(*args, **kwargs)
        return asyncio.run(result) if asyncio.iscoroutine(result) else result


def _reports(scheduler: StandInScheduler) -> Reports:
    return Reports(StandInClient(scheduler), "m", "direct", ClientSettings(), clock=lambda: 0.0)


def test_reports_buffer_everything_and_send_it_before_the_routes_in_the_wire_form():
    scheduler = StandInScheduler()
    reports = _reports(scheduler)
    reports.count_load(0, {1: 3, 2: 1})
    reports.count_load(0, {1: 2})
    reports.add_outcomes([OutcomeReport("tcp://w:1", "validated", "c", 0, 1, 5, "req-1")])
    for _ in range(MAX_PENDING_CALLS + 10):
        reports.add_call(CallReport(0, 2, ("tcp://w:1",), 0.01, 2, 0, "ok", "direct", 4, "req-1"))
    reports.note_receipt("tcp://w:1", {"receipt": {"request": "req-1", "seq": 2}})
    reports.note_receipt("tcp://w:1", {"receipt": {"request": "req-1", "seq": 1}})  # older: ignored
    table = reports.flush()
    assert table is not None and table.routes == {(0, 0): ("tcp://w:1",)}
    kinds = [kind for kind, _ in scheduler.sent]
    assert kinds == ["load", "outcomes", "calls", "routes"]
    sent = dict(scheduler.sent[:3])
    assert sorted(sent["load"]["load"]) == [[0, 1, 5], [0, 2, 1]]
    assert sent["outcomes"]["outcomes"] == [["tcp://w:1", "validated", "c", 0, 1, 5, "req-1"]]
    assert sent["outcomes"]["receipts"] == [{"request": "req-1", "seq": 2}]
    assert len(sent["calls"]["calls"]) == MAX_PENDING_CALLS and sent["calls"]["transport"] == "direct"
    scheduler.sent.clear()
    reports.flush()  # nothing pending: only the routes
    assert [kind for kind, _ in scheduler.sent] == ["routes"]


def test_paid_requests_begin_stamp_lanes_and_end_with_the_reports_flushed_first():
    scheduler = StandInScheduler()
    flushed, forgotten = [], []
    settings = ClientSettings(account="alice", micro_batches=3)
    scope = PaidRequests(
        StandInClient(scheduler), "m", settings, flush=lambda: flushed.append(1), forget=forgotten.append
    )
    assert scope.micro_batches == 3 and scope.stamp() == {} and scope.account == "alice"
    with scope.charging("bob"):
        scope.begin(40)
    kind, msg = scheduler.sent[-1]
    assert kind == "begin" and RequestBegin.from_msg(msg) == RequestBegin("m", "bob", 40, "standard")
    assert scope.stamp() == {"request": "req-1", "ticket": {"sig": b"s"}} and scope.current_version == "v2"
    seen = []
    stamp = scope.stamp()
    lane = threading.Thread(target=lambda: seen.append((scope.stamp(), _in_lane(scope, stamp))))
    lane.start()
    lane.join()
    assert seen == [({}, {"request": "req-1", "ticket": {"sig": b"s"}})]  # a fresh thread joins by its stamp
    scope.end()
    assert flushed == [1] and forgotten == ["req-1"] and scope.stamp() == {}
    assert scope.settlements == [{"request": "req-1", "status": "OK", "tier": "standard", "fee": 3}]
    private = scope.priced_at("private")
    private.begin(8)
    assert scheduler.sent[-1][1]["tier"] == "private" and scope.stamp() == private.stamp()  # one thread state
    private.end()
    assert len(scope.settlements) == 2 and scope.tier == "standard"


def _in_lane(scope: PaidRequests, stamp: dict) -> dict:
    with scope.lane(stamp):
        return scope.stamp()


def test_a_refused_request_sends_nothing_and_says_who_pays():
    scheduler = StandInScheduler({"status": "error", "request": "", "message": "insufficient funds"})
    scope = PaidRequests(StandInClient(scheduler), "m", ClientSettings(), flush=lambda: None, forget=lambda r: None)
    with pytest.raises(PaymentRefusedError, match="insufficient funds"):
        scope.begin(1)
    assert scope.stamp() == {}


def test_the_private_tier_delegates_by_name_and_refuses_a_local_model(sharded):
    assert "__getattr__" not in vars(PrivateExecutor)
    private = PrivateExecutor(SimpleNamespace(model_id="m-1", flush_reports=lambda: None))
    assert private.model_id == "m-1" and private.privacy == "private"
    with pytest.raises(AttributeError):
        private.begin_request  # noqa: B018 - requests begin through the scope, not the executor
    with pytest.raises(NeuroDaskError, match="distributed model"):
        make_private(nd.load(sharded("mixtral")))
