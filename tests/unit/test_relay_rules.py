"""The relay's rules (relay/protocol.py, relay/book.py): header lines from peers nobody trusts,
who holds which id, single-use dials, and when volunteers come back."""

from __future__ import annotations

import json
import random
import secrets

import pytest

from neuro_dask.relay.book import RelayBook, RelayRefusal, comeback_delays, reconnect_delay
from neuro_dask.relay.protocol import (
    FROM_RELAY,
    MAX_LINE,
    TO_RELAY,
    HeaderError,
    decode,
    encode,
    volunteer_id,
)

KEY = secrets.token_urlsafe(32)


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


# ---- header lines ---------------------------------------------------------------------------------


def test_every_header_round_trips():
    vid = volunteer_id(KEY)
    token = secrets.token_urlsafe(24)
    lines = {
        "register": {"key": KEY},
        "ping": {},
        "accept": {"token": token},
        "connect": {"id": vid},
        "registered": {"id": vid, "ping": 10.0},
        "pong": {},
        "dial": {"token": token},
        "bye": {"retry_after": 12.5},
        "connected": {},
        "refused": {"reason": "no volunteer with this id"},
        "punch": {"id": vid},
        "introduced": {"token": token},
        "introduce": {"token": token, "peer": "203.0.113.7:40123"},
        "peer": {"addr": "[2001:db8::1]:443"},
    }
    for op, fields in lines.items():
        header = decode(encode(op, **fields), TO_RELAY | FROM_RELAY)
        assert header.op == op and header.fields == fields


@pytest.mark.parametrize(
    "line, why",
    [
        (b'{"op":"connect","id":"aaaaaaaaaaaaaaaaaaaa"}', "one line"),  # no newline
        (b'{"op":"connect","id":"' + b"a" * 2000 + b'"}\n', "one line"),
        (b"[1, 2]\n", "JSON object with an op"),
        (b"not json\n", "JSON object"),
        (b"[" * 1000 + b"\n", "JSON object"),
        (b'{"op":"dial","token":"aaaaaaaaaaaaaaaaaaaa"}\n', "not allowed"),  # a relay's line, sent to the relay
        (b'{"op":"connect"}\n', "exactly"),
        (b'{"op":"connect","id":"aaaaaaaaaaaaaaaaaaaa","extra":1}\n', "exactly"),
        (b'{"op":"connect","id":"../../etc/passwdxxxx"}\n', "bad id"),
        (b'{"op":"connect","id":7}\n', "bad id"),
        (b'{"op":"register","key":"short"}\n', "bad key"),
        (b'{"op":"accept","token":"has spaces in it!!"}\n', "bad token"),
        (b'{"op":"shutdown"}\n', "not allowed"),
    ],
)
def test_the_relay_refuses_any_other_line(line, why):
    with pytest.raises(HeaderError, match=why):
        decode(line, TO_RELAY)


@pytest.mark.parametrize(
    "fields",
    [{"retry_after": -1}, {"retry_after": 10**9}, {"retry_after": float("nan")}, {"retry_after": True}],
)
def test_a_volunteer_refuses_a_relay_that_would_send_it_away_forever(fields):
    line = json.dumps({"op": "bye", **fields}).encode() + b"\n"
    with pytest.raises(HeaderError, match="retry_after"):
        decode(line, FROM_RELAY)


@pytest.mark.parametrize(
    "addr", ["example.com:80", "10.0.0.1", "10.0.0.1:0", "10.0.0.1:70000", "999.1.1.1:80", "[::1:80", 7, "a" * 80]
)
def test_a_peer_address_is_an_ip_and_a_port_and_nothing_else(addr):
    line = json.dumps({"op": "peer", "addr": addr}).encode() + b"\n"
    with pytest.raises(HeaderError, match="addr"):
        decode(line, FROM_RELAY)


def test_a_refusal_reason_is_printable_and_short():
    with pytest.raises(HeaderError):
        decode(json.dumps({"op": "refused", "reason": "\x1b[31mred"}).encode() + b"\n", FROM_RELAY)
    with pytest.raises(HeaderError):
        decode(json.dumps({"op": "refused", "reason": "x" * 500}).encode() + b"\n", FROM_RELAY)
    assert len(encode("refused", reason="y" * 200)) < MAX_LINE


def test_the_id_is_the_keys_and_does_not_reveal_it():
    assert volunteer_id(KEY) == volunteer_id(KEY)
    assert volunteer_id(KEY) != volunteer_id(secrets.token_urlsafe(32))
    assert KEY[:8] not in volunteer_id(KEY)
    decode(encode("connect", id=volunteer_id(KEY)), TO_RELAY)  # a valid id on the wire


# ---- who holds which id --------------------------------------------------------------------------


def test_a_reconnecting_volunteer_keeps_its_id_and_its_newest_connection_wins():
    book = RelayBook(Clock())
    first, second = object(), object()
    vid, replaced = book.register(KEY, first)
    assert replaced is None
    again, replaced = book.register(KEY, second)
    assert again == vid and replaced is first
    assert not book.unregister(vid, first)  # the old connection's end does not remove the new one
    assert book.volunteers[vid] is second
    assert book.unregister(vid, second) and vid not in book.volunteers


def test_another_key_cannot_claim_a_volunteers_id():
    book = RelayBook(Clock())
    vid, _ = book.register(KEY, object())
    other, _ = book.register(secrets.token_urlsafe(32), object())
    assert other != vid and len(book.volunteers) == 2


def test_a_full_relay_refuses_newcomers_but_not_returning_volunteers():
    book = RelayBook(Clock(), max_volunteers=1)
    book.register(KEY, object())
    with pytest.raises(RelayRefusal, match="as many volunteers"):
        book.register(secrets.token_urlsafe(32), object())
    book.register(KEY, object())  # the same volunteer again


# ---- dials -------------------------------------------------------------------------------------------


def test_a_dial_is_for_a_connected_volunteer_and_answered_once():
    clock = Clock()
    book = RelayBook(clock)
    with pytest.raises(RelayRefusal, match="no volunteer"):
        book.open_dial(volunteer_id(KEY), "caller")
    vid, _ = book.register(KEY, object())
    token = book.open_dial(vid, "caller")
    dial = book.take_dial(token)
    assert dial is not None and dial.volunteer == vid and dial.caller == "caller"
    assert book.take_dial(token) is None  # a replayed accept finds nothing
    assert book.take_dial(secrets.token_urlsafe(24)) is None


def test_an_unanswered_dial_expires():
    clock = Clock()
    book = RelayBook(clock, dial_timeout=10.0)
    vid, _ = book.register(KEY, object())
    late = book.open_dial(vid, "a")
    clock.now = 5.0
    fresh = book.open_dial(vid, "b")
    clock.now = 11.0
    assert [d.caller for d in book.expired()] == ["a"]
    assert book.take_dial(late) is None
    assert book.take_dial(fresh) is not None


def test_one_volunteer_cannot_be_flooded_with_waiting_dials():
    book = RelayBook(Clock(), max_pending_per_volunteer=3)
    vid, _ = book.register(KEY, object())
    for _ in range(3):
        book.open_dial(vid, "c")
    with pytest.raises(RelayRefusal, match="too many"):
        book.open_dial(vid, "c")


# ---- pacing -------------------------------------------------------------------------------------------


def test_comeback_delays_spread_volunteers_over_the_window():
    delays = comeback_delays(1000, 30.0, random.Random(1))
    assert len(delays) == 1000 and all(0 <= d <= 30.0 for d in delays)
    per_second = [sum(1 for d in delays if s <= d < s + 1) for s in range(30)]
    assert max(per_second) <= 40  # evenly: about 33 a second, never a stampede
    assert comeback_delays(0, 30.0) == []


def test_reconnect_backoff_grows_is_capped_and_jittered():
    rng = random.Random(2)
    first = [reconnect_delay(0, rng=rng) for _ in range(100)]
    later = [reconnect_delay(20, rng=rng) for _ in range(100)]
    assert all(0.25 <= d <= 0.5 for d in first)
    assert all(15.0 <= d <= 30.0 for d in later)
    assert len(set(later)) > 50


# ---- hardened mode reads relay comms --------------------------------------------------------------


def test_hardened_mode_covers_relay_listeners_and_enforces_roles_when_they_run_tls():
    from types import SimpleNamespace

    from neuro_dask.security.guards import roles_required_for

    plain = SimpleNamespace(prefix="relay://", encrypted=False)
    tls = SimpleNamespace(prefix="relay://", encrypted=True)
    assert roles_required_for(SimpleNamespace(listeners=[plain])) is False
    assert roles_required_for(SimpleNamespace(listeners=[tls])) is True
    assert roles_required_for(SimpleNamespace(listeners=[SimpleNamespace(prefix="tls://")])) is True
    with pytest.raises(RuntimeError, match="not ws://"):
        roles_required_for(SimpleNamespace(listeners=[SimpleNamespace(prefix="ws://")]))
