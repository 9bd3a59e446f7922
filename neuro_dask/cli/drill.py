"""Adversary drills: a local cluster where some workers lie, lag or leave, and a report of what
the trust layer did about it. `neuro-dask drill` and the trust tests both run this.
"""

from __future__ import annotations

import json
import random
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import dask
import torch
from distributed import Client, Worker

from neuro_dask.client.cluster import local_cluster
from neuro_dask.client.loading import load
from neuro_dask.ledger.policy import format_neuro
from neuro_dask.protocol.messages import WorkerStatus


@dataclass(frozen=True)
class DrillReport:
    identical: bool
    wrong_accepted: int
    replicas_per_call: float
    hedges: int
    caught: list[str]
    adversaries: list[str]
    unexercised: list[str]  # adversaries that never received a call, so there was nothing to catch
    unchecked: int  # calls that had to go out unreplicated for lack of another owner (replication rule 5)
    departed: list[str]  # adversaries no longer connected at the end (crash drills)
    extra_calls: float  # hedges sent per call (the cap is trust/hedging.py rule 3)
    late_checked: int  # answers of abandoned (hedged) calls compared after the fact
    layer_p50_ms: float
    layer_p99_ms: float
    tokens: int
    ledger: dict | None = None  # with --ledger: fee charged, who earned, who was slashed, the report

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    def summary(self) -> str:
        return "\n".join(
            [
                f"tokens identical to the honest reference: {'yes' if self.identical else 'NO'} ({self.tokens} tokens)",
                f"wrong results accepted: {self.wrong_accepted}",
                f"replicas per call: {self.replicas_per_call:.2f}; hedges sent: {self.hedges} "
                f"({self.extra_calls:.1%} extra calls; {self.late_checked} late answers compared); "
                f"unchecked for lack of another owner: {self.unchecked}",
                f"per-layer latency: p50 {self.layer_p50_ms:.2f} ms, p99 {self.layer_p99_ms:.2f} ms",
                f"adversaries: {', '.join(self.adversaries) or 'none'}",
                f"caught (out of routing): {', '.join(self.caught) or 'none'}",
                f"never called (nothing to catch): {', '.join(self.unexercised) or 'none'}",
                f"gone by the end (crashed): {', '.join(self.departed) or 'none'}",
            ]
            + (
                []
                if self.ledger is None
                else [
                    f"ledger: client charged {format_neuro(self.ledger['charged'])} NEURO; "
                    f"earned by honest providers {format_neuro(sum(self.ledger['earned'].values()))}, by adversaries "
                    f"{format_neuro(sum(self.ledger['adversaries_earned'].values()))}; slashed: "
                    f"{', '.join(self.ledger['slashed']) or 'none'}; books balance: "
                    f"{'yes' if not self.ledger['problems'] else 'NO: ' + '; '.join(self.ledger['problems'])}",
                ]
            )
        )


def _prompts(model, n: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    if model.tokenizer is not None:
        from neuro_dask.demo.addition import sample_problems

        return model.tokenizer.encode_batch([p.prompt for p in sample_problems(n, rng, held_out=True)])
    return [[rng.randrange(3, model.config.vocab_size) for _ in range(rng.randint(3, 12))] for _ in range(n)]


DEFAULTS = {  # per mode, what an unset drill option means
    "probability": {"straggle": 0.05},  # otherwise 1.0: every call
    "after": {"crash": 3, "defect": 20},  # otherwise 0 (20: a defector first builds a record)
}


def adversary_spec(
    mode: str,
    seed: int,
    scale: float = 0.05,
    probability: float | None = None,
    delay: float = 0.05,
    after: int | None = None,
    blocking: bool = False,
) -> dict:
    """The `neuro.worker.adversary` mapping one drill adversary gets."""
    return {
        "mode": mode,
        "scale": scale,
        "seed": seed,
        "delay": delay,
        "blocking": blocking,
        "probability": DEFAULTS["probability"].get(mode, 1.0) if probability is None else probability,
        "after": DEFAULTS["after"].get(mode, 0) if after is None else after,
    }


CLIENT = "drill-client"


def _fund(url: str, honest: list[str], adversaries: list[str], seed: int) -> dict[str, int]:
    """Fund the drill's client and stake every worker from genesis (idempotent per seed);
    returns each provider's spendable balance before the drill."""
    from neuro_dask.ledger import Ledger, LedgerConfig, neuro, provider

    ledger = Ledger.open(url, LedgerConfig.from_dask_config(), now=time.time())
    try:
        ledger.open_user(CLIENT, exist_ok=True)
        ledger.deposit(CLIENT, neuro(1_000), f"drill-{seed}-client")
        for name in honest + adversaries:
            ledger.stake_from_community(name, f"drill-{seed}", owner=name)
        return {name: ledger.balance(provider(name)) for name in honest + adversaries}
    finally:
        ledger.close()


def _ledger_effect(
    url: str, honest: list[str], adversaries: list[str], before: dict[str, int], client_before: int
) -> dict:
    from neuro_dask.ledger import Ledger, LedgerConfig, provider, user

    ledger = Ledger(url, LedgerConfig.from_dask_config())
    try:
        with ledger.db.read() as cur:
            slashed = sorted({r[0] for r in cur.execute("SELECT provider FROM slashes").all()} & set(adversaries))
        earned = {n: ledger.balance(provider(n)) - before[n] for n in honest + adversaries}
        return {
            "charged": client_before - ledger.balance(user(CLIENT)),
            "earned": {n: earned[n] for n in honest if earned[n]},
            "adversaries_earned": {n: earned[n] for n in adversaries if earned[n]},
            "slashed": slashed,
            "problems": ledger.check_invariants(),
            "report": ledger.report(),
        }
    finally:
        ledger.close()


def _calls_served(client: Client, worker: Worker) -> int:
    """Calls a drill adversary answered; a crashed one can no longer say, but it must have had
    its `after` calls to crash at all, so it counts as exercised."""
    if worker.status.name != "running":
        return worker.extensions["neuro"].adversary.calls if "neuro" in worker.extensions else 1
    return client.sync(WorkerStatus().send, client.rpc(worker.address))["calls_served"]


def run_drill(
    model_path: str | Path,
    workers: int = 10,
    adversaries: float = 0.3,
    mode: str = "perturb",
    trusted: int = 1,
    seed: int = 0,
    prompts: int = 10,
    tokens: int = 32,
    scale: float = 0.05,
    probability: float | None = None,
    delay: float = 0.05,
    after: int | None = None,
    blocking: bool = False,
    ledger: str | None = None,
) -> DrillReport:
    """In-process workers (threads) so a 10-worker drill fits a laptop; the trust policy is on.

    Modes as in neuro_dask.testing: perturb, collude, defect (honest for `after` calls), straggle
    (`probability` of a `delay`, `blocking` to hold the worker meanwhile), crash (after `after`
    calls). Unset options take the mode's default (DEFAULTS). With `ledger` (a database URL) the
    scheduler runs the NEURO ledger: the drill funds its client and stakes every worker from
    genesis first, and the report says what the client paid, who earned and who was slashed."""
    n_bad = round(workers * adversaries)
    n_good = workers - n_bad
    if trusted > n_good:
        raise ValueError(f"--trusted {trusted} exceeds the {n_good} honest workers")
    reference_model = load(model_path)
    rows = _prompts(reference_model, prompts, seed)
    reference = reference_model.generate(rows, max_new_tokens=tokens)
    settings = {
        "neuro.scheduler.trusted": [str(i) for i in range(trusted)],
        "neuro.client.trust": True,
        "neuro.client.seed": seed,
    }
    honest_names, bad_names = [str(i) for i in range(n_good)], [f"adversary-{i}" for i in range(n_bad)]
    if ledger:
        settings.update({"neuro.ledger.url": ledger, "neuro.client.account": CLIENT})
        with dask.config.set(settings):
            before = _fund(ledger, honest_names, bad_names, seed)
            client_before = _client_balance(ledger)
    with (
        dask.config.set(settings),
        local_cluster(n_good, processes=False, worker_args=["--neuro-no-benchmark"], dashboard_address=None) as cluster,
        Client(cluster) as client,
    ):

        async def start(i: int) -> Worker:
            spec = adversary_spec(mode, seed * 1000 + i, scale, probability, delay, after, blocking)
            return await Worker(
                cluster.scheduler_address,
                nthreads=1,
                name=f"adversary-{i}",
                preload=["neuro_worker"],
                preload_argv=[
                    ["--neuro-no-benchmark", "--neuro-owner", f"adversary-{i}", "--neuro-adversary", json.dumps(spec)]
                ],
            )

        bad = [client.sync(start, i) for i in range(n_bad)]
        try:
            client.wait_for_workers(workers, timeout=120)
            with load(model_path, client=client) as model:
                out = model.generate(rows, max_new_tokens=tokens)
                executor = model.executor
            status = client.sync(client.scheduler.neuro_status)["workers"]
            served = {w.address: _calls_served(client, w) for w in bad}
        finally:
            for w in bad:
                client.sync(w.close)
    runner = executor.trusted
    effect = None
    if ledger:
        with dask.config.set(settings):
            effect = _ledger_effect(ledger, honest_names, bad_names, before, client_before)
    bad_addresses = {w.address: str(w.name) for w in bad}
    wrong = sum(n for group, n in runner.accepted_from.items() if set(group) <= set(bad_addresses))
    caught = sorted(name for a, name in bad_addresses.items() if a in status and not status[a]["trust_routable"])
    times = sorted(1000 * t for t in executor.layer_seconds) or [0.0]
    return DrillReport(
        identical=bool(torch.equal(out, reference)),
        wrong_accepted=wrong,
        replicas_per_call=runner.replicas_sent / max(runner.units, 1),
        hedges=runner.hedges,
        caught=caught,
        adversaries=sorted(bad_addresses.values()),
        unexercised=sorted(name for a, name in bad_addresses.items() if not served.get(a)),
        unchecked=runner.unchecked,
        departed=sorted(n for a, n in bad_addresses.items() if a not in status),
        extra_calls=runner.hedges / max(runner.latency.calls, 1),
        late_checked=runner.late_checked,
        layer_p50_ms=statistics.median(times),
        layer_p99_ms=times[min(len(times) - 1, int(0.99 * len(times)))],
        tokens=int(out.shape[0] * tokens),
        ledger=effect,
    )


def _client_balance(url: str) -> int:
    from neuro_dask.ledger import Ledger, LedgerConfig, user

    ledger = Ledger(url, LedgerConfig.from_dask_config())
    try:
        return ledger.balance(user(CLIENT))
    finally:
        ledger.close()
