"""A hardened scheduler limits each peer's requests per class of operation (guards.RateBook)."""

from __future__ import annotations

from neuro_dask.security.events import security_log
from neuro_dask.security.guards import GuardedHandlers, RateBook
from neuro_dask.security.identity import PeerIdentity
from neuro_dask.security.identity import peer_key as _rate_key
from neuro_dask.security.roles import scheduler_decision


class FakeComm:
    extra_info: dict = {}

    def __init__(self, peer):
        self.peer_address = peer


def _handlers(clock):
    rates = RateBook(6, clock)  # requests: 6 a minute (a burst of 1); control ops: 60 a minute
    return GuardedHandlers(
        {
            "neuro_request_begin": lambda model, request: {"status": "OK", "request": request},
            "neuro_routes": lambda model: {"status": "OK"},
        },
        lambda op, role: scheduler_decision(op, role, roles_required=False),
        rates=rates,
    )


def _begin(handlers, comm):
    return handlers["neuro_request_begin"](comm, model="m", request="r")["status"]


def test_a_client_over_its_rate_is_refused_and_reported_then_admitted_again():
    now = [0.0]
    handlers = _handlers(lambda: now[0])
    security_log.clear()
    comm = FakeComm("tcp://10.0.0.5:40001")
    assert [_begin(handlers, comm) for _ in range(2)] == ["OK", "uncaught-error"]
    refused = security_log.events("refused-op")
    assert refused and refused[-1].peer == "tcp://10.0.0.5:40001" and "too many requests" in refused[-1].detail
    # Another connection from the same host is the same client; another host is not.
    assert _begin(handlers, FakeComm("tcp://10.0.0.5:40002")) == "uncaught-error"
    assert _begin(handlers, FakeComm("tcp://10.0.0.6:40003")) == "OK"
    now[0] += 10.0  # 6 per minute: one request back every 10 s
    assert _begin(handlers, comm) == "OK"
    # Another class of operation has its own bucket (control: 10 x the rate, a burst of 10).
    assert [handlers["neuro_routes"](comm, model="m")["status"] for _ in range(11)] == ["OK"] * 10 + ["uncaught-error"]


def test_the_operator_is_not_rate_limited():
    handlers = _handlers(lambda: 0.0)
    rates = handlers.rates
    operator = PeerIdentity("operator", "op")
    assert all(rates.wait("neuro_request_begin", operator, "tls://10.0.0.5:1") == 0.0 for _ in range(100))


def test_a_certificate_is_one_client_wherever_it_connects_from():
    who = PeerIdentity("client", "alice")
    assert _rate_key(who, "tls://10.0.0.5:1") == _rate_key(who, "tls://10.0.0.9:2") == "client:alice"
    assert _rate_key(None, "tls://10.0.0.5:1") == "tls://10.0.0.5"


def test_a_worker_certificate_speaks_only_for_its_own_worker():
    from types import SimpleNamespace

    from neuro_dask.security.guards import _names_itself

    scheduler = SimpleNamespace(
        workers={"tls://a:1": SimpleNamespace(name="alice"), "tls://b:1": SimpleNamespace(name="bob")}
    )
    alice = PeerIdentity("worker", "alice")
    assert _names_itself(scheduler, "neuro_pause", alice, {"worker": "tls://a:1"}) is None
    assert "its own worker" in _names_itself(scheduler, "neuro_pause", alice, {"worker": "tls://b:1"})
    assert "its own worker" in _names_itself(scheduler, "neuro_experts_loaded", alice, {"worker": "tls://zz:1"})
    assert _names_itself(scheduler, "neuro_routes", alice, {"worker": "tls://b:1"}) is None  # not a self op
    assert _names_itself(scheduler, "neuro_pause", None, {"worker": "tls://b:1"}) is None  # no TLS: no names
