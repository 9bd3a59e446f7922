"""neuro_dask.trust.receipts: tickets, receipts, the worker's tally and the scheduler's book, as attacks."""

from __future__ import annotations

import dataclasses
import threading

import msgpack
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from neuro_dask.errors import NeuroDaskError
from neuro_dask.protocol.wire import encode_request
from neuro_dask.security import signing
from neuro_dask.security.signing import Signer, SigningError
from neuro_dask.trust.receipts import (
    MAX_EXPERTS,
    RECEIPT_TAG,
    TICKET_REASONS,
    TICKET_TAG,
    BookError,
    EvidenceError,
    Held,
    Receipt,
    ReceiptBook,
    RequestTally,
    RequestWork,
    Ticket,
    TicketChecker,
    TicketError,
    digest,
    issue_ticket,
    receipt_mismatch,
    sign_receipt,
    verify_receipt,
)

SCHEDULER, ALICE, BOB = Signer.generate(), Signer.generate(), Signer.generate()
KEYS = {"alice": ALICE.public_der, "bob": BOB.public_der}
SIGNERS = {"alice": ALICE, "bob": BOB}
T0 = 1_900_000_000.0


class Clock:
    def __init__(self, now: float = T0):
        self.now = now

    def __call__(self) -> float:
        return self.now


def ticket(**over) -> Ticket:
    fields = dict(request="req-1", model="m1", account="carol", client="carol", tier="standard", expires=T0 + 60)
    return Ticket(**{**fields, **over})


def receipt(**over) -> Receipt:
    fields = dict(
        worker="alice",
        kind="expert",
        model="m1",
        layer=3,
        step="",
        experts=(1, 5),
        counts=(2, 3),
        dtype="float32",
        hidden=4,
        in_digest=digest(b"in"),
        out_digest=digest(b"out"),
        request="req-1",
        call="c1",
        seq=1,
        rows_total=5,
        units_total=2,
    )
    return Receipt(**{**fields, **over})


def later(r: Receipt, seq: int, rows: int = 5, units: int = 2) -> Receipt:
    """The same worker's receipt after `seq` calls of `rows` rows and `units` experts each."""
    return dataclasses.replace(r, seq=seq, rows_total=seq * rows, units_total=seq * units)


def signed(r: Receipt, signer: Signer | None = None) -> tuple[Receipt, bytes]:
    wire = sign_receipt(signer or SIGNERS[r.worker], r)
    return Receipt.from_wire(msgpack.unpackb(msgpack.packb(wire), raw=False))


def checker(
    required: bool = True, clock: Clock | None = None, key: bytes | None = SCHEDULER.public_der, capacity: int = 4096
) -> TicketChecker:
    c = TicketChecker(clock or Clock(), capacity=capacity)
    c.set_key(key, required)
    return c


# ---- digest -------------------------------------------------------------------------------------


def test_digest_reads_any_byte_buffer_in_place():
    rows = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    data = encode_request("m1", 0, {2: rows})["data"]  # a memoryview over the tensor's memory
    assert isinstance(data, memoryview)
    assert digest(data) == digest(bytes(data)) == digest(bytearray(data))
    assert len(digest(b"")) == 32
    with pytest.raises(TypeError):
        digest("text")  # type: ignore[arg-type]


def test_errors_are_neuro_dask_errors():
    assert issubclass(TicketError, EvidenceError) and issubclass(EvidenceError, NeuroDaskError)
    assert issubclass(BookError, NeuroDaskError)


# ---- tickets ------------------------------------------------------------------------------------


def test_ticket_round_trips_through_msgpack_and_verifies():
    t = ticket()
    wire = msgpack.unpackb(msgpack.packb(issue_ticket(SCHEDULER, t)), raw=False)
    back, sig = Ticket.from_wire(wire)
    assert back == t and signing.verify(SCHEDULER.public_der, back.payload(), sig)


def test_ticket_payload_is_canonical_and_tagged():
    assert ticket(expires=T0 + 60).payload() == ticket(expires=int(T0) + 60).payload()
    assert msgpack.unpackb(ticket().payload())[0] == TICKET_TAG
    assert ticket().payload() != ticket(account="", client="carol").payload()


@pytest.mark.parametrize(
    "field, value",
    [
        ("request", "req-2"),
        ("model", "m2"),
        ("account", "mallory"),
        ("client", "mallory"),
        ("tier", "private"),
        ("expires", T0 + 3600),
    ],
)
def test_a_ticket_changed_after_signing_does_not_verify(field, value):
    sig = Ticket.from_wire(issue_ticket(SCHEDULER, ticket()))[1]
    changed = ticket(**{field: value})
    assert not signing.verify(SCHEDULER.public_der, changed.payload(), sig)
    with pytest.raises(TicketError) as err:
        checker().check(changed.to_wire(sig), changed.model, "carol")
    assert err.value.reason == "bad-signature"


def _edited(wire: dict, over: dict) -> dict:
    """`wire` with the fields of `over` set (or deleted, where the value is KeyError)."""
    for k, v in over.items():
        if v is KeyError:
            del wire[k]
        else:
            wire[k] = v
    return wire


def wire_ticket(**over) -> dict:
    return _edited(issue_ticket(SCHEDULER, ticket()), over)


@pytest.mark.parametrize(
    "wire, field",
    [
        (wire_ticket(request=KeyError), "request"),
        (wire_ticket(sig=KeyError), "sig"),
        (wire_ticket(request=""), "request"),
        (wire_ticket(request="r" * 129), "request"),
        (wire_ticket(request="line\nbreak"), "request"),
        (wire_ticket(request=7), "request"),
        (wire_ticket(model="m" * 129), "model"),
        (wire_ticket(model=""), "model"),
        (wire_ticket(account="a" * 65), "account"),
        (wire_ticket(client="c" * 65), "client"),
        (wire_ticket(client=None), "client"),
        (wire_ticket(tier="gold"), "tier"),
        (wire_ticket(tier=["standard"]), "tier"),
        (wire_ticket(expires=float("nan")), "expires"),
        (wire_ticket(expires=float("inf")), "expires"),
        (wire_ticket(expires=10**400), "expires"),
        (wire_ticket(expires="soon"), "expires"),
        (wire_ticket(expires=True), "expires"),
        (wire_ticket(sig=b""), "sig"),
        (wire_ticket(sig=b"s" * 257), "sig"),
        (wire_ticket(sig="sig"), "sig"),
    ],
)
def test_ticket_from_wire_names_the_bad_field(wire, field):
    with pytest.raises(TicketError) as err:
        Ticket.from_wire(wire)
    assert err.value.field == field and field in str(err.value)


@pytest.mark.parametrize("wire", [None, [], "ticket", {**wire_ticket(), "extra": 1}, {**wire_ticket(), 3: 1}])
def test_ticket_from_wire_refuses_non_tickets(wire):
    with pytest.raises(TicketError):
        Ticket.from_wire(wire)


def test_ticket_fields_are_checked_when_built_too():
    with pytest.raises(TicketError, match="tier"):
        ticket(tier="free")


# ---- the worker's ticket checker ----------------------------------------------------------------


def reason(c: TicketChecker, wire, model="m1", caller="carol") -> str:
    with pytest.raises(TicketError) as err:
        c.check(wire, model, caller)
    return err.value.reason


def test_no_ticket_needed_and_none_sent():
    assert checker(required=False).check(None, "m1", None) is None
    assert checker(required=False, key=None).check(None, "m1", None) is None


def test_a_good_ticket_allows_the_call():
    assert checker().check(issue_ticket(SCHEDULER, ticket()), "m1", "carol") == ticket()


@pytest.mark.parametrize(
    "case, expected",
    [
        ("missing", "missing"),
        ("no scheduler key yet", "no-key"),
        ("no key, ticket sent though not required", "no-key"),
        ("malformed", "malformed"),
        ("signed by another key", "bad-signature"),
        ("expired", "expired"),
        ("model A ticket for model B", "wrong-model"),
        ("presented by another certificate", "other-client"),
    ],
)
def test_ticket_refusals(case, expected):
    good = issue_ticket(SCHEDULER, ticket())
    c, wire, model, caller = checker(), good, "m1", "carol"
    if case == "missing":
        wire = None
    elif case == "no scheduler key yet":
        c = checker(key=None)
    elif case == "no key, ticket sent though not required":
        c = checker(required=False, key=None)
    elif case == "malformed":
        wire = {**good, "tier": "gold"}
    elif case == "signed by another key":
        wire = issue_ticket(Signer.generate(), ticket())
    elif case == "expired":
        c = checker(clock=Clock(T0 + 60))  # at the expiry instant: refused
    elif case == "model A ticket for model B":
        model = "m2"
    elif case == "presented by another certificate":
        caller = "bob"
    assert expected in TICKET_REASONS
    assert reason(c, wire, model, caller) == expected


@pytest.mark.parametrize(
    "ticket_client, caller, allowed",
    [
        ("carol", "carol", True),
        ("carol", None, True),
        ("carol", "", True),  # no TLS name on the connection
        ("", "anyone", True),  # a ticket issued without TLS names no client
        ("carol", "bob", False),
    ],
)
def test_ticket_client_binding(ticket_client, caller, allowed):
    wire = issue_ticket(SCHEDULER, ticket(client=ticket_client))
    if allowed:
        assert checker().check(wire, "m1", caller) is not None
    else:
        assert reason(checker(), wire, caller=caller) == "other-client"


def test_the_ticket_cache_verifies_each_ticket_once(monkeypatch):
    calls = []
    real = signing.verify
    monkeypatch.setattr(signing, "verify", lambda *a: calls.append(a) or real(*a))
    c = checker()
    wire = issue_ticket(SCHEDULER, ticket())
    for _ in range(100):
        assert c.check(wire, "m1", "carol") is not None
    assert len(calls) == 1 and c.verifications == 1
    c.check(issue_ticket(SCHEDULER, ticket(request="req-2")), "m1", "carol")
    assert len(calls) == 2 and c.verifications == 2


def test_the_cache_still_checks_expiry_model_and_client_on_every_call():
    clock = Clock()
    c = checker(clock=clock)
    wire = issue_ticket(SCHEDULER, ticket())
    c.check(wire, "m1", "carol")
    assert reason(c, wire, model="m2") == "wrong-model"
    assert reason(c, wire, caller="bob") == "other-client"
    clock.now = T0 + 61
    assert reason(c, wire) == "expired"
    assert c.verifications == 1


def test_a_cached_signature_moved_onto_another_ticket_is_verified_and_fails():
    c = checker()
    good = issue_ticket(SCHEDULER, ticket())
    c.check(good, "m1", "carol")
    forged = {**good, "model": "m2", "expires": T0 + 10**6}  # the cached signature, a new body
    assert reason(c, forged, model="m2") == "bad-signature"
    assert c.verifications == 2


def test_a_new_scheduler_key_forgets_verified_tickets():
    c = checker()
    wire = issue_ticket(SCHEDULER, ticket())
    c.check(wire, "m1", "carol")
    c.set_key(Signer.generate().public_der, True)
    assert reason(c, wire) == "bad-signature"


def test_set_key_refuses_what_is_not_a_p256_key():
    with pytest.raises(SigningError):
        TicketChecker(Clock()).set_key(b"garbage", True)


def test_the_ticket_cache_is_bounded():
    c = checker(capacity=4)
    for i in range(20):
        c.check(issue_ticket(SCHEDULER, ticket(request=f"r{i}")), "m1", "carol")
    assert len(c._verified) == 4


# ---- receipts -----------------------------------------------------------------------------------


def test_receipt_round_trips_through_msgpack_and_verifies():
    r = receipt()
    back, sig = signed(r)
    assert back == r and back.rows == 5
    assert verify_receipt(ALICE.public_der, back, sig)
    assert msgpack.unpackb(r.payload())[0] == RECEIPT_TAG


ALTERED = {
    "worker": "bob",
    "kind": "share",
    "model": "m2",
    "layer": 4,
    "step": "down",
    "experts": (1, 6),
    "counts": (3, 2),
    "dtype": "bfloat16",
    "hidden": 8,
    "in_digest": digest(b"other in"),
    "out_digest": digest(b"other out"),
    "request": "req-2",
    "call": "c2",
    "seq": 3,
    "rows_total": 12,
    "units_total": 5,
}


@pytest.mark.parametrize("field", sorted(ALTERED))
def test_a_receipt_with_any_field_changed_after_signing_fails_to_verify(field):
    r, sig = signed(later(receipt(), 2))  # seq 2: every single field can change and stay consistent
    over = {field: ALTERED[field]}
    if field in ("kind", "step"):  # a share call has a step and int64 rows
        over.update(kind="share", step="down", dtype="int64")
    changed = dataclasses.replace(r, **over)
    assert changed != r and not verify_receipt(ALICE.public_der, changed, sig)


def test_a_signature_over_another_payload_is_not_a_receipt():
    """Domain separation: what the same key signed as a ticket never verifies as a receipt."""
    r = receipt()
    assert not verify_receipt(ALICE.public_der, r, ALICE.sign(ticket().payload()))
    assert not verify_receipt(ALICE.public_der, "not a receipt", ALICE.sign(r.payload()))  # type: ignore[arg-type]


def wire_receipt(**over) -> dict:
    return _edited(sign_receipt(ALICE, receipt()), over)


@pytest.mark.parametrize(
    "wire, field",
    [
        (wire_receipt(layer=True), "layer"),
        (wire_receipt(layer=-1), "layer"),
        (wire_receipt(layer=2.0), "layer"),
        (wire_receipt(seq=True), "seq"),
        (wire_receipt(seq=0), "seq"),
        (wire_receipt(experts=[1, True]), "experts"),
        (wire_receipt(experts=[1, -5]), "experts"),
        (wire_receipt(experts=[5, 5]), "experts"),
        (wire_receipt(experts=[], counts=[]), "experts"),
        (wire_receipt(experts="15"), "experts"),
        (wire_receipt(experts=list(range(MAX_EXPERTS + 1)), counts=[0] * (MAX_EXPERTS + 1)), "experts"),
        (wire_receipt(counts=[2, -3]), "counts"),
        (wire_receipt(counts=[2, False]), "counts"),
        (wire_receipt(counts=[5]), "counts"),
        (wire_receipt(counts=[2, 1 << 40]), "counts"),
        (wire_receipt(rows_total=4), "rows_total"),
        (wire_receipt(rows_total=6), "rows_total"),  # a first receipt totals its own call only
        (wire_receipt(units_total=1), "units_total"),
        (wire_receipt(seq=3, rows_total=15, units_total=2), "units_total"),  # each call covers >= 1 expert
        (wire_receipt(seq=2, rows_total=(1 << 20) * 2 + 1, units_total=4), "rows_total"),
        (wire_receipt(in_digest=digest(b"x")[:31]), "in_digest"),
        (wire_receipt(out_digest=digest(b"x") + b"!"), "out_digest"),
        (wire_receipt(in_digest=digest(b"x").hex()), "in_digest"),
        (wire_receipt(kind="bribe"), "kind"),
        (wire_receipt(step="down"), "step"),  # an expert call has no step
        (wire_receipt(kind="share", dtype="int64"), "step"),  # a share call has one
        (wire_receipt(kind="share", step="down"), "dtype"),  # shares are int64
        (wire_receipt(dtype="int64"), "dtype"),
        (wire_receipt(dtype="float64"), "dtype"),
        (wire_receipt(hidden=0), "hidden"),
        (wire_receipt(worker=""), "worker"),
        (wire_receipt(worker="w" * 129), "worker"),
        (wire_receipt(request=""), "request"),
        (wire_receipt(call="c" * 129), "call"),
        (wire_receipt(model="bad\x00model"), "model"),
        (wire_receipt(sig=b""), "sig"),
        (wire_receipt(sig=b"s" * 257), "sig"),
        (wire_receipt(seq=KeyError), "seq"),
    ],
)
def test_receipt_from_wire_names_the_bad_field(wire, field):
    with pytest.raises(EvidenceError) as err:
        Receipt.from_wire(wire)
    assert err.value.field == field, err.value


@pytest.mark.parametrize("wire", [None, [1, 2], b"receipt", {**wire_receipt(), "bonus": 10**6}])
def test_receipt_from_wire_refuses_non_receipts(wire):
    with pytest.raises(EvidenceError):
        Receipt.from_wire(wire)


def test_a_share_receipt():
    r = receipt(kind="share", step="gate_up", dtype="int64", hidden=16)
    assert signed(r)[0] == r


def test_receipt_mismatch_tells_the_client_what_differs():
    r = receipt()
    assert (
        receipt_mismatch(r, worker="alice", experts=[1, 5], counts=(2, 3), in_digest=bytearray(digest(b"in"))) is None
    )
    assert "layer" in receipt_mismatch(r, layer=4)
    with pytest.raises(TypeError):
        receipt_mismatch(r, colour="red")


# ---- property tests: whatever a peer sends, a record or EvidenceError -----------------------------

SCALARS = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=140), st.binary(max_size=80))
MSGPACK_LIKE = st.recursive(
    SCALARS,
    lambda inner: st.one_of(st.lists(inner, max_size=6), st.dictionaries(st.text(max_size=12), inner, max_size=6)),
    max_leaves=25,
)


def mutated(base: dict) -> st.SearchStrategy:
    return st.lists(
        st.tuples(st.sampled_from(sorted(base)), st.one_of(st.just(KeyError), MSGPACK_LIKE)), min_size=1, max_size=3
    ).map(lambda edits: {k: v for k, v in {**base, **dict(edits)}.items() if v is not KeyError})


@settings(max_examples=300, deadline=None)
@given(st.one_of(MSGPACK_LIKE, mutated(wire_receipt()), mutated(wire_receipt(experts=[0, 1, 2], counts=[1, 0, 4]))))
def test_receipt_from_wire_returns_or_raises_evidence_error(obj):
    try:
        r, sig = Receipt.from_wire(obj)
    except EvidenceError:
        return
    assert isinstance(r, Receipt) and isinstance(sig, bytes)
    r.payload()  # a parsed receipt can always be checked


@settings(max_examples=300, deadline=None)
@given(st.one_of(MSGPACK_LIKE, mutated(wire_ticket())))
def test_ticket_from_wire_returns_or_raises_ticket_error(obj):
    try:
        t, sig = Ticket.from_wire(obj)
    except TicketError:
        return
    assert isinstance(t, Ticket) and isinstance(sig, bytes)
    t.payload()


@settings(max_examples=100, deadline=None)
@given(
    st.one_of(MSGPACK_LIKE, mutated(wire_ticket())), st.text(max_size=10), st.one_of(st.none(), st.text(max_size=10))
)
def test_ticket_checker_returns_or_raises_ticket_error(obj, model, caller):
    try:
        checker().check(obj, model, caller)
    except TicketError:
        pass


# ---- the worker's tally -------------------------------------------------------------------------


def test_tally_counts_calls_rows_and_units_per_request():
    tally = RequestTally(Clock())
    assert tally.count("a", 2, 1) == (1, 2, 1)
    assert tally.count("b", 7, 3) == (1, 7, 3)
    assert tally.count("a", 3, 2) == (2, 5, 3)


def test_tally_stays_bounded_under_a_flood_of_request_ids():
    tally = RequestTally(Clock(), capacity=1000)
    tally.count("honest", 4, 1)
    for i in range(100_000):
        tally.count(f"flood-{i}", 1, 1)
    assert len(tally) == 1000
    assert tally.count("honest", 4, 1) == (1, 4, 1)  # forgotten: restarts (its later receipts are stale)


def test_tally_keeps_recently_used_requests_over_a_flood():
    tally = RequestTally(Clock(), capacity=10)
    for i in range(100):
        tally.count("busy", 1, 1)
        tally.count(f"flood-{i}", 1, 1)
    assert tally.count("busy", 1, 1) == (101, 101, 101)


def test_tally_forgets_requests_idle_longer_than_ttl():
    clock = Clock()
    tally = RequestTally(clock, ttl=60.0)
    tally.count("a", 1, 1)
    tally.count("b", 1, 1)
    clock.now += 30
    tally.count("b", 1, 1)
    clock.now += 31  # a idle 61 s, b 31 s
    assert tally.count("b", 1, 1) == (3, 3, 3)
    assert len(tally) == 1
    assert tally.count("a", 1, 1) == (1, 1, 1)


def test_tally_is_thread_safe():
    tally = RequestTally(Clock())
    threads = [threading.Thread(target=lambda: [tally.count("r", 2, 1) for _ in range(2000)]) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert tally.count("r", 0, 1) == (16_001, 32_000, 16_001)


@pytest.mark.parametrize("args", [("", 1, 1), ("r" * 129, 1, 1), ("r", -1, 1), ("r", 1, True), ("r", 1.5, 1)])
def test_tally_refuses_bad_counts(args):
    with pytest.raises(EvidenceError):
        RequestTally(Clock()).count(*args)


# ---- the scheduler's book -----------------------------------------------------------------------


def book(tier: str = "standard", client: str = "carol", request: str = "req-1") -> ReceiptBook:
    b = ReceiptBook()
    b.open(request, client=client, account="carol", tier=tier, expires=T0 + 60)
    return b


def offer(b: ReceiptBook, r: Receipt, signer: Signer | None = None, reporter: str | None = "carol") -> str:
    return b.offer(*signed(r, signer), KEYS.get, reporter)


def test_accepted_receipts_are_paid_at_close():
    b = book()
    assert offer(b, receipt()) == "accepted"
    assert offer(b, receipt(worker="bob")) == "accepted"
    assert offer(b, later(receipt(), 3)) == "accepted"
    assert b.held("req-1", "alice") == Held("expert", 3, 15, 6)
    work = b.close("req-1")
    assert work == RequestWork("req-1", "carol", "carol", "standard", {"alice": 15, "bob": 5}, {}, ())
    assert "req-1" not in b and len(b) == 0


@pytest.mark.parametrize("attack", ["signed by another worker's key", "unknown worker", "signature of another receipt"])
def test_forged_receipts_change_nothing(attack):
    b = book()
    r, sig = signed(receipt())
    key_of = KEYS.get
    if attack == "signed by another worker's key":
        sig = signed(receipt(), BOB)[1]  # bob signs "alice did it"
    elif attack == "unknown worker":
        r, sig = signed(receipt(worker="bob"))
        key_of = {"alice": ALICE.public_der}.get
    elif attack == "signature of another receipt":
        sig = signed(receipt(call="c2"))[1]
    assert b.offer(r, sig, key_of, "carol") == "forged"
    assert b.held("req-1", r.worker) is None
    assert b.close("req-1").work == {}


def test_a_forged_receipt_does_not_make_the_genuine_one_stale():
    b = book()
    assert offer(b, later(receipt(), 9), BOB) == "forged"
    assert offer(b, later(receipt(), 2)) == "accepted"


def test_replaying_or_offering_an_older_receipt_is_stale_and_changes_nothing():
    b = book()
    first, newest = receipt(), later(receipt(), 4)
    assert offer(b, first) == "accepted"
    assert offer(b, first) == "stale"  # a replay
    assert offer(b, newest) == "accepted"
    assert offer(b, later(receipt(), 2)) == "stale"  # older
    assert offer(b, newest) == "stale"
    assert b.held("req-1", "alice") == Held("expert", 4, 20, 8)
    assert b.close("req-1").work == {"alice": 20}


@pytest.mark.parametrize(
    "case, expected",
    [
        ("request never opened", "unknown-request"),
        ("request closed", "unknown-request"),
        ("presented by another client", "not-yours"),
        ("presented by the worker itself", "not-yours"),
        ("share receipt on a standard request", "wrong-kind"),
        ("expert receipt on a private request", "wrong-kind"),
    ],
)
def test_receipts_refused_before_their_signature_is_even_checked(case, expected):
    b, r, reporter = book(), receipt(), "carol"
    if case == "request never opened":
        r = receipt(request="req-unknown")
    elif case == "request closed":
        b.close("req-1")
    elif case == "presented by another client":
        reporter = "mallory"
    elif case == "presented by the worker itself":
        reporter = "alice"
    elif case == "share receipt on a standard request":
        r = receipt(kind="share", step="down", dtype="int64")
    elif case == "expert receipt on a private request":
        b = book(tier="private")
    assert offer(b, r, reporter=reporter) == expected
    assert b.held(r.request, "alice") is None


@pytest.mark.parametrize("request_client, reporter", [("carol", None), ("", "anyone"), ("", None)])
def test_without_names_to_compare_any_reporter_may_present(request_client, reporter):
    b = book(client=request_client)
    assert offer(b, receipt(), reporter=reporter) == "accepted"


def test_private_requests_pay_share_rows():
    b = book(tier="private")
    assert offer(b, receipt(kind="share", step="gate_up", dtype="int64", hidden=8)) == "accepted"
    work = b.close("req-1")
    assert work.work == {} and work.share_rows == {"alice": 5} and work.tier == "private"


def test_a_forfeited_worker_is_not_paid_nor_credited():
    b = book()
    offer(b, later(receipt(), 2))
    offer(b, receipt(worker="bob"))
    b.forfeit("req-1", "alice")
    assert b.take_units("req-1", "alice", 1) == 0
    work = b.close("req-1")
    assert work.work == {"bob": 5} and work.forfeited == ("alice",)
    b.forfeit("req-1", "alice")  # closed: nothing to do


def test_take_units_credits_at_most_what_the_worker_signed():
    b = book()
    assert b.take_units("req-1", "alice", 5) == 0  # no receipt yet
    offer(b, later(receipt(), 2))  # units_total 4
    assert b.take_units("req-1", "alice", 3) == 3
    assert b.take_units("req-1", "alice", 3) == 1
    assert b.take_units("req-1", "alice", 3) == 0
    offer(b, later(receipt(), 3))  # units_total 6: two more
    assert b.take_units("req-1", "alice", 10) == 2
    assert [b.take_units("req-1", "alice", n) for n in (-1, 0, True)] == [0, 0, 0]
    assert b.take_units("req-unknown", "alice", 1) == 0
    b.close("req-1")
    assert b.take_units("req-1", "alice", 1) == 0


def test_the_book_refuses_requests_beyond_its_capacity():
    b = ReceiptBook(capacity=2)
    b.open("r1", "carol", "carol", "standard", T0)
    b.open("r2", "carol", "carol", "standard", T0)
    with pytest.raises(BookError, match="open"):
        b.open("r3", "carol", "carol", "standard", T0)
    b.close("r1")
    b.open("r3", "carol", "carol", "standard", T0)
    assert len(b) == 2


@pytest.mark.parametrize(
    "args, field",
    [
        (("req-1", "carol", "carol", "standard", T0), "request"),  # open already
        (("", "carol", "carol", "standard", T0), "request"),
        (("r" * 129, "carol", "carol", "standard", T0), "request"),
        (("r", "c" * 65, "carol", "standard", T0), "client"),
        (("r", "carol", "carol", "gold", T0), "tier"),
        (("r", "carol", "carol", "standard", float("nan")), "expires"),
    ],
)
def test_open_refuses(args, field):
    with pytest.raises(BookError) as err:
        book().open(*args)
    assert err.value.field == field


def test_expired_lists_due_requests_soonest_first():
    b = ReceiptBook()
    for name, expires in (("late", T0 + 30), ("b", T0 + 10), ("a", T0 + 10), ("future", T0 + 100)):
        b.open(name, "carol", "carol", "standard", expires)
    assert b.expired(T0) == []
    assert b.expired(T0 + 30) == ["a", "b", "late"]


def test_closing_twice_pays_once():
    b = book()
    offer(b, receipt())
    assert b.close("req-1").work == {"alice": 5}
    assert b.close("req-1") == RequestWork("req-1", "", "", "")


def test_offer_takes_parsed_receipts_only():
    with pytest.raises(TypeError):
        book().offer(sign_receipt(ALICE, receipt()), b"sig", KEYS.get, "carol")  # type: ignore[arg-type]


# ---- the whole path -----------------------------------------------------------------------------


def test_ticket_to_receipt_to_payment():
    """Scheduler issues, worker checks and tallies and signs, client forwards, scheduler pays."""
    clock = Clock()
    b = ReceiptBook()
    b.open("req-9", "carol", "carol", "standard", T0 + 60)
    wire_t = issue_ticket(SCHEDULER, ticket(request="req-9"))
    worker_checker, tally = checker(clock=clock), RequestTally(clock)
    wires = []
    for layer in range(4):
        rows = torch.randn(6, 4)
        msg = encode_request("m1", layer, {0: rows[:2], 7: rows[2:]})
        t = worker_checker.check(wire_t, msg["model"], "carol")
        seq, rows_total, units_total = tally.count(t.request, 6, 2)
        r = Receipt(
            "alice",
            "expert",
            "m1",
            layer,
            "",
            tuple(msg["experts"]),
            tuple(msg["counts"]),
            msg["dtype"],
            msg["hidden"],
            digest(msg["data"]),
            digest(b"response"),
            t.request,
            "",
            seq,
            rows_total,
            units_total,
        )
        wires.append(sign_receipt(ALICE, r))
    assert worker_checker.verifications == 1
    for wire in reversed(wires):  # arrival order does not matter: only the newest counts
        b.offer(*Receipt.from_wire(wire), KEYS.get, "carol")
    assert b.close("req-9").work == {"alice": 24}
