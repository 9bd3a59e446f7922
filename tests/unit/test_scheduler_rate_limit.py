"""A hardened scheduler limits each client's requests (registrations, ledger holds, publications)."""

from __future__ import annotations

from neuro_dask.security.events import security_log
from neuro_dask.security.guards import GuardedHandlers, _rate_key
from neuro_dask.security.identity import PeerIdentity
from neuro_dask.security.limits import RateLimiter
from neuro_dask.security.roles import scheduler_decision


class FakeComm:
    extra_info: dict = {}

    def __init__(self, peer):
        self.peer_address = peer


def _handlers(clock):
    return GuardedHandlers({"neuro_ledger_hold": lambda account: {"status": "OK", "account": account},
                            "neuro_routes": lambda model: {"status": "OK"}},
                           lambda op, role: scheduler_decision(op, role, roles_required=False),
                           limiter=RateLimiter(6, clock, burst=2), limited=frozenset({"neuro_ledger_hold"}))


def test_a_client_over_its_rate_is_refused_and_reported_then_admitted_again():
    now = [0.0]
    handlers = _handlers(lambda: now[0])
    security_log.clear()
    comm = FakeComm("tcp://10.0.0.5:40001")
    assert [handlers["neuro_ledger_hold"](comm, account="a")["status"] for _ in range(3)] == ["OK", "OK",
                                                                                          "uncaught-error"]
    refused = security_log.events("refused-op")
    assert refused and refused[-1].peer == "tcp://10.0.0.5:40001" and "too many requests" in refused[-1].detail
    # Another connection from the same host is the same client; another host is not.
    assert handlers["neuro_ledger_hold"](FakeComm("tcp://10.0.0.5:40002"), account="a")["status"] == "uncaught-error"
    assert handlers["neuro_ledger_hold"](FakeComm("tcp://10.0.0.6:40003"), account="b")["status"] == "OK"
    now[0] += 10.0  # 6 per minute: one request back every 10 s
    assert handlers["neuro_ledger_hold"](comm, account="a")["status"] == "OK"
    # Operations outside the limited set are never counted.
    assert all(handlers["neuro_routes"](comm, model="m")["status"] == "OK" for _ in range(20))


def test_a_certificate_is_one_client_wherever_it_connects_from():
    who = PeerIdentity("client", "alice")
    assert _rate_key(who, "tls://10.0.0.5:1") == _rate_key(who, "tls://10.0.0.9:2") == "client:alice"
    assert _rate_key(None, "tls://10.0.0.5:1") == "tls://10.0.0.5"


def test_a_worker_certificate_speaks_only_for_its_own_worker():
    from types import SimpleNamespace

    from neuro_dask.security.guards import _names_itself

    scheduler = SimpleNamespace(workers={"tls://a:1": SimpleNamespace(name="alice"),
                                         "tls://b:1": SimpleNamespace(name="bob")})
    alice = PeerIdentity("worker", "alice")
    assert _names_itself(scheduler, "neuro_pause", alice, {"worker": "tls://a:1"}) is None
    assert "its own worker" in _names_itself(scheduler, "neuro_pause", alice, {"worker": "tls://b:1"})
    assert "its own worker" in _names_itself(scheduler, "neuro_experts_loaded", alice, {"worker": "tls://zz:1"})
    assert _names_itself(scheduler, "neuro_routes", alice, {"worker": "tls://b:1"}) is None  # not a self op
    assert _names_itself(scheduler, "neuro_pause", None, {"worker": "tls://b:1"}) is None  # no TLS: no names
