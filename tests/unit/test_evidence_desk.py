"""The scheduler's evidence desk (neuro_dask/scheduler/evidence_desk.py) and the worker's side of it
(neuro_dask/runtime/receipting.py), without a cluster: tickets out, signed answers back,
receipts presented, disputes judged by recomputation on referees the desk picks. Written as
attacks: each claim that would cost someone reputation or money must be proven, not said."""

from __future__ import annotations

import asyncio

import pytest
import torch

from neuro_dask.privacy.fixed_point import ring_matmul
from neuro_dask.privacy.share_wire import encode_share_request, encode_share_response
from neuro_dask.protocol.wire import decode_request, encode_request, encode_response
from neuro_dask.runtime.receipting import Receipting
from neuro_dask.scheduler.evidence_desk import EvidenceDesk
from neuro_dask.security.signing import Signer
from neuro_dask.trust.disputes import Referee
from neuro_dask.trust.receipts import TicketError

MODEL = "m-1"
D = 4
NOW = [1_000_000.0]


def clock():
    return NOW[0]


def expert(rows: torch.Tensor) -> torch.Tensor:
    """Every honest worker's expert 0: y = 2x + 1."""
    return rows * 2 + 1


class Worker:
    """A worker's receipting over a fake expert; `lie` adds an error to every answer."""

    def __init__(self, name: str, lie: float = 0.0, owner: str = ""):
        self.name, self.lie, self.owner = name, lie, owner or name
        self.receipts = Receipting(Signer.generate(), lambda: name, clock)
        self.calls = 0

    def serve(self, msg: dict, caller: str | None = None, from_scheduler: bool = False) -> dict:
        ticket = self.receipts.admit(msg, caller, from_scheduler)
        request = decode_request(msg)
        self.calls += 1
        outputs = {e: expert(x) + self.lie for e, x in request.inputs.items()}
        return self.receipts.sign("expert", msg, encode_response(outputs), ticket)


@pytest.fixture
def desk():
    desk = EvidenceDesk(Signer.generate(), tickets_required=True, max_unproven=2, unproven_window=60.0, clock=clock)
    return desk


def _network(desk, workers):
    for w in workers:
        desk.set_key(w.name, w.receipts.signer.public_der)
        w.receipts.set_policy(desk.policy())
    by_address = {f"tcp://{w.name}:1": w for w in workers}

    def candidates(model, layer, expert_id):
        return [(a, Referee(w.name, w.owner, w.name.startswith("trusted"), 0.9)) for a, w in by_address.items()]

    async def call(address, op, msg):
        return by_address[address].serve(msg, from_scheduler=True)

    return by_address, candidates, call


def _call(desk, ticket, rows=None):
    rows = torch.arange(2 * D, dtype=torch.float32).reshape(2, D) if rows is None else rows
    msg = encode_request(MODEL, 0, {0: rows}, call="c1")
    msg.update({"request": ticket["request"], "ticket": ticket})
    return msg


def _evidence(msg, response, expert_id=0):
    return {
        "receipt": response["receipt"],
        "expert": expert_id,
        "dtype": msg["dtype"],
        "hidden": msg["hidden"],
        "inputs": bytes(msg["data"]),
        "outputs": bytes(response["data"]),
    }


def _settle(desk, evidence, reporter="alice", key="client:alice", net=None):
    _, candidates, call = net
    return asyncio.run(desk.settle_dispute(evidence, reporter, key, candidates, lambda name, model: "float32", call))


# ---- tickets -------------------------------------------------------------------------------------


def test_a_call_without_a_ticket_is_refused_before_any_compute(desk):
    worker = Worker("w1")
    _network(desk, [worker])
    msg = encode_request(MODEL, 0, {0: torch.ones(1, D)})
    with pytest.raises(TicketError, match="ticket"):
        worker.serve(msg, caller="alice")
    assert worker.calls == 0


def test_a_ticket_issued_to_alice_cannot_be_spent_by_mallory(desk):
    worker = Worker("w1")
    _network(desk, [worker])
    ticket = desk.begin("r1", MODEL, "alice", "alice", "standard", 60)
    with pytest.raises(TicketError, match="issued to client"):
        worker.serve(_call(desk, ticket), caller="mallory")
    assert worker.serve(_call(desk, ticket), caller="alice")["status"] == "OK"


def test_an_expired_ticket_is_refused(desk):
    worker = Worker("w1")
    _network(desk, [worker])
    ticket = desk.begin("r1", MODEL, "alice", "alice", "standard", 60)
    NOW[0] += 61
    try:
        with pytest.raises(TicketError, match="expired"):
            worker.serve(_call(desk, ticket), caller="alice")
    finally:
        NOW[0] -= 61


def test_a_free_network_serves_calls_without_tickets_and_signs_no_receipt_outside_a_request():
    desk = EvidenceDesk(Signer.generate(), tickets_required=False, clock=clock)
    worker = Worker("w1")
    _network(desk, [worker])
    response = worker.serve(encode_request(MODEL, 0, {0: torch.ones(1, D)}))
    assert response["status"] == "OK" and "receipt" not in response


# ---- receipts ------------------------------------------------------------------------------------


def test_receipts_are_paid_once_and_only_to_their_signer(desk):
    w1, w2 = Worker("w1"), Worker("w2")
    _network(desk, [w1, w2])
    ticket = desk.begin("r1", MODEL, "alice", "alice", "standard", 60)
    first = w1.serve(_call(desk, ticket), caller="alice")["receipt"]
    second = w1.serve(_call(desk, ticket), caller="alice")["receipt"]
    assert desk.offer([first], "alice") == {"accepted": 1}
    assert desk.offer([first], "alice") == {"stale": 1}  # a replay moves nothing
    forged = dict(second, worker="w2")  # w1's work claimed for w2
    assert desk.offer([forged], "alice") == {"forged": 1}
    assert desk.offer([second], "mallory") == {"not-yours": 1}
    assert desk.offer([second], "alice") == {"accepted": 1}
    work = desk.close("r1")
    assert work.work == {"w1": 4}  # two calls of two rows: the newest receipt says it all
    assert desk.offer([second], "alice") == {"unknown-request": 1}  # closed: paid once


def test_reputation_credit_never_exceeds_what_receipts_show(desk):
    w1 = Worker("w1")
    _network(desk, [w1])
    ticket = desk.begin("r1", MODEL, "alice", "alice", "standard", 60)
    desk.offer([w1.serve(_call(desk, ticket), caller="alice")["receipt"]], "alice")
    assert [desk.credit("r1", "w1", 1) for _ in range(3)] == [1, 0, 0]  # one call, one unit
    assert desk.credit("r1", "w2", 1) == 0  # no receipt of w2 at all


# ---- disputes ------------------------------------------------------------------------------------


def test_a_wrong_answer_is_proven_by_a_trusted_referee_and_slashable(desk):
    liar, anchor, other = Worker("liar", lie=0.5), Worker("trusted-1"), Worker("w3")
    net = _network(desk, [liar, anchor, other])
    ticket = desk.begin("r1", MODEL, "alice", "alice", "standard", 60)
    msg = _call(desk, ticket)
    result = _settle(desk, _evidence(msg, liar.serve(msg, caller="alice")), net=net)
    assert result.verdict.kind == "proven" and result.verdict.slashable
    assert result.verdict.referees == ("trusted-1",) and result.accused == "liar"
    # Forfeited: the liar is not paid for this request, whatever its receipts say.
    desk.offer([liar.serve(_call(desk, ticket), caller="alice")["receipt"]], "alice")
    assert "liar" not in desk.close("r1").work


def test_without_a_trusted_referee_two_owners_must_agree_and_it_is_not_slashable(desk):
    liar, a, b = Worker("liar", lie=0.5), Worker("a"), Worker("b")
    net = _network(desk, [liar, a, b])
    ticket = desk.begin("r1", MODEL, "alice", "alice", "standard", 60)
    msg = _call(desk, ticket)
    result = _settle(desk, _evidence(msg, liar.serve(msg, caller="alice")), net=net)
    assert result.verdict.kind == "proven" and not result.verdict.slashable
    assert set(result.verdict.referees) == {"a", "b"}


def test_an_honest_answer_disputed_is_refuted_and_strikes_the_reporter_until_refused(desk):
    honest, anchor = Worker("honest"), Worker("trusted-1")
    net = _network(desk, [honest, anchor])
    ticket = desk.begin("r1", MODEL, "mallory", "mallory", "standard", 60)
    msg = _call(desk, ticket)
    evidence = _evidence(msg, honest.serve(msg, caller="mallory"))
    verdicts = [_settle(desk, evidence, "mallory", "client:mallory", net) for _ in range(3)]
    assert [v.verdict.kind if v.verdict else v.status for v in verdicts] == ["refuted", "refuted", "refused"]
    assert "refused" == verdicts[2].status and verdicts[2].why
    assert anchor.calls == 2  # the third complaint cost no recomputation


@pytest.mark.parametrize("tamper", ["outputs", "inputs", "receipt-worker", "dtype"])
def test_evidence_that_does_not_hold_is_refused_without_recomputation_or_strike(desk, tamper):
    honest, anchor = Worker("honest"), Worker("trusted-1")
    net = _network(desk, [honest, anchor])
    ticket = desk.begin("r1", MODEL, "alice", "alice", "standard", 60)
    msg = _call(desk, ticket)
    evidence = _evidence(msg, honest.serve(msg, caller="alice"))
    if tamper == "outputs":  # a "wrong answer" the worker never gave
        evidence["outputs"] = bytes(len(evidence["outputs"]))
    elif tamper == "inputs":
        evidence["inputs"] = bytes(len(evidence["inputs"]))
    elif tamper == "receipt-worker":  # honest's answer pinned on the anchor
        evidence["receipt"] = dict(evidence["receipt"], worker="trusted-1")
    elif tamper == "dtype":
        evidence["dtype"] = "bfloat16"
    result = _settle(desk, evidence, net=net)
    assert result.status == "refused" and result.verdict is None
    assert anchor.calls == 0
    assert desk.strikes.allowed("client:alice")[0]


def test_only_the_client_that_made_the_call_may_dispute_it(desk):
    liar, anchor = Worker("liar", lie=0.5), Worker("trusted-1")
    net = _network(desk, [liar, anchor])
    ticket = desk.begin("r1", MODEL, "alice", "alice", "standard", 60)
    msg = _call(desk, ticket)
    evidence = _evidence(msg, liar.serve(msg, caller="alice"))
    result = _settle(desk, evidence, "mallory", "client:mallory", net)
    assert result.status == "refused" and "only the client" in result.why
    desk.close("r1")
    late = _settle(desk, evidence, net=net)
    assert late.status == "refused" and "not open" in late.why


def test_a_dispute_with_no_referee_is_undecided_and_moves_nothing(desk):
    liar = Worker("liar", lie=0.5)
    net = _network(desk, [liar])
    ticket = desk.begin("r1", MODEL, "alice", "alice", "standard", 60)
    msg = _call(desk, ticket)
    result = _settle(desk, _evidence(msg, liar.serve(msg, caller="alice")), net=net)
    assert result.verdict.kind == "undecided"
    assert desk.strikes.allowed("client:alice")[0]


# ---- the private tier: share answers are exact, so a referee's bytes are identical ------------------


class ShareWorker(Worker):
    """Expert 0's integer map on a share: share @ W (mod 2^64); `lie` adds 1 to every entry."""

    WEIGHT = torch.arange(D * 6, dtype=torch.int64).reshape(D, 6) - 7

    def serve(self, msg: dict, caller: str | None = None, from_scheduler: bool = False) -> dict:
        from neuro_dask.privacy.share_wire import decode_share_request

        ticket = self.receipts.admit(msg, caller, from_scheduler)
        request = decode_share_request(msg)
        self.calls += 1
        outputs = {e: ring_matmul(x, self.WEIGHT) + int(self.lie) for e, x in request.inputs.items()}
        return self.receipts.sign("share", msg, encode_share_response(outputs), ticket)


def test_a_lying_share_holder_is_proven_bit_for_bit_and_the_other_holder_never_sees_the_share(desk):
    liar, other_holder, anchor = ShareWorker("liar", lie=1), ShareWorker("trusted-2"), ShareWorker("trusted-1")
    by_address, candidates, call = _network(desk, [liar, other_holder, anchor])
    ticket = desk.begin("r1", MODEL, "alice", "alice", "private", 60)
    share = torch.randint(-(2**62), 2**62, (3, D), dtype=torch.int64)
    msg = {**encode_share_request(MODEL, 0, "gate_up", 16, {0: share}), "request": "r1", "ticket": ticket}
    response = liar.serve(msg, caller="alice")
    evidence = {
        "receipt": response["receipt"],
        "expert": 0,
        "dtype": "int64",
        "hidden": D,
        "inputs": bytes(msg["data"]),
        "outputs": bytes(response["data"]),
        "exclude": ["trusted-2"],
    }
    result = _settle(desk, evidence, net=(by_address, candidates, call))
    assert result.verdict.kind == "proven" and result.verdict.referees == ("trusted-1",)
    assert other_holder.calls == 0  # excluded: it holds the other share of the secret
