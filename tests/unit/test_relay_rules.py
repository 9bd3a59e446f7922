"""The relay's rules (relay/protocol.py, relay/book.py): header lines from peers nobody trusts,
who holds which id, single-use dials, and when volunteers come back."""

from __future__ import annotations

import json
import secrets

import pytest

from neuro_dask.relay.book import RelayBook, RelayRefusal
from neuro_dask.relay.protocol import (
    FROM_RELAY,
    MAX_LINE,
    ON_STREAM,
    TO_RELAY,
    HeaderError,
    decode,
    encode,
    faster_path,
    punch_candidates,
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
        "connect": {"id": vid, "probes": 3},
        "registered": {"id": vid, "ping": 10.0},
        "pong": {},
        "dial": {"token": token, "probes": 0},
        "bye": {"retry_after": 12.5},
        "connected": {},
        "refused": {"reason": "no volunteer with this id"},
        "punch": {"id": vid, "lan": "192.168.1.2:40123", "probes": 3},
        "introduced": {"token": token, "lan": "192.168.1.3:50000"},
        "introduce": {"token": token, "probes": 3},
        "peer": {"addr": "[2001:db8::1]:443", "lan": "[fe80::1]:40000", "you": "203.0.113.7:40123"},
        "probe": {},
        "echo": {},
    }
    for op, fields in lines.items():
        header = decode(encode(op, **fields), TO_RELAY | FROM_RELAY | ON_STREAM)
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
        (b'{"op":"connect","id":"aaaaaaaaaaaaaaaaaaaa","probes":0,"extra":1}\n', "exactly"),
        (b'{"op":"connect","id":"../../etc/passwdxxxx","probes":0}\n', "bad id"),
        (b'{"op":"connect","id":7,"probes":0}\n', "bad id"),
        (b'{"op":"connect","id":"aaaaaaaaaaaaaaaaaaaa","probes":9}\n', "bad probes"),  # more echoes than allowed
        (b'{"op":"connect","id":"aaaaaaaaaaaaaaaaaaaa","probes":true}\n', "bad probes"),
        (b'{"op":"punch","id":"aaaaaaaaaaaaaaaaaaaa","lan":"localhost:80","probes":0}\n', "bad lan"),
        (b'{"op":"probe"}\n', "not allowed"),  # a stream's line, sent to the relay
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
    line = json.dumps({"op": "peer", "addr": addr, "lan": "192.168.1.2:40000", "you": "10.0.0.2:1234"}).encode() + b"\n"
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
    decode(encode("connect", id=volunteer_id(KEY), probes=0), TO_RELAY)  # a valid id on the wire


# ---- where a hole punch dials, and which path is kept ----------------------------------------------


def _peer(addr: str, lan: str, you: str):
    return decode(encode("peer", addr=addr, lan=lan, you=you), FROM_RELAY)


def test_a_punch_dials_the_public_address_and_the_lan_one_only_behind_the_same_router():
    # two homes: public addresses differ, so the peer's LAN address means nothing here
    assert punch_candidates(_peer("203.0.113.7:40001", "192.168.1.2:40001", "198.51.100.9:5000")) == [
        "203.0.113.7:40001"
    ]
    # one router: the relay saw one public address for both
    assert punch_candidates(_peer("203.0.113.7:40001", "192.168.1.2:40001", "203.0.113.7:40002")) == [
        "203.0.113.7:40001",
        "192.168.1.2:40001",
    ]
    assert punch_candidates(_peer("[2001:db8::7]:40001", "[fe80::2]:40001", "[2001:db8::7]:40002"))[1] == (
        "[fe80::2]:40001"
    )


@pytest.mark.parametrize(
    "lan",
    [
        "127.0.0.1:40001",  # this machine's own services
        "[::1]:40001",
        "0.0.0.0:40001",
        "192.168.1.1:22",  # a well-known port: never one a socket bound to port 0 gets
        "192.168.1.1:80",
        "8.8.8.8:40001",  # not a LAN address at all
    ],
)
def test_a_lying_relay_cannot_point_a_lan_dial_at_local_services_or_the_internet(lan):
    assert punch_candidates(_peer("203.0.113.7:40001", lan, "203.0.113.7:40002")) == ["203.0.113.7:40001"]


@pytest.mark.parametrize(
    "rtt, kept",
    [
        ({"relayed": 40.0, "punched": 20.0}, "punched"),
        ({"relayed": 0.21, "punched": 0.35}, "punched"),  # noise-sized: one link beats two
        ({"relayed": 10.0, "punched": 60.0}, "relayed"),  # a punched path round the world
        ({"relayed": 40.0, "punched": 20.0, "lan": 0.4}, "lan"),
        ({"relayed": 5.0}, "relayed"),
        ({"punched": 5.0}, "punched"),
    ],
)
def test_the_faster_path_is_kept_and_two_links_must_clearly_win(rtt, kept):
    assert faster_path(rtt) == kept


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
