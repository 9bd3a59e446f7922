"""Tickets and receipts: evidence that a call was allowed and that a worker answered it.

The scheduler signs a *ticket* for each request it has held the fee of; workers serve only calls
that carry a valid one. A worker signs a *receipt* for each answer; the scheduler pays only for
receipts it has verified, and a client's dispute must bring the receipt (trust/disputes.py). No
one's say-so moves money or reputation: only signatures the scheduler checks itself.

    client --begin(request)--> scheduler: hold the fee, book.open(request), issue_ticket -> client
    client --call(rows, ticket)--> worker: checker.check(ticket, model, caller cert name);
                                           tally.count(request, rows, units); compute;
                                           sign_receipt -> client, with the answer
    client --receipts--> scheduler: book.offer(receipt, sig, key_of, reporter=client cert name)
    client --end(request)--> scheduler: book.close(request) -> RequestWork: who is paid for what

Shape legend: E experts in a call, N = sum(counts) rows in a call.

Tickets (scheduler -> client -> worker)
---------------------------------------
T1. A ticket names request, model, account, client (the client certificate's name, "" without
    TLS), tier and an expiry; the scheduler's signature covers exactly `Ticket.payload()`: msgpack
    of ["neuro-ticket-v1", request, model, account, client, tier, expires]. The tag separates
    tickets from receipts and from anything else the same key signs; msgpack is self-delimiting,
    so two different tickets never have one payload.
T2. `Ticket.from_wire` checks every field (types, lengths: ids <= 128 characters, account and
    client <= 64, printable text only, tier in TIERS, expires finite, signature <= 256 bytes, no
    unknown keys) before anything is verified: a peer's ticket is data, never trusted on sight.
T3. `TicketChecker.check` (on the worker, per call): no ticket -> None when tickets are not
    required, else refused; a ticket with no scheduler key known yet -> refused; the signature is
    verified once per distinct ticket (an LRU keyed by the signature bytes whose value must equal
    the ticket presented: a valid signature moved onto another body is verified, and fails); then
    on every call: not expired at `clock()` (answers replay after the hold is gone), the call's
    model is the ticket's (answers a ticket paid for a small model spent on a big one), and the
    caller's certificate name is the ticket's client when both are non-empty (answers a ticket
    seen by one worker replayed by another certificate holder). A new scheduler key empties the
    cache. Each refusal is a TicketError whose `reason` is one of TICKET_REASONS.

Receipts (worker -> client -> scheduler)
----------------------------------------
R1. A receipt states worker, kind ("expert" | "share"), model, layer, step ("" for expert calls,
    share_wire.STEPS for share calls), experts, counts, dtype and hidden (how the bytes read: one
    of wire.WIRE_DTYPES for expert calls, "int64" for share calls), sha256 of the request's and of
    the response's data bytes, request, call, and the worker's running tallies for the request:
    seq (1-based count of calls), rows_total and units_total (units: experts per call, summed),
    and for share calls the fixed-point scale (frac_bits) the share was multiplied at, without
    which the answer could not be recomputed.
    The signature covers `Receipt.payload()`: msgpack of ["neuro-receipt-v1", every field in
    that order]. dtype and hidden are signed because the digests alone do not say how to read
    the bytes: unsigned, a disputing client could re-read float16 rows as bfloat16 (same length)
    and have an honest worker's answer "proven" wrong.
R2. A receipt is consistent or it is refused (EvidenceError naming the field), whether built
    here or parsed by `Receipt.from_wire`: ints are ints (a bool is not), layer, experts and
    counts >= 0, 1 <= E = len(counts) <= MAX_EXPERTS, experts distinct, N <= wire.MAX_ROWS,
    digests 32 bytes, seq >= 1, rows <= rows_total <= seq * MAX_ROWS, seq <= E <= units_total
    <= seq * MAX_EXPERTS (every call covers at least one expert), and a first receipt (seq 1)
    carries exactly its own call's rows and units.
R3. Receipts are cumulative: the latest (highest seq) of a worker for a request states
    everything that worker did for it, so one lost receipt costs nothing and the scheduler keeps
    one receipt per worker and request. `RequestTally` keeps the worker's counters, bounded
    (`capacity` requests, LRU, entries idle over `ttl` forgotten): a flood of request ids costs
    the flooder, and at worst restarts an honest request's count at seq 1, whose receipts the
    book then calls stale (the worker is underpaid, never overpaid).

The book (scheduler)
--------------------
B1. `ReceiptBook.open` when the fee is held; at most `capacity` requests are open at once. Over
    that, open() refuses (BookError) rather than evict: evicting an open request would unpay its
    workers, refusing only asks one client to retry. The scheduler closes what `expired(now)`
    lists, which frees room. A request id is opened once.
B2. `offer` answers, in this order (cheap checks first, the signature last):
      "unknown-request"  the request is not open (never was, closed, or expired and closed);
      "not-yours"        a reporter is given, the request has a client, and they differ: only the
                         client that made the calls may present their receipts, so a worker
                         cannot sign itself work on somebody else's request and present it;
      "wrong-kind"       a share receipt on a standard request, or an expert receipt on a private
                         one (a request has one tier, and each tier one kind of call);
      "stale"            seq not above the receipt held for this worker: a replay or an older
                         receipt, nothing changes;
      "forged"           key_of(worker) is None, or the signature does not verify with it: a
                         worker's receipts verify only with its own certificate's key;
      "accepted"         it replaces the worker's previous receipt for the request (R3).
B3. `forfeit(request, worker)`: a worker proven to have cheated on the request (disputes.py) is
    paid nothing for it and earns no reputation credit from it.
B4. `take_units(request, worker, n)`: of n units a client reports "validated" for a worker, at
    most the held receipt's units_total minus what was taken before are credited, so a client
    cannot raise a worker's reputation beyond what that worker signed it did (0 without a
    receipt). Report outcomes before closing: a closed request credits nothing.
B5. `close(request)` removes the request and returns its RequestWork: rows_total per worker,
    expert receipts in `work`, share receipts in `share_rows`, forfeited workers left out.
    Closing a request that is not open returns empty work: a request is paid once.
`reporter` is the presenting connection's certificate name; None when there is none (no TLS).
The book is not thread-safe: the scheduler's event loop owns it.

Not answered here (the callers' business)
-----------------------------------------
* A client may withhold its workers' newest receipts and so pay less: only it may present them
  (B2). The scheduler can compare paid rows with the hold's expert-tokens and treat a large gap
  as it treats unreported work.
* A client colluding with a worker can present receipts inflated up to R2's bounds: the fee is
  capped by the hold, but anything minted per row (emissions) must be capped by the request's
  held expert-tokens, not by receipts alone.
* A closed request id may be opened again, and its old receipts then offered again: the
  scheduler should mint request ids itself (or remember closed ones) before paying out of
  anything but the same client's own hold.
"""

from __future__ import annotations

import hashlib
import math
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import msgpack

from neuro_dask.errors import NeuroDaskError
from neuro_dask.privacy.share_wire import STEPS as SHARE_STEPS
from neuro_dask.protocol.wire import MAX_HIDDEN, MAX_ROWS, WIRE_DTYPES
from neuro_dask.security import signing
from neuro_dask.security.signing import MAX_SIGNATURE, Signer

TICKET_TAG = "neuro-ticket-v1"
RECEIPT_TAG = "neuro-receipt-v1"
TIERS = ("standard", "private")
KINDS = ("expert", "share")
KIND_OF_TIER = {"standard": "expert", "private": "share"}
SHARE_DTYPE = "int64"
MAX_ID = 128  # request, call, model and worker ids
MAX_NAME = 64  # account and client names (a certificate name is 1-64 characters)
MAX_EXPERTS = 4096
MAX_LAYER = (1 << 31) - 1
MAX_EXPERT_ID = (1 << 31) - 1
MAX_COUNT = (1 << 63) - 1  # msgpack's int64
TICKET_REASONS = ("missing", "malformed", "bad-signature", "expired", "wrong-model", "other-client", "no-key")
OFFER_RESULTS = ("accepted", "stale", "forged", "unknown-request", "not-yours", "wrong-kind")

Clock = Callable[[], float]
_BYTES = (bytes, bytearray, memoryview)


class EvidenceError(NeuroDaskError):
    """Malformed or unverifiable evidence (a ticket, a receipt, a dispute's rows)."""

    def __init__(self, message: str, field: str = "", reason: str = "malformed"):
        self.field = field  # the offending field, "" when the problem is not one field's
        self.reason = reason
        super().__init__(message)


class TicketError(EvidenceError):
    """A call's ticket is missing or does not allow this call; `reason` is one of TICKET_REASONS."""


class BookError(NeuroDaskError, ValueError):
    """The receipt book cannot open a request (full, already open, or malformed fields)."""

    def __init__(self, message: str, field: str = ""):
        self.field = field
        super().__init__(message)


def digest(data: bytes | bytearray | memoryview) -> bytes:
    """sha256 of `data` (32 bytes), read in place: a memoryview of a frame is not copied."""
    if not isinstance(data, _BYTES):
        raise TypeError(f"digest() takes bytes, bytearray or memoryview, got {type(data).__name__}")
    return hashlib.sha256(data).digest()


# ---- field checks ---------------------------------------------------------------------------------


def _show(value: object) -> str:
    """A short, cheap description of a peer's value for an error message (never a huge repr)."""
    if isinstance(value, str):
        return repr(value[:40]) + ("..." if len(value) > 40 else "")
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) < 10**18:
        return str(value)
    return f"a {type(value).__name__}"


def _text(value: object, name: str, limit: int, err: type[Exception], what: str, empty: bool = False) -> str:
    if not isinstance(value, str):
        raise err(f"{what} field {name!r} must be a string, got {type(value).__name__}", name)
    if len(value) > limit or (not value and not empty) or not value.isprintable():
        raise err(
            f"{what} field {name!r} must be {'0' if empty else '1'} to {limit} printable characters, "
            f"got {_show(value)}",
            name,
        )
    return value


def _int(value: object, name: str, lo: int, hi: int, err: type[Exception], what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise err(f"{what} field {name!r} must be an integer, got {type(value).__name__}", name)
    if not lo <= value <= hi:
        raise err(f"{what} field {name!r}={_show(value)} is outside [{lo}, {hi}]", name)
    return int(value)


def _blob(value: object, name: str, lo: int, hi: int, err: type[Exception], what: str) -> bytes:
    if not isinstance(value, _BYTES):
        raise err(f"{what} field {name!r} must be bytes, got {type(value).__name__}", name)
    if not lo <= len(value) <= hi:
        exact = f"exactly {lo}" if lo == hi else f"{lo} to {hi}"
        raise err(f"{what} field {name!r} must be {exact} bytes, got {len(value)}", name)
    return bytes(value)


def _expiry(value: object, err: type[Exception], what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise err(f"{what} field 'expires' must be a number, got {type(value).__name__}", "expires")
    try:
        expires = float(value)
    except OverflowError:
        expires = math.inf
    if not math.isfinite(expires):
        raise err(f"{what} field 'expires' must be a finite number of seconds", "expires")
    return expires


def _request_fields(
    request: object, account: object, client: object, tier: object, expires: object, err: type[Exception], what: str
) -> float:
    """T2's rules for the fields a ticket shares with an open request; the expiry as a float."""
    _text(request, "request", MAX_ID, err, what)
    _text(account, "account", MAX_NAME, err, what, empty=True)
    _text(client, "client", MAX_NAME, err, what, empty=True)
    if not isinstance(tier, str) or tier not in TIERS:
        raise err(f"{what} field 'tier' must be one of {', '.join(TIERS)}, got {_show(tier)}", "tier")
    return _expiry(expires, err, what)


def _fields(obj: object, names: tuple[str, ...], err: type[EvidenceError], what: str) -> Mapping[str, Any]:
    """`obj` as a mapping with exactly the keys `names` (deny by default: no unknown keys)."""
    if not isinstance(obj, Mapping):
        raise err(f"a {what} must be a mapping, got {type(obj).__name__}")
    missing = [n for n in names if n not in obj]
    if missing:
        raise err(f"{what} field {missing[0]!r} is missing", missing[0])
    if len(obj) != len(names):
        unknown = [_show(k) for k in obj if k not in names]
        raise err(f"{what} has unknown field(s) {', '.join(unknown[:5])}: expected only {', '.join(names)}")
    return obj


def _pack(items: list) -> bytes:
    return msgpack.packb(items, use_bin_type=True)


# ---- tickets --------------------------------------------------------------------------------------

_TICKET_FIELDS = ("request", "model", "account", "client", "tier", "expires", "sig")


@dataclass(frozen=True)
class Ticket:
    """What the scheduler allows: calls on `model` for `request`, by `client`, until `expires` (T1)."""

    request: str
    model: str
    account: str
    client: str  # the client certificate's name, "" without TLS
    tier: str  # "standard" | "private"
    expires: float  # seconds since the epoch

    def __post_init__(self) -> None:
        expires = _request_fields(
            self.request, self.account, self.client, self.tier, self.expires, TicketError, "ticket"
        )
        _text(self.model, "model", MAX_ID, TicketError, "ticket")
        object.__setattr__(self, "expires", expires)

    def payload(self) -> bytes:
        """Exactly the bytes the scheduler signs (T1)."""
        return _pack([TICKET_TAG, self.request, self.model, self.account, self.client, self.tier, self.expires])

    def to_wire(self, sig: bytes) -> dict[str, Any]:
        return {
            "request": self.request,
            "model": self.model,
            "account": self.account,
            "client": self.client,
            "tier": self.tier,
            "expires": self.expires,
            "sig": bytes(sig),
        }

    @classmethod
    def from_wire(cls, obj: object) -> tuple[Ticket, bytes]:
        """(ticket, signature) from `to_wire`'s dict, every field checked (T2); TicketError otherwise."""
        msg = _fields(obj, _TICKET_FIELDS, TicketError, "ticket")
        sig = _blob(msg["sig"], "sig", 1, MAX_SIGNATURE, TicketError, "ticket")
        return cls(msg["request"], msg["model"], msg["account"], msg["client"], msg["tier"], msg["expires"]), sig


def issue_ticket(signer: Signer, ticket: Ticket) -> dict[str, Any]:
    """The ticket's wire form, signed by the scheduler's key."""
    return ticket.to_wire(signer.sign(ticket.payload()))


class TicketChecker:
    """The worker's side of T3. Thread-safe; `verifications` counts signature checks done."""

    def __init__(self, clock: Clock, capacity: int = 4096):
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
            raise ValueError(f"TicketChecker capacity must be an integer >= 1, got {capacity!r}")
        self._clock = clock
        self._capacity = capacity
        self._key: bytes | None = None
        self._required = False
        self._verified: OrderedDict[bytes, Ticket] = OrderedDict()  # signature -> the ticket it signs
        self._lock = threading.Lock()
        self.verifications = 0

    @property
    def required(self) -> bool:
        return self._required

    @property
    def key(self) -> bytes | None:
        return self._key

    def set_key(self, public_der: bytes | None, required: bool) -> None:
        """The scheduler's public key (None: not known yet) and whether every call needs a ticket.
        A key that is not EC P-256 raises SigningError. A changed key forgets every verified ticket."""
        der = None if public_der is None else signing.check_public_der(public_der)
        with self._lock:
            if der != self._key:
                self._verified.clear()
            self._key = der
            self._required = bool(required)

    def check(self, wire: object, model: str, caller: str | None) -> Ticket | None:
        """The call's ticket when it allows this call; None when none is required and none came;
        TicketError (with its reason) otherwise. `caller`: the connection's certificate name."""
        if wire is None:
            if not self._required:
                return None
            raise TicketError(
                "refused: this worker serves only calls with a scheduler-signed ticket; begin the "
                "request with the scheduler (neuro_request_begin) and send its ticket",
                "ticket",
                "missing",
            )
        key = self._key
        if key is None:
            raise TicketError(
                "refused: this worker has no scheduler key yet to check tickets with; retry "
                "once it has registered with the scheduler",
                "ticket",
                "no-key",
            )
        try:
            ticket, sig = Ticket.from_wire(wire)
        except TicketError as exc:
            raise TicketError(f"refused: malformed ticket: {exc}", exc.field, "malformed") from None
        with self._lock:
            known = self._verified.get(sig)
            if known is not None and known == ticket:
                self._verified.move_to_end(sig)
        if known != ticket:
            with self._lock:
                self.verifications += 1
            if not signing.verify(key, ticket.payload(), sig):
                raise TicketError(
                    f"refused: the ticket for request {ticket.request!r} does not carry this "
                    "network scheduler's signature",
                    "sig",
                    "bad-signature",
                )
            with self._lock:
                if self._key == key:  # not verified under a key replaced meanwhile
                    self._verified[sig] = ticket
                    self._verified.move_to_end(sig)
                    while len(self._verified) > self._capacity:
                        self._verified.popitem(last=False)
        now = self._clock()
        if now >= ticket.expires:
            raise TicketError(
                f"refused: the ticket for request {ticket.request!r} expired "
                f"{now - ticket.expires:.0f} s ago; begin a new request",
                "expires",
                "expired",
            )
        if ticket.model != model:
            raise TicketError(
                f"refused: the ticket is for model {ticket.model!r}, this call is for {_show(model)}",
                "model",
                "wrong-model",
            )
        if caller and ticket.client and caller != ticket.client:
            raise TicketError(
                f"refused: the ticket was issued to client {ticket.client!r}, not to {_show(caller)}",
                "client",
                "other-client",
            )
        return ticket


# ---- receipts -------------------------------------------------------------------------------------

_RECEIPT_FIELDS = (
    "worker",
    "kind",
    "model",
    "layer",
    "step",
    "experts",
    "counts",
    "dtype",
    "hidden",
    "in_digest",
    "out_digest",
    "request",
    "call",
    "seq",
    "rows_total",
    "units_total",
    "frac_bits",
)


@dataclass(frozen=True)
class Receipt:
    """What a worker signs for one answer (R1); consistent by construction (R2)."""

    worker: str
    kind: str  # "expert" | "share"
    model: str
    layer: int
    step: str  # "" for expert calls; "gate_up" | "down" for share calls
    experts: tuple[int, ...]  # E, in the order of the call's rows
    counts: tuple[int, ...]  # E, rows of each expert
    dtype: str  # how the data bytes read: wire.WIRE_DTYPES (expert), "int64" (share)
    hidden: int  # columns of the request's rows
    in_digest: bytes  # sha256 of the request's data bytes
    out_digest: bytes  # sha256 of the response's data bytes
    request: str  # the ticket's request id, or the client's request/session id without tickets
    call: str  # the call id, may be ""
    seq: int  # this worker's calls for this request so far, this one included (1-based)
    rows_total: int  # rows for this request so far, this call included
    units_total: int  # sum over those calls of len(experts)
    frac_bits: int = 0  # share calls: the fixed-point scale of the weights the share was multiplied by

    def __post_init__(self) -> None:
        w, err = "receipt", EvidenceError
        _text(self.worker, "worker", MAX_ID, err, w)
        if not isinstance(self.kind, str) or self.kind not in KINDS:
            raise err(f"receipt field 'kind' must be one of {', '.join(KINDS)}, got {_show(self.kind)}", "kind")
        _text(self.model, "model", MAX_ID, err, w)
        _int(self.layer, "layer", 0, MAX_LAYER, err, w)
        steps = ("",) if self.kind == "expert" else SHARE_STEPS
        if not isinstance(self.step, str) or self.step not in steps:
            raise err(
                f"receipt field 'step' of a {self.kind} call must be one of {list(steps)}, got {_show(self.step)}",
                "step",
            )
        experts, counts = self.experts, self.counts
        for name, seq in (("experts", experts), ("counts", counts)):
            if not isinstance(seq, (list, tuple)):
                raise err(f"receipt field {name!r} must be a list of integers, got {type(seq).__name__}", name)
            if not 1 <= len(seq) <= MAX_EXPERTS:
                raise err(f"receipt field {name!r} must hold 1 to {MAX_EXPERTS} entries, got {len(seq)}", name)
        if len(experts) != len(counts):
            raise err(f"receipt has {len(experts)} experts but {len(counts)} counts", "counts")
        experts = tuple(_int(e, "experts", 0, MAX_EXPERT_ID, err, w) for e in experts)
        counts = tuple(_int(c, "counts", 0, MAX_ROWS, err, w) for c in counts)
        if len(set(experts)) != len(experts):
            raise err("receipt field 'experts' must name distinct experts", "experts")
        rows = sum(counts)
        if rows > MAX_ROWS:
            raise err(f"receipt covers {rows} rows, above the wire's {MAX_ROWS}", "counts")
        dtypes = tuple(WIRE_DTYPES) if self.kind == "expert" else (SHARE_DTYPE,)
        if not isinstance(self.dtype, str) or self.dtype not in dtypes:
            raise err(
                f"receipt field 'dtype' of a {self.kind} call must be one of {list(dtypes)}, got {_show(self.dtype)}",
                "dtype",
            )
        _int(self.hidden, "hidden", 1, MAX_HIDDEN if self.kind == "expert" else 4 * MAX_HIDDEN, err, w)
        in_digest = _blob(self.in_digest, "in_digest", 32, 32, err, w)
        out_digest = _blob(self.out_digest, "out_digest", 32, 32, err, w)
        _text(self.request, "request", MAX_ID, err, w)
        _text(self.call, "call", MAX_ID, err, w, empty=True)
        seq = _int(self.seq, "seq", 1, MAX_COUNT, err, w)
        _int(self.rows_total, "rows_total", rows, min(MAX_COUNT, seq * MAX_ROWS), err, w)
        _int(self.units_total, "units_total", max(len(experts), seq), min(MAX_COUNT, seq * MAX_EXPERTS), err, w)
        _int(self.frac_bits, "frac_bits", 0, 0 if self.kind == "expert" else 30, err, w)
        if seq == 1 and (self.rows_total != rows or self.units_total != len(experts)):
            raise err(
                f"a first receipt (seq 1) must total its own {rows} rows and {len(experts)} units, "
                f"got {self.rows_total} and {self.units_total}",
                "rows_total",
            )
        for name, value in (
            ("experts", experts),
            ("counts", counts),
            ("in_digest", in_digest),
            ("out_digest", out_digest),
        ):
            object.__setattr__(self, name, value)

    @classmethod
    def of_own_answer(cls, **fields: Any) -> Receipt:
        """The receipt a worker signs for an answer it just computed, from a request it decoded
        and checked and tallies it keeps itself: built without re-running R2's checks (about 6 us
        on the hot path of every call; the scheduler runs them on every receipt it is shown)."""
        if set(fields) != set(_RECEIPT_FIELDS):
            raise EvidenceError(f"a receipt takes exactly the fields {', '.join(_RECEIPT_FIELDS)}")
        receipt = object.__new__(cls)
        for name, value in fields.items():
            object.__setattr__(receipt, name, value)
        return receipt

    @property
    def rows(self) -> int:
        """N: rows in this call."""
        return sum(self.counts)

    def payload(self) -> bytes:
        """Exactly the bytes the worker signs (R1)."""
        return _pack(
            [
                RECEIPT_TAG,
                self.worker,
                self.kind,
                self.model,
                self.layer,
                self.step,
                list(self.experts),
                list(self.counts),
                self.dtype,
                self.hidden,
                self.in_digest,
                self.out_digest,
                self.request,
                self.call,
                self.seq,
                self.rows_total,
                self.units_total,
                self.frac_bits,
            ]
        )

    def to_wire(self, sig: bytes) -> dict[str, Any]:
        msg: dict[str, Any] = {name: getattr(self, name) for name in _RECEIPT_FIELDS}
        msg["experts"], msg["counts"], msg["sig"] = list(self.experts), list(self.counts), bytes(sig)
        return msg

    @classmethod
    def from_wire(cls, obj: object) -> tuple[Receipt, bytes]:
        """(receipt, signature) from `to_wire`'s dict, every field checked (R2); EvidenceError otherwise."""
        msg = _fields(obj, _RECEIPT_FIELDS + ("sig",), EvidenceError, "receipt")
        sig = _blob(msg["sig"], "sig", 1, MAX_SIGNATURE, EvidenceError, "receipt")
        return cls(**{name: msg[name] for name in _RECEIPT_FIELDS}), sig


def sign_receipt(signer: Signer, receipt: Receipt) -> dict[str, Any]:
    """The receipt's wire form, signed by the worker's key."""
    return receipt.to_wire(signer.sign(receipt.payload()))


def verify_receipt(public_der: bytes, receipt: Receipt, sig: bytes) -> bool:
    """True when `sig` is the signature of `receipt` by `public_der`'s key; never raises."""
    return isinstance(receipt, Receipt) and signing.verify(public_der, receipt.payload(), sig)


def receipt_mismatch(receipt: Receipt, **expected: object) -> str | None:
    """The first of `expected`'s fields (name=value) that `receipt` states otherwise, or None.

    For the client, before it accepts an answer or forwards its receipt: e.g.
    `receipt_mismatch(r, worker=w, model=m, layer=l, experts=tuple(groups), counts=..., dtype=...,
    hidden=..., in_digest=digest(sent), out_digest=digest(received), request=req)`.
    """
    for name, value in expected.items():
        if name not in _RECEIPT_FIELDS:
            raise TypeError(f"receipt_mismatch: Receipt has no field {name!r}")
        have = getattr(receipt, name)
        if isinstance(value, list):
            value = tuple(value)
        if isinstance(value, (bytearray, memoryview)):
            value = bytes(value)
        if have != value:
            return f"the receipt states {name}={have!r:.80}, the call had {value!r:.80}"
    return None


class RequestTally:
    """A worker's running (seq, rows_total, units_total) per request (R3). Thread-safe."""

    def __init__(self, clock: Clock, capacity: int = 10_000, ttl: float = 3600.0):
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
            raise ValueError(f"RequestTally capacity must be an integer >= 1, got {capacity!r}")
        if not (isinstance(ttl, (int, float)) and math.isfinite(ttl) and ttl > 0):
            raise ValueError(f"RequestTally ttl must be a finite number of seconds > 0, got {ttl!r}")
        self._clock = clock
        self._capacity = capacity
        self._ttl = float(ttl)
        self._tallies: OrderedDict[str, list] = OrderedDict()  # request -> [seq, rows, units, last seen]
        self._lock = threading.Lock()

    def __len__(self) -> int:
        with self._lock:
            return len(self._tallies)

    def count(self, request: str, rows: int, units: int) -> tuple[int, int, int]:
        """Add one call of `rows` rows and `units` experts; (seq, rows_total, units_total) after it."""
        _text(request, "request", MAX_ID, EvidenceError, "call")
        _int(rows, "rows", 0, MAX_ROWS, EvidenceError, "call")
        _int(units, "units", 0, MAX_EXPERTS, EvidenceError, "call")
        now = self._clock()
        with self._lock:
            tallies = self._tallies
            # Least recently used first: forget from the front while idle over ttl.
            while tallies:
                oldest = next(iter(tallies.values()))
                if now - oldest[3] <= self._ttl:
                    break
                tallies.popitem(last=False)
            tally = tallies.get(request)
            if tally is None:
                tally = tallies[request] = [0, 0, 0, now]
                while len(tallies) > self._capacity:
                    tallies.popitem(last=False)
            else:
                tallies.move_to_end(request)
            tally[0] += 1
            tally[1] = min(MAX_COUNT, tally[1] + rows)
            tally[2] = min(MAX_COUNT, tally[2] + units)
            tally[3] = max(tally[3], now)
            return tally[0], tally[1], tally[2]


# ---- the book -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Held:
    """The best verified receipt of one worker for one request, as the book keeps it (B2, B4)."""

    kind: str
    seq: int
    rows_total: int
    units_total: int
    taken: int = 0  # units already credited to reputation


@dataclass(frozen=True)
class RequestWork:
    """What a closed request's workers did, by their verified receipts (B5)."""

    request: str
    client: str
    account: str
    tier: str
    work: dict[str, int] = field(default_factory=dict)  # worker -> rows_total, expert receipts
    share_rows: dict[str, int] = field(default_factory=dict)  # worker -> rows_total, share receipts
    forfeited: tuple[str, ...] = ()  # proven cheats, paid nothing


@dataclass
class _Open:
    client: str
    account: str
    tier: str
    expires: float
    held: dict[str, Held] = field(default_factory=dict)
    forfeited: set[str] = field(default_factory=set)


class ReceiptBook:
    """The scheduler's view of open requests and their workers' receipts (B1-B5)."""

    def __init__(self, capacity: int = 10_000):
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
            raise ValueError(f"ReceiptBook capacity must be an integer >= 1, got {capacity!r}")
        self.capacity = capacity
        self._open: dict[str, _Open] = {}

    def __len__(self) -> int:
        return len(self._open)

    def __contains__(self, request: object) -> bool:
        return request in self._open

    def open(self, request: str, client: str, account: str, tier: str, expires: float) -> None:
        """Open a request whose fee is held (B1); BookError when full, already open or malformed."""
        expires = _request_fields(request, account, client, tier, expires, BookError, "request")
        if request in self._open:
            raise BookError(f"request {request!r} is open already: a request id is used once", "request")
        if len(self._open) >= self.capacity:
            raise BookError(
                f"{len(self._open)} requests are open, the most this scheduler holds at once: "
                "retry when some have ended (expired ones are closed every tick)",
                "request",
            )
        self._open[request] = _Open(client, account, tier, expires)

    def expired(self, now: float) -> list[str]:
        """Open requests whose expiry is at or before `now`, soonest first (ties by id)."""
        due = [(o.expires, r) for r, o in self._open.items() if o.expires <= now]
        return [r for _, r in sorted(due)]

    def offer(self, receipt: Receipt, sig: bytes, key_of: Callable[[str], bytes | None], reporter: str | None) -> str:
        """One of OFFER_RESULTS, decided in B2's order; only "accepted" changes the book."""
        if not isinstance(receipt, Receipt):
            raise TypeError(f"offer() takes a Receipt (Receipt.from_wire), got {type(receipt).__name__}")
        entry = self._open.get(receipt.request)
        if entry is None:
            return "unknown-request"
        if reporter is not None and entry.client and reporter != entry.client:
            return "not-yours"
        if receipt.kind != KIND_OF_TIER[entry.tier]:
            return "wrong-kind"
        held = entry.held.get(receipt.worker)
        if held is not None and receipt.seq <= held.seq:
            return "stale"
        key = key_of(receipt.worker)
        if not key or not verify_receipt(key, receipt, sig):
            return "forged"
        entry.held[receipt.worker] = Held(
            receipt.kind, receipt.seq, receipt.rows_total, receipt.units_total, held.taken if held is not None else 0
        )
        return "accepted"

    def held(self, request: str, worker: str) -> Held | None:
        entry = self._open.get(request)
        return None if entry is None else entry.held.get(worker)

    def forfeit(self, request: str, worker: str) -> None:
        """B3: `worker` is paid nothing for `request` and earns no more credit from it."""
        entry = self._open.get(request)
        if entry is not None:
            entry.forfeited.add(worker)

    def take_units(self, request: str, worker: str, n: int) -> int:
        """B4: how many of `n` reported units may be credited to `worker` (0 to n)."""
        entry = self._open.get(request)
        if entry is None or worker in entry.forfeited or isinstance(n, bool) or not isinstance(n, int) or n <= 0:
            return 0
        held = entry.held.get(worker)
        if held is None:
            return 0
        granted = max(0, min(n, held.units_total - held.taken))
        if granted:
            entry.held[worker] = Held(held.kind, held.seq, held.rows_total, held.units_total, held.taken + granted)
        return granted

    def close(self, request: str) -> RequestWork:
        """B5: remove the request; its verified work, forfeited workers left out."""
        entry = self._open.pop(request, None)
        if entry is None:
            return RequestWork(request, "", "", "")
        work = {
            w: h.rows_total for w, h in sorted(entry.held.items()) if h.kind == "expert" and w not in entry.forfeited
        }
        shares = {
            w: h.rows_total for w, h in sorted(entry.held.items()) if h.kind == "share" and w not in entry.forfeited
        }
        return RequestWork(
            request, entry.client, entry.account, entry.tier, work, shares, tuple(sorted(entry.forfeited))
        )
