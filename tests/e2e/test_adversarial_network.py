"""A network of strangers, attacked for real: each class of attack from issue 16 against real
processes over mutual TLS (`neuro-dask certs`, a hardened scheduler with a SQLite ledger, three
workers, the OpenAI gateway), by ordinary certificate holders.

Every attack has an observation that cannot be ambiguous: a marker file that must never appear,
a balance or stake that must not move, a process that must still answer afterwards, a route that
must still be served; and every refusal must be reported with the peer's identity.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import pickle
import shutil
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from distributed import Client
from distributed.comm import connect
from distributed.protocol.serialize import Pickled
from distributed.versions import get_versions
from polling import PollTimeout, poll_until
from process_helpers import NEURO_DASK, Processes, free_port, run_cli

import neuro_dask as nd
from neuro_dask.demo.addition import ASSET_DIR
from neuro_dask.ledger import Ledger, LedgerConfig, neuro, provider, user
from neuro_dask.protocol.wire import encode_request
from neuro_dask.security.signing import Signer
from neuro_dask.security.tls import security_for
from neuro_dask.store.manifest import Manifest
from neuro_dask.trust.receipts import Receipt, digest, sign_receipt

WORKERS = ("w1", "w2", "w3")  # w1 is the operator's trusted anchor


@dataclass
class Net:
    address: str
    certs: Path
    ledger_url: str
    model_id: str
    hidden: int
    gateway: str
    tmp: Path
    processes: Processes
    plain_address: str  # a hardened scheduler on plain TCP: peers without any certificate

    def client(self, name: str = "alice", role: str = "client") -> Client:
        return Client(self.address, security=security_for(role, self.certs, name), timeout=60)

    def ledger(self) -> Ledger:
        return Ledger(self.ledger_url, LedgerConfig.from_dask_config())

    def balance(self, account: str) -> int:
        ledger = self.ledger()
        try:
            return ledger.balance(account)
        finally:
            ledger.close()

    def events(self, topic: str) -> list[dict]:
        """The scheduler's Dask event log of `topic` (the operator's to read), each with its "at"."""
        with self.client("operator", "operator") as op:
            return [{**e, "at": t} for t, e in op.get_events(topic)]

    def workers(self) -> dict[str, dict]:
        """name -> the scheduler's view of each worker (the operator's)."""
        with self.client("operator", "operator") as op:
            status = op.sync(op.scheduler.neuro_status)
        return {w["name"]: {**w, "address": a} for a, w in status["workers"].items()}


def _own_folder(certs: Path, folder: Path, role: str, name: str) -> Path:
    folder.mkdir()
    for file in ("ca.pem", f"{role}-{name}.pem", f"{role}-{name}.key"):
        shutil.copy2(certs / file, folder / file)
    return folder


@pytest.fixture(scope="module")
def net(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("adversarial")
    certs = tmp / "certs"
    assert run_cli("certs", "init", str(certs)).returncode == 0
    issued = [
        ("scheduler", "scheduler", ""),
        ("operator", "operator", ""),
        ("client", "alice", ""),
        ("client", "mallory", ""),
        ("client", "gateway", ""),
        ("worker", "evil", "eve"),
    ]
    issued += [("worker", w, f"owner-{w}") for w in WORKERS]
    for role, name, owner in issued:
        args = ["certs", "issue", str(certs), "--role", role, "--name", name] + (["--owner", owner] if owner else [])
        done = run_cli(*args)
        assert done.returncode == 0, done.stdout
    ledger_url = f"sqlite:///{tmp / 'ledger.db'}"
    ledger = Ledger.open(ledger_url, LedgerConfig.from_dask_config(), now=time.time())
    for account in ("alice", "mallory", "bob"):
        ledger.open_user(account, exist_ok=True)
        ledger.deposit(account, neuro(1_000), f"fund-{account}")
    for w in WORKERS:
        ledger.stake_from_community(w, "adversarial", owner=f"owner-{w}")
    ledger.grant("alice", "gateway", time.time(), "grant-alice-gateway")
    ledger.close()
    port, plain_port, gateway_port = free_port(), free_port(), free_port()
    address = f"tls://127.0.0.1:{port}"
    env = {
        "DASK_NEURO__LEDGER__URL": ledger_url,
        "DASK_NEURO__SCHEDULER__TRUSTED": '["w1"]',
        "DASK_NEURO__SCHEDULER__MAX_UNPROVEN_REPORTS": "2",
        "DASK_NEURO__SCHEDULER__PROBE_INTERVAL": "1",
    }
    import os

    with Processes(tmp) as spawn:
        spawn(
            *NEURO_DASK,
            "scheduler",
            "--tls",
            str(certs),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--dashboard-address",
            "127.0.0.1:0",
            env={**os.environ, **env},
        )
        spawn(
            *NEURO_DASK,
            "scheduler",
            "--host",
            "127.0.0.1",
            "--port",
            str(plain_port),
            "--dashboard-address",
            "127.0.0.1:0",
        )
        for w in WORKERS:
            spawn(
                *NEURO_DASK,
                "worker",
                address,
                "--memory-budget",
                "512MiB",
                "--no-dashboard",
                "--no-idle-only",
                "--neuro-no-benchmark",
                "--tls",
                str(_own_folder(certs, tmp / w, "worker", w)),
            )
        ssl = security_for("operator", certs).get_connection_args("client")["ssl_context"]
        spawn.wait_for_port("127.0.0.1", port, ssl_context=ssl)
        spawn.wait_for_port("127.0.0.1", plain_port)
        with Client(address, security=security_for("operator", certs), timeout=60) as op:
            spawn.wait_for(lambda: len(op.scheduler_info()["workers"]) == len(WORKERS), 120, "three workers")
        published = run_cli("publish", str(ASSET_DIR), "--scheduler", address, "--tls", str(certs), timeout=300)
        assert published.returncode == 0, published.stdout
        keys = tmp / "api-keys.json"
        keys.write_text(json.dumps({"alice-key": "alice", "bob-key": "bob"}))
        gateway_folder = _own_folder(certs, tmp / "gateway", "client", "gateway")
        spawn(
            *NEURO_DASK,
            "serve",
            "--scheduler",
            address,
            "--tls",
            str(gateway_folder),
            "--port",
            str(gateway_port),
            "--api-keys",
            str(keys),
        )
        gateway = f"http://127.0.0.1:{gateway_port}"
        spawn.wait_for(lambda: _get(f"{gateway}/health") is not None, 180, "the gateway")
        manifest = Manifest.read(ASSET_DIR)
        yield Net(
            address,
            certs,
            ledger_url,
            manifest.model_id,
            manifest.model_config.hidden_size,
            gateway,
            tmp,
            spawn,
            f"tcp://127.0.0.1:{plain_port}",
        )
        spawn.check_alive()  # no attack killed any process


def _get(url: str):
    try:
        with urllib.request.urlopen(url, timeout=5) as reply:
            return reply.read()
    except OSError:
        return None


# ---- raw peers -------------------------------------------------------------------------------------


def _args(net: Net, role: str | None, name: str | None):
    if role is None:
        return {}
    return security_for(role, net.certs, name).get_connection_args("worker" if role == "worker" else "client")


async def _exchange(address: str, connection_args: dict, *messages, reply: bool = True):
    """Open a comm as a peer with these credentials, send each message, and read one reply per
    message (None where the peer closed on us)."""
    comm = await connect(address, **connection_args)
    replies = []
    try:
        for msg in messages:
            await comm.write(msg)
            if reply:
                try:
                    replies.append(await asyncio.wait_for(comm.read(), 30))
                except OSError:
                    replies.append(None)
    finally:
        comm.abort()
    return replies


def _send(net: Net, address: str, role: str | None, name: str | None, *messages, reply: bool = True):
    return asyncio.run(_exchange(address, _args(net, role, name), *messages, reply=reply))


def _alive(net: Net, address: str | None = None) -> bool:
    """The scheduler (or a worker) still answers, through the operator's certificate."""
    with net.client("operator", "operator") as op:
        if address is None:
            return op.sync(op.scheduler.identity)["type"] == "Scheduler"
        return op.sync(op.rpc(address).identity)["type"] == "Worker"


def _refusals(net: Net, since: float, kind: str, identity: str, count: int = 1, timeout: float = 20) -> list[dict]:
    found: list[dict] = []

    def enough() -> bool:
        found[:] = [
            e
            for e in net.events("neuro-security")
            if e.get("time", 0) >= since and e.get("kind") == kind and e.get("identity") == identity
        ]
        return len(found) >= count

    with contextlib.suppress(PollTimeout):  # fewer arrived: the caller's assertion judges what did
        poll_until(enough, timeout, f"{count} {kind} refusals of {identity}", interval=0.1)
    return found


class Payload:
    """Unpickling this creates `marker`: the proof that a pickle ran code."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


class DequeBomb:  # 76 bytes that would block an event loop for as long as N says
    def __reduce__(self):
        return collections.deque, (range(10**12), 1)


class ListBomb:  # 61 bytes that would become gigabytes
    def __reduce__(self):
        return list, (range(10**10),)


def _pickles(marker: Path) -> dict[str, bytes]:
    """Crafted pickles of every shape the attacks used."""
    return {
        "code": pickle.dumps(Payload(marker)),
        "type-confusion-dtype": pickle.dumps(np.dtype([("a", "O"), ("b", "<i8")])),
        "type-confusion-scalar": pickle.dumps(np.float64(1.5)),
        "deque-bomb": pickle.dumps(DequeBomb()),
        "list-bomb": pickle.dumps(ListBomb()),
    }


@pytest.fixture
def marker(tmp_path):
    path = tmp_path / "pwned"
    yield path
    assert not path.exists(), "a payload ran"


# ---- 1. no pickle from a worker, a client or a peer without a certificate ----------------------------


def _each_dropped(net: Net, address: str, role: str | None, name: str | None, messages: list) -> None:
    """Each message on its own connection: a pickle is refused at the message's preamble, before
    its sub-frames are read, and the connection dropped (no reply: the peer learns nothing)."""
    for msg in messages:
        assert _send(net, address, role, name, msg) == [None]


@pytest.mark.parametrize("role, name", [("client", "mallory"), ("worker", "evil")])
def test_crafted_pickles_from_every_role_are_refused_before_parsing(net, marker, role, name):
    since = time.time()
    pickles = _pickles(marker)
    started = time.monotonic()
    _each_dropped(
        net,
        net.address,
        role,
        name,
        [{"op": "identity", "x": Pickled({"pickled-obj": raw}, [])} for raw in pickles.values()],
    )
    assert time.monotonic() - started < 60  # the bombs never ran (each alone would take hours)
    assert _alive(net)
    refused = _refusals(net, since, "plain-data", f"{role}:{name}", count=len(pickles))
    assert len(refused) >= len(pickles), refused


def test_even_the_operators_pickles_go_through_the_bounded_loader(net, marker):
    """The operator's certificate may still send pickles; the loader they meet refuses code, numpy's
    reconstructors (the type confusion) and the constructors behind the bombs."""
    since = time.time()
    pickles = _pickles(marker)
    replies = _send(
        net,
        net.address,
        "operator",
        "operator",
        *[{"op": "identity", "x": Pickled({"pickled-obj": raw}, [])} for raw in pickles.values()],
    )
    assert all(r is not None and "PickleRefusedError" in r["exception_text"] for r in replies), replies
    assert _alive(net)
    refused = _refusals(net, since, "pickle", "operator:operator", count=len(pickles))
    assert len(refused) >= len(pickles), refused


def test_crafted_pickles_to_a_worker_are_refused_and_it_keeps_serving(net, marker):
    since = time.time()
    w1 = net.workers()["w1"]["address"]
    messages = [{"op": "neuro_expert", "data": Pickled({"pickled-obj": raw}, [])} for raw in _pickles(marker).values()]
    _each_dropped(net, w1, "client", "mallory", messages)
    assert _alive(net, w1)
    refused = _refusals(net, since, "plain-data", "client:mallory", count=len(messages))
    assert refused, "the worker forwards its refusals to the scheduler's log"


def test_a_peer_without_a_certificate_cannot_crash_a_plain_tcp_hardened_scheduler(net, marker):
    messages = [{"op": "identity", "x": Pickled({"pickled-obj": raw}, [])} for raw in _pickles(marker).values()]
    _each_dropped(net, net.plain_address, None, None, messages)
    [answer] = _send(net, net.plain_address, None, None, {"op": "identity"})
    assert answer["type"] == "Scheduler"  # still answering


# ---- 2. deny by default, stream ops, identity from the certificate ---------------------------------


def test_a_client_cannot_close_a_worker_through_connection_stream(net):
    since = time.time()
    w2 = net.workers()["w2"]["address"]
    _send(net, w2, "client", "mallory", {"op": "connection_stream"}, [{"op": "close"}], reply=False)
    assert _refusals(net, since, "refused-op", "client:mallory")
    assert _alive(net, w2)
    assert "w2" in net.workers()


METRICS = {
    "memory": 1 << 20,
    "cpu": 1.0,
    "managed_bytes": 0,
    "spilled_bytes": {"memory": 0, "disk": 0},
    "bandwidth": {"total": 1e8, "workers": {}, "types": {}},
    "digests_total_since_heartbeat": {},
    "time": 1.0e9,
    "task_counts": {},
}


def _registration(address: str, name: str, budget: int = 0, metrics: dict | None = None) -> dict:
    return {
        "op": "register-worker",
        "reply": False,
        "address": address,
        "status": "running",
        "server_id": "Worker-evil",
        "nthreads": 1,
        "name": name,
        "now": time.time(),
        "resources": {},
        "memory_limit": None,
        "metrics": METRICS if metrics is None else metrics,
        "services": {},
        "local_directory": "/tmp/evil",
        "versions": get_versions(),
        "nanny": None,
        "pid": 1,
        "stimulus_id": "evil-1",
        "extra": {"neuro": {"memory_budget": budget, "speed": 1.0, "owner": "w1", "profile": {}}},
    }


async def _evil_worker(net: Net, since: float, *stream, rpcs=()):
    """Register a worker with the `evil` certificate (asking to be called w1), send `stream`
    messages on its own worker stream, and `rpcs` on separate connections; return once the
    scheduler has handled every stream message (each is refused and reported, in order)."""
    args = _args(net, "worker", "evil")
    comm = await connect(net.address, **args)
    try:
        await comm.write(_registration("tls://127.0.0.1:1", "w1"))
        registered = await asyncio.wait_for(comm.read(), 30)
        await comm.write(list(stream))
        replies = [(await _exchange(net.address, args, msg))[0] for msg in rpcs]
        handled = await asyncio.to_thread(
            _refusals, net, since, "refused-op", "worker:evil", len(stream) + 2
        )  # the stream's, and the two refused rpcs
        return registered, replies, handled
    finally:
        comm.abort()


def test_a_registration_the_scheduler_could_not_digest_is_refused_with_an_answer(net):
    """Empty metrics once broke the scheduler's memory manager for good (every later run failed);
    now the registration is refused, with a reply, before distributed reads it."""
    since = time.time()
    [reply] = _send(net, net.address, "worker", "evil", _registration("tls://127.0.0.1:2", "evil", metrics={}))
    assert reply["status"] == "uncaught-error" and "metrics" in reply["exception_text"], reply
    assert _refusals(net, since, "refused-op", "worker:evil")
    assert "evil" not in net.workers() and _alive(net)


def test_a_worker_certificate_speaks_only_for_itself(net):
    since = time.time()
    before = net.workers()
    w1 = before["w1"]["address"]
    stream = [
        {"op": "worker-status-change", "worker": w1, "status": "paused", "stimulus_id": "evil-2"},
        {"op": "log-event", "topic": "neuro-trust", "msg": {"action": "invalid", "name": "w2"}},
    ]
    rpcs = [
        {"op": "unregister", "address": w1, "stimulus_id": "evil-3"},
        {"op": "neuro_pause", "worker": w1, "paused": True, "reason": "evil"},
        {
            "op": "neuro_experts_loaded",
            "worker": "tls://127.0.0.1:1",
            "model": net.model_id,
            "loaded": [[layer, e] for layer in range(400) for e in range(500)],
            "failed": [],
        },
    ]
    registered, replies, handled = asyncio.run(_evil_worker(net, since, *stream, rpcs=rpcs))
    assert registered["status"] == "OK"  # registering is a worker's right, under its certificate's name
    assert len(handled) >= len(stream) + 2, handled
    assert "w1" in net.workers() and net.workers()["w1"]["address"] == w1  # w1's name stays w1's
    assert all("its own worker" in str(r) for r in replies[:2]), replies
    with net.client("operator", "operator") as op:
        info = op.scheduler_info()["workers"][w1]
        routes = op.sync(op.scheduler.neuro_routes, model=net.model_id)
    assert info["status"] == "running"  # not paused by another worker's stream
    assert all("tls://127.0.0.1:1" not in ws for _, _, ws in routes["routes"])  # 200,000 claims: none counted
    assert not any(e.get("name") == "w2" and e.get("action") == "invalid" for e in net.events("neuro-trust"))
    assert replies[2]["status"] == "OK" and replies[2]["ignored"] == 200_000
    assert _refusals(net, since, "claims", "worker:evil")  # reported, with the certificate that claimed


# ---- 3. evidence, not claims -------------------------------------------------------------------------


def test_forged_outcomes_and_unreachable_reports_cost_an_honest_worker_nothing(net):
    before = net.workers()["w2"]
    stake = net.balance("stake:w2")
    with net.client("mallory") as mallory:
        # the old claim: "invalid, and proven" for an honest staked worker, with no model call at all
        with pytest.raises(Exception, match="outcomes"):
            mallory.sync(
                mallory.scheduler.neuro_report_outcomes,
                model=net.model_id,
                outcomes=[[before["address"], "invalid", "c", 0, 0, 0, "r", True]],
            )
        reply = mallory.sync(
            mallory.scheduler.neuro_report_outcomes,
            model=net.model_id,
            outcomes=[[before["address"], "invalid", "c", 0, 0, 0, "r"]],
        )
        assert reply["credited"] == 0
        since = time.time()
        experts = [[layer, e] for model, layer, e in before["serving"] if model == net.model_id]
        assert (
            mallory.sync(
                mallory.scheduler.neuro_unreachable, worker=before["address"], model=net.model_id, experts=experts
            )["probe"]
            == "scheduled"
        )
    probes = poll_until(
        lambda: [
            e
            for e in net.events("neuro")
            if e.get("action") == "probe" and e.get("worker") == before["address"] and e["at"] >= since
        ],
        60,
        "the scheduler's probe of w2",
        interval=0.1,
    )
    assert probes and probes[-1]["ok"], probes  # the scheduler checked for itself, and it answers
    after = net.workers()["w2"]
    assert sorted(map(tuple, after["serving"])) == sorted(map(tuple, before["serving"]))  # nothing taken away
    assert after["trust_routable"] and after["trust_score"] >= before["trust_score"]
    assert net.balance("stake:w2") == stake


def test_only_the_operator_makes_a_trust_anchor(net):
    with net.client("mallory") as mallory, pytest.raises(Exception, match="only the operator"):
        mallory.sync(mallory.scheduler.neuro_trust, worker="w3", trusted=True)
    assert not net.workers()["w3"]["trust_trusted"]


def _ticketed_call(client: Client, net: Net, worker: str, layer: int, expert: int, account: str, rows: torch.Tensor):
    """Begin a request as this client, send one ticketed call to `worker`: (request, msg, reply)."""
    begun = client.sync(client.scheduler.neuro_request_begin, model=net.model_id, account=account, expert_tokens=64)
    assert begun["status"] == "OK", begun
    msg = encode_request(net.model_id, layer, {expert: rows}, call="c1")
    msg.update({"request": begun["request"], "ticket": begun["ticket"]})
    reply = client.sync(client.rpc(worker).neuro_expert, **msg)
    return begun["request"], msg, reply


def _hosting(net: Net, name: str) -> tuple[str, int, int]:
    w = net.workers()[name]
    layer, expert = next((layer, e) for model, layer, e in w["serving"] if model == net.model_id)
    return w["address"], layer, expert


def test_an_unproven_dispute_strikes_the_reporter_and_the_honest_worker_keeps_its_record(net):
    address, layer, expert = _hosting(net, "w2")
    rows = torch.randn(3, net.hidden)
    before = net.workers()["w2"]
    verdicts = []
    with net.client("mallory") as mallory:
        for _ in range(3):
            begun = mallory.sync(
                mallory.scheduler.neuro_request_begin, model=net.model_id, account="mallory", expert_tokens=64
            )
            msg = encode_request(net.model_id, layer, {expert: rows}, call="c")
            msg.update({"request": begun["request"], "ticket": begun["ticket"]})
            reply = mallory.sync(mallory.rpc(address).neuro_expert, **msg)
            evidence = {
                "receipt": reply["receipt"],
                "expert": expert,
                "dtype": msg["dtype"],
                "hidden": msg["hidden"],
                "inputs": bytes(msg["data"]),
                "outputs": bytes(reply["data"]),
            }
            verdicts.append(mallory.sync(mallory.scheduler.neuro_dispute, model=net.model_id, evidence=evidence))
            mallory.sync(mallory.scheduler.neuro_request_end, request=begun["request"])
    kinds = [v.get("verdict") or v.get("status") for v in verdicts]
    assert kinds[0] in ("refuted", "undecided") and kinds[-1] == "error", verdicts  # refused after the strikes
    after = net.workers()["w2"]
    assert after["trust_routable"] and after["trust_score"] >= before["trust_score"]


# ---- 4. money only from what the scheduler can check ----------------------------------------------------


def test_a_client_cannot_spend_another_users_account(net):
    since = time.time()
    alice = net.balance(user("alice"))
    with net.client("mallory") as mallory:
        reply = mallory.sync(
            mallory.scheduler.neuro_request_begin, model=net.model_id, account="alice", expert_tokens=10_000
        )
    assert reply["status"] == "error" and "alice" in reply["message"] and "grant" in reply["message"], reply
    assert net.balance(user("alice")) == alice
    assert _refusals(net, since, "charge", "client:mallory")


def test_a_worker_serves_no_call_without_a_paid_ticket(net):
    since = time.time()
    address, layer, expert = _hosting(net, "w1")
    with net.client("operator", "operator") as op:
        served = op.sync(op.rpc(address).neuro_status)["calls_served"]
    with net.client("mallory") as mallory:
        reply = mallory.sync(
            mallory.rpc(address).neuro_expert,
            **encode_request(net.model_id, layer, {expert: torch.ones(2, net.hidden)}, call="x"),
        )
    assert reply["status"] == "error" and "ticket" in reply["message"], reply
    with net.client("operator", "operator") as op:
        assert op.sync(op.rpc(address).neuro_status)["calls_served"] == served
    assert _refusals(net, since, "ticket", "client:mallory")  # the worker reports it to the scheduler


def test_invented_and_replayed_receipts_pay_no_one(net):
    address, layer, expert = _hosting(net, "w1")
    rows = torch.randn(2, net.hidden)
    with net.client("alice") as alice:
        request, msg, reply = _ticketed_call(alice, net, address, layer, expert, "alice", rows)
        genuine = reply["receipt"]
        assert alice.sync(alice.scheduler.neuro_report_outcomes, model=net.model_id, outcomes=[], receipts=[genuine])[
            "receipts"
        ] == {"accepted": 1}
        paid = alice.sync(alice.scheduler.neuro_request_end, request=request)
    assert paid["status"] == "OK" and paid["expert_tokens"] == 2, paid
    w1, w2 = net.balance(provider("w1")), net.balance(provider("w2"))
    with net.client("mallory") as mallory:
        begun = mallory.sync(
            mallory.scheduler.neuro_request_begin, model=net.model_id, account="mallory", expert_tokens=64
        )
        invented = Receipt(
            worker="w2",
            kind="expert",
            model=net.model_id,
            layer=0,
            step="",
            experts=(0,),
            counts=(8192,),
            dtype="float32",
            hidden=net.hidden,
            in_digest=digest(b"a"),
            out_digest=digest(b"b"),
            request=begun["request"],
            call="",
            seq=1,
            rows_total=8192,
            units_total=1,
        )
        offered = mallory.sync(
            mallory.scheduler.neuro_report_outcomes,
            model=net.model_id,
            outcomes=[],
            receipts=[sign_receipt(Signer.generate(), invented), genuine],
        )
        assert offered["receipts"] == {"forged": 1, "unknown-request": 1}, offered
        settled = mallory.sync(mallory.scheduler.neuro_request_end, request=begun["request"])
    assert settled["expert_tokens"] == 0
    assert (net.balance(provider("w1")), net.balance(provider("w2"))) == (w1, w2)


def test_the_treasury_moves_only_by_vote(net):
    treasury = net.balance("treasury")
    done = run_cli("ledger", "transfer", "treasury", "user:mallory", "100", "--db", net.ledger_url)
    assert done.returncode == 2 and "propose-spend" in done.stdout, done.stdout
    assert net.balance("treasury") == treasury


def test_the_gateway_charges_only_accounts_granted_to_it(net):
    body = json.dumps({"model": "adder", "prompt": "123+456=", "max_tokens": 5, "temperature": 0}).encode()

    def complete(key):
        request = urllib.request.Request(
            f"{net.gateway}/v1/completions",
            data=body,
            method="POST",
            headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=120) as reply:
                return reply.status, json.loads(reply.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read() or b"{}")

    alice, bob = net.balance(user("alice")), net.balance(user("bob"))
    status, answer = complete("alice-key")
    assert status == 200 and answer["choices"][0]["text"] == "579", answer
    assert net.balance(user("alice")) < alice  # charged through the gateway's grant
    status, answer = complete("bob-key")  # mapped to bob, who granted the gateway nothing
    assert status >= 400 and "grant" in json.dumps(answer), answer
    assert net.balance(user("bob")) == bob


# ---- 5. a model is its whole manifest -------------------------------------------------------------------


def test_a_store_with_the_genuine_trunk_and_other_experts_is_another_model(net, tmp_path):
    poisoned = tmp_path / "poisoned"
    shutil.copytree(ASSET_DIR, poisoned)
    manifest = Manifest.read(poisoned)
    target = manifest.experts[0]
    path = poisoned / target.path
    data = bytearray(path.read_bytes())
    data[-8:] = bytes(8)  # other weights for one expert
    path.write_bytes(bytes(data))
    raw = json.loads((poisoned / "manifest.json").read_text())
    for artifact in raw["artifacts"]:
        if artifact["path"] == target.path:
            artifact["sha256"] = digest(bytes(data)).hex()
    (poisoned / "manifest.json").write_text(json.dumps(raw))
    poisoned_id = Manifest.read(poisoned).model_id
    assert Manifest.read(poisoned).trunk.sha256 == Manifest.read(ASSET_DIR).trunk.sha256
    assert poisoned_id != net.model_id
    published = run_cli("publish", str(poisoned), "--scheduler", net.address, "--tls", str(net.certs), "--no-wait")
    assert published.returncode == 0 and poisoned_id in published.stdout, published.stdout
    expected = nd.load(ASSET_DIR).generate_text(["123+456=", "7+8="], max_new_tokens=5)
    with (
        dask_config({"neuro.client.account": "alice"}),
        net.client("alice") as alice,
        nd.load(ASSET_DIR, client=alice) as model,
    ):
        assert model.executor.model_id == net.model_id  # the genuine store's model, never the poisoned one
        assert model.generate_text(["123+456=", "7+8="], max_new_tokens=5) == expected


# ---- the honest path, on the same attacked network --------------------------------------------------------


def test_an_honest_client_generates_pays_and_the_workers_are_paid_by_their_receipts(net):
    expected = nd.load(ASSET_DIR).generate_text(["123+456=", "999+1="], max_new_tokens=5)
    paid_before = {w: net.balance(provider(w)) for w in WORKERS}
    with (
        dask_config({"neuro.client.account": "alice"}),
        net.client("alice") as alice,
        nd.load(ASSET_DIR, client=alice) as model,
    ):
        assert model.generate_text(["123+456=", "999+1="], max_new_tokens=5) == expected
        settlement = model.executor.settlements[-1]
    assert settlement["status"] == "OK" and settlement["expert_tokens"] > 0, settlement
    earned = {w: net.balance(provider(w)) - paid_before[w] for w in WORKERS}
    assert sum(earned.values()) > 0 and all(v >= 0 for v in earned.values()), earned


def dask_config(values):
    import dask

    return dask.config.set(values)
