"""neuro_dask.trust.disputes: evidence, referees, verdicts and strikes, as attacks."""

from __future__ import annotations

import dataclasses

import msgpack
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from neuro_dask.errors import ConfigError
from neuro_dask.protocol.wire import encode_request, encode_response
from neuro_dask.security.signing import Signer
from neuro_dask.trust.disputes import Evidence, Referee, StrikeBook, Verdict, judge, referee_order
from neuro_dask.trust.receipts import EvidenceError, Receipt, ReceiptBook, digest, sign_receipt
from neuro_dask.trust.validation import agree as agree_results

ALICE, BOB = Signer.generate(), Signer.generate()
T0 = 1_900_000_000.0
D = 8  # hidden


def agree(a: torch.Tensor, b: torch.Tensor) -> bool:
    return agree_results({0: a}, {0: b})


def expert_fn(expert: int, rows: torch.Tensor) -> torch.Tensor:
    """The honest expert: any deterministic function will do for judging."""
    return torch.tanh(rows * (expert + 1)) + 0.1 * expert


def call(
    dtype=torch.float32,
    counts=(3, 0, 5),
    experts=(2, 9, 4),
    cheat: int | None = None,
    worker="alice",
    signer: Signer = ALICE,
    seed: int = 0,
) -> Evidence:
    """One honest (or, for `cheat`, one wrong) expert call and its evidence against expert `cheat`
    (or the first expert)."""
    gen = torch.Generator().manual_seed(seed)
    groups = {e: torch.randn(n, D, generator=gen).to(dtype) for e, n in zip(experts, counts)}
    outputs = {e: expert_fn(e, rows.float()).to(dtype) for e, rows in groups.items()}
    if cheat is not None:
        outputs[cheat] = outputs[cheat] + 0.5
    request, response = encode_request("m1", 3, groups), encode_response(outputs)
    inputs, out = bytes(request["data"]), bytes(response["data"])
    n = sum(counts)
    r = Receipt(
        worker,
        "expert",
        "m1",
        3,
        "",
        tuple(experts),
        tuple(counts),
        request["dtype"],
        D,
        digest(inputs),
        digest(out),
        "req-1",
        "c1",
        1,
        n,
        len(experts),
    )
    sig = Receipt.from_wire(sign_receipt(signer, r))[1]
    return Evidence(r, sig, experts[0] if cheat is None else cheat, request["dtype"], D, inputs, out)


# ---- evidence -----------------------------------------------------------------------------------


def test_honest_evidence_checks_and_cuts_the_disputed_rows():
    ev = call()
    ev.check(ALICE.public_der)
    gen = torch.Generator().manual_seed(0)
    first = torch.randn(3, D, generator=gen)
    assert torch.equal(ev.rows("inputs"), first)
    assert torch.equal(ev.rows("outputs"), expert_fn(2, first))
    last = dataclasses.replace(ev, expert=4)
    assert last.rows("inputs").shape == (5, D)
    assert dataclasses.replace(ev, expert=9).rows("outputs").shape == (0, D)  # an expert with no rows


def test_rows_are_views_of_the_evidence_bytes():
    ev = call()
    buffer = bytearray(ev.inputs)
    view = dataclasses.replace(ev, inputs=buffer).rows("inputs")
    buffer[:4] = torch.tensor([42.0]).numpy().tobytes()
    assert view[0, 0].item() == 42.0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_evidence(dtype):
    ev = call(dtype=dtype)
    ev.check(ALICE.public_der)
    assert ev.rows("outputs").dtype == dtype


@pytest.mark.parametrize(
    "attack, reason",
    [
        ("inputs swapped for other rows", "digest"),
        ("outputs swapped for other rows", "digest"),
        ("checked against another worker's key", "bad-signature"),
        ("receipt signed by another worker's key", "bad-signature"),
        ("receipt changed after signing", "bad-signature"),
    ],
)
def test_check_refuses(attack, reason):
    ev, key = call(), ALICE.public_der
    if attack == "inputs swapped for other rows":
        ev = dataclasses.replace(ev, inputs=bytes(reversed(ev.inputs)))
    elif attack == "outputs swapped for other rows":
        ev = dataclasses.replace(ev, outputs=call(seed=1).outputs)
    elif attack == "checked against another worker's key":
        key = BOB.public_der
    elif attack == "receipt signed by another worker's key":
        ev = dataclasses.replace(ev, sig=call(signer=BOB).sig)
    elif attack == "receipt changed after signing":
        ev = dataclasses.replace(ev, receipt=dataclasses.replace(ev.receipt, layer=4))
    with pytest.raises(EvidenceError) as err:
        ev.check(key)
    assert err.value.reason == reason


@pytest.mark.parametrize(
    "attack, field",
    [
        ("inputs shorter than the counts say", "inputs"),
        ("outputs longer than the counts say", "outputs"),
        ("an expert the receipt does not cover", "expert"),
        ("the expert as a bool", "expert"),
        ("float16 rows re-read as bfloat16", "dtype"),
        ("rows re-read at another width", "dtype"),
        ("a share receipt over float rows", "inputs"),
        ("not a receipt", "receipt"),
        ("no signature", "sig"),
        ("inputs as text", "inputs"),
    ],
)
def test_evidence_refused_at_construction(attack, field):
    ev = call(dtype=torch.float16)
    over: dict = {}
    if attack == "inputs shorter than the counts say":
        over = {"inputs": ev.inputs[:-2]}
    elif attack == "outputs longer than the counts say":
        over = {"outputs": ev.outputs + b"\x00\x00"}
    elif attack == "an expert the receipt does not cover":
        over = {"expert": 3}
    elif attack == "the expert as a bool":
        over = {"expert": True}
    elif attack == "float16 rows re-read as bfloat16":  # same length: only the signed dtype stops it
        over = {"dtype": "bfloat16"}
    elif attack == "rows re-read at another width":
        over = {"hidden": D * 2}
    elif attack == "a share receipt over float rows":  # int64 rows of the same bytes: the length tells
        share = dataclasses.replace(ev.receipt, kind="share", step="down", dtype="int64")
        over = {"receipt": share, "dtype": "int64"}
    elif attack == "not a receipt":
        over = {"receipt": ev.receipt.to_wire(ev.sig)}
    elif attack == "no signature":
        over = {"sig": b""}
    elif attack == "inputs as text":
        over = {"inputs": "rows"}
    with pytest.raises(EvidenceError) as err:
        dataclasses.replace(ev, **over)
    assert err.value.field == field


def test_evidence_round_trips_through_msgpack():
    ev = call()
    back = Evidence.from_wire(msgpack.unpackb(msgpack.packb(ev.to_wire()), raw=False), max_rows=100)
    assert back == ev
    back.check(ALICE.public_der)


@pytest.mark.parametrize(
    "change, field",
    [
        ({"expert": KeyError}, "expert"),
        ({"extra": 1}, ""),
        ({"hidden": "8"}, "hidden"),
        ({"hidden": 8.0}, "hidden"),
        ({"dtype": "float64"}, "dtype"),
        ({"dtype": None}, "dtype"),
        ({"receipt": {}}, "worker"),
    ],
)
def test_evidence_from_wire_names_the_bad_field(change, field):
    wire = call().to_wire()
    for k, v in change.items():
        if v is KeyError:
            del wire[k]
        else:
            wire[k] = v
    with pytest.raises(EvidenceError) as err:
        Evidence.from_wire(wire, max_rows=100)
    assert err.value.field == field


def test_evidence_from_wire_refuses_calls_over_max_rows():
    with pytest.raises(EvidenceError, match="above this scheduler's 7"):
        Evidence.from_wire(call().to_wire(), max_rows=7)


SCALARS = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=20), st.binary(max_size=40))
MSGPACK_LIKE = st.recursive(
    SCALARS,
    lambda inner: st.one_of(st.lists(inner, max_size=5), st.dictionaries(st.text(max_size=10), inner, max_size=5)),
    max_leaves=20,
)
GOOD = call().to_wire()


@settings(max_examples=200, deadline=None)
@given(
    st.one_of(
        MSGPACK_LIKE,
        st.lists(st.tuples(st.sampled_from(sorted(GOOD)), MSGPACK_LIKE), min_size=1, max_size=2).map(
            lambda edits: {**GOOD, **dict(edits)}
        ),
    )
)
def test_evidence_from_wire_returns_or_raises_evidence_error(obj):
    try:
        Evidence.from_wire(obj, max_rows=100)
    except EvidenceError:
        pass


# ---- referees -----------------------------------------------------------------------------------


def ref(worker: str, owner: str = "", trusted: bool = False, score: float = 0.5) -> Referee:
    return Referee(worker, owner, trusted, score)


def test_referee_order_trusted_first_then_score_then_name():
    candidates = [
        ref("c", "oc", score=0.9),
        ref("a", "oa", score=0.7),
        ref("b", "ob", score=0.7),
        ref("t2", "ot", trusted=True, score=0.1),
        ref("t1", "ot", trusted=True, score=0.1),
        ref("a", "oa", score=0.99),
    ]  # a second entry for a worker is ignored
    assert [r.worker for r in referee_order(candidates, "x", "ox")] == ["t1", "t2", "c", "a", "b"]


@pytest.mark.parametrize(
    "accused, accused_owner, candidate, eligible",
    [
        ("x", "ox", ref("x", "ox"), False),  # the accused itself
        ("x", "ox", ref("x2", "ox", trusted=True, score=1.0), False),  # its owner's other machine, even trusted
        ("x", "", ref("y", "x"), False),  # owner "" means the accused owns itself
        ("x", "ox", ref("ox"), False),  # a worker without owner named like the owner: its owner id is "ox"
        ("x", "ox", ref("y", "oy"), True),
        ("x", "", ref("y"), True),
    ],
)
def test_referee_order_never_lets_an_owner_judge_its_own(accused, accused_owner, candidate, eligible):
    assert (referee_order([candidate], accused, accused_owner) == [candidate]) is eligible


@pytest.mark.parametrize("worker, score", [("", 0.5), ("w", float("nan")), ("w", float("inf")), ("w", "high")])
def test_referee_fields_are_checked(worker, score):
    with pytest.raises(ConfigError):
        Referee(worker, "", False, score)


# ---- verdicts -----------------------------------------------------------------------------------

ROWS = torch.randn(4, D, generator=torch.Generator().manual_seed(7))
RIGHT = expert_fn(2, ROWS)
WRONG = RIGHT + 0.5
NEAR = RIGHT + 1e-6  # another machine's rounding

TRUSTED, TRUSTED2 = ref("t", "op", trusted=True), ref("t2", "op2", trusted=True)
A, B, C, A2 = ref("a", "oa"), ref("b", "ob"), ref("c", "oc"), ref("a2", "oa")


@pytest.mark.parametrize(
    "accused, answers, kind, slashable, referees",
    [
        # rule 1: a trusted referee decides alone
        (WRONG, [(TRUSTED, RIGHT)], "proven", True, ("t",)),
        (NEAR, [(TRUSTED, RIGHT)], "refuted", False, ("t",)),
        (WRONG, [(TRUSTED, RIGHT), (A, WRONG), (B, WRONG)], "proven", True, ("t",)),  # untrusted colluders outvoted
        (RIGHT, [(A, WRONG), (B, WRONG), (TRUSTED, NEAR)], "refuted", False, ("t",)),
        (WRONG, [(TRUSTED, RIGHT), (TRUSTED2, NEAR)], "proven", True, ("t", "t2")),
        (WRONG, [(TRUSTED, RIGHT), (TRUSTED2, WRONG)], "undecided", False, ("t", "t2")),  # trusted disagree
        (WRONG, [(TRUSTED, None), (A, RIGHT), (B, NEAR)], "proven", False, ("a", "b")),  # failed trusted: rule 2
        # rule 2: two referees of distinct owners
        (WRONG, [(A, RIGHT), (B, NEAR)], "proven", False, ("a", "b")),
        (NEAR, [(A, RIGHT), (B, RIGHT)], "refuted", False, ("a", "b")),
        (WRONG, [(A, RIGHT), (B, NEAR), (C, RIGHT)], "proven", False, ("a", "b", "c")),
        # rule 3: everything else
        (WRONG, [], "undecided", False, ()),
        (WRONG, [(A, None), (B, None)], "undecided", False, ()),
        (WRONG, [(A, RIGHT)], "undecided", False, ("a",)),  # one referee
        (WRONG, [(A, RIGHT), (A2, RIGHT)], "undecided", False, ("a", "a2")),  # one owner
        (WRONG, [(A, RIGHT), (B, WRONG + 1)], "undecided", False, ("a", "b")),  # referees disagree
        (WRONG, [(A, RIGHT), (B, RIGHT), (C, WRONG)], "undecided", False, ("a", "b", "c")),  # a lone dissenter
        (WRONG, [(A, RIGHT), (B, RIGHT[:2])], "undecided", False, ("a",)),  # a wrong shape counts as failed
    ],
)
def test_judge(accused, answers, kind, slashable, referees):
    verdict = judge(accused, answers, agree)
    assert (verdict.kind, verdict.slashable, verdict.referees) == (kind, slashable, referees), verdict.why
    assert verdict.why


def test_judge_is_conservative_for_the_accused():
    """Agreeing with any deciding referee refutes: tolerance is not transitive."""
    mid = RIGHT + 0.9e-4
    tight = lambda a, b: bool(((a - b).abs() <= 1e-4).all())  # noqa: E731
    assert tight(RIGHT, mid) and tight(mid, RIGHT + 1.8e-4) and not tight(RIGHT, RIGHT + 1.8e-4)
    verdict = judge(RIGHT + 1.8e-4, [(A, RIGHT), (B, mid)], tight)
    assert verdict.kind == "refuted"


def test_identical_answers_agree_even_where_the_tolerance_cannot():
    overflow = torch.full((2, D), float("inf"))
    assert not agree(overflow, overflow)
    assert judge(overflow, [(TRUSTED, overflow.clone())], agree).kind == "refuted"


@pytest.mark.parametrize("kind, slashable", [("guilty", False), ("refuted", True), ("undecided", True)])
def test_verdict_kinds_are_checked(kind, slashable):
    with pytest.raises(ValueError):
        Verdict(kind, slashable, (), "")


# ---- strikes ------------------------------------------------------------------------------------


class Clock:
    def __init__(self, now: float = T0):
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_strikes_refuse_after_n_and_forgive_after_the_window():
    clock = Clock()
    strikes = StrikeBook(max_unproven=3, window=100.0, clock=clock)
    for dt in (0, 10, 20):
        clock.now = T0 + dt
        assert strikes.allowed("carol") == (True, "")
        strikes.strike("carol")
    ok, why = strikes.allowed("carol")
    assert not ok and "carol" in why and "80 s" in why
    assert strikes.allowed("dave") == (True, "")  # others unaffected
    clock.now = T0 + 99.9
    assert not strikes.allowed("carol")[0]
    clock.now = T0 + 100.0  # the first strike leaves the window
    assert strikes.allowed("carol") == (True, "")
    strikes.strike("carol")
    assert not strikes.allowed("carol")[0]
    clock.now = T0 + 1000
    assert strikes.allowed("carol") == (True, "") and len(strikes) == 0


def test_strike_memory_is_bounded():
    clock = Clock()
    strikes = StrikeBook(max_unproven=2, window=3600.0, clock=clock, capacity=10)
    for i in range(1000):
        strikes.strike(f"r{i}")
    for _ in range(1000):
        strikes.strike("r999")
    assert len(strikes) == 10 and len(strikes._strikes["r999"]) == 2
    assert strikes.allowed("r0") == (True, "")  # the idlest were forgotten


@pytest.mark.parametrize("args", [(0, 1.0), (True, 1.0), (3, 0.0), (3, float("inf")), (3, "1")])
def test_strike_book_configuration_is_checked(args):
    with pytest.raises(ConfigError):
        StrikeBook(*args, clock=Clock())


# ---- the whole dispute --------------------------------------------------------------------------


@pytest.mark.parametrize("cheat, verdict", [(2, "proven"), (None, "refuted")])
def test_a_dispute_from_evidence_to_forfeit_or_strike(cheat, verdict):
    keys = {"alice": ALICE.public_der}
    book = ReceiptBook()
    book.open("req-1", "carol", "carol", "standard", T0 + 60)
    ev = Evidence.from_wire(call(cheat=cheat).to_wire(), max_rows=1000)
    assert book.offer(ev.receipt, ev.sig, keys.get, "carol") == "accepted"
    strikes = StrikeBook(3, 600.0, Clock())
    assert strikes.allowed("carol")[0]
    ev.check(keys[ev.receipt.worker])
    referees = referee_order([TRUSTED, A, ref("alice-2", "alice")], "alice", "alice")
    answers = [(r, expert_fn(ev.expert, ev.rows("inputs").float()).to(ev.rows("outputs").dtype)) for r in referees]
    outcome = judge(ev.rows("outputs"), answers, agree)
    assert outcome.kind == verdict and outcome.referees == ("t",)
    if outcome.kind == "proven":
        book.forfeit("req-1", ev.receipt.worker)
    else:
        strikes.strike("carol")
    work = book.close("req-1")
    assert work.work == ({} if cheat is not None else {"alice": 8})
