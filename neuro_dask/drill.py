"""Adversary drills: a local cluster where some workers lie, lag or leave, and a report of what
the trust layer did about it. `neuro-dask drill` and the trust tests both run this.
"""

from __future__ import annotations

import json
import random
import statistics
from dataclasses import asdict, dataclass
from pathlib import Path

import dask
import torch
from distributed import Client, Worker

from neuro_dask.cluster import local_cluster
from neuro_dask.loading import load


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

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    def summary(self) -> str:
        return "\n".join([
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
        ])


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


def adversary_spec(mode: str, seed: int, scale: float = 0.05, probability: float | None = None,
                   delay: float = 0.05, after: int | None = None, blocking: bool = False) -> dict:
    """The `neuro.worker.adversary` mapping one drill adversary gets."""
    return {"mode": mode, "scale": scale, "seed": seed, "delay": delay, "blocking": blocking,
            "probability": DEFAULTS["probability"].get(mode, 1.0) if probability is None else probability,
            "after": DEFAULTS["after"].get(mode, 0) if after is None else after}


def _calls_served(client: Client, worker: Worker) -> int:
    """Calls a drill adversary answered; a crashed one can no longer say, but it must have had
    its `after` calls to crash at all, so it counts as exercised."""
    if worker.status.name != "running":
        return worker.extensions["neuro"].adversary.calls if "neuro" in worker.extensions else 1
    return client.sync(client.rpc(worker.address).neuro_status)["calls_served"]


def run_drill(model_path: str | Path, workers: int = 10, adversaries: float = 0.3, mode: str = "perturb",
              trusted: int = 1, seed: int = 0, prompts: int = 10, tokens: int = 32,
              scale: float = 0.05, probability: float | None = None, delay: float = 0.05,
              after: int | None = None, blocking: bool = False) -> DrillReport:
    """In-process workers (threads) so a 10-worker drill fits a laptop; the trust policy is on.

    Modes as in neuro_dask.testing: perturb, collude, defect (honest for `after` calls), straggle
    (`probability` of a `delay`, `blocking` to hold the worker meanwhile), crash (after `after`
    calls). Unset options take the mode's default (DEFAULTS)."""
    n_bad = round(workers * adversaries)
    n_good = workers - n_bad
    if trusted > n_good:
        raise ValueError(f"--trusted {trusted} exceeds the {n_good} honest workers")
    reference_model = load(model_path)
    rows = _prompts(reference_model, prompts, seed)
    reference = reference_model.generate(rows, max_new_tokens=tokens)
    settings = {"neuro.scheduler.trusted": [str(i) for i in range(trusted)], "neuro.client.trust": True,
                "neuro.client.seed": seed}
    with dask.config.set(settings), local_cluster(n_good, processes=False, worker_args=["--neuro-no-benchmark"],
                                                   dashboard_address=None) as cluster, Client(cluster) as client:
        async def start(i: int) -> Worker:
            spec = adversary_spec(mode, seed * 1000 + i, scale, probability, delay, after, blocking)
            return await Worker(cluster.scheduler_address, nthreads=1, name=f"adversary-{i}", preload=["neuro_worker"],
                                preload_argv=[["--neuro-no-benchmark", "--neuro-owner", f"adversary-{i}",
                                               "--neuro-adversary", json.dumps(spec)]])

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
    bad_addresses = {w.address: str(w.name) for w in bad}
    wrong = sum(n for group, n in runner.accepted_from.items() if set(group) <= set(bad_addresses))
    caught = sorted(name for a, name in bad_addresses.items() if a in status and not status[a]["trust_routable"])
    times = sorted(1000 * t for t in executor.layer_seconds) or [0.0]
    return DrillReport(
        identical=bool(torch.equal(out, reference)), wrong_accepted=wrong,
        replicas_per_call=runner.replicas_sent / max(runner.units, 1), hedges=runner.hedges, caught=caught,
        adversaries=sorted(bad_addresses.values()),
        unexercised=sorted(name for a, name in bad_addresses.items() if not served.get(a)),
        unchecked=runner.unchecked, departed=sorted(n for a, n in bad_addresses.items() if a not in status),
        extra_calls=runner.hedges / max(runner.latency.calls, 1), late_checked=runner.late_checked,
        layer_p50_ms=statistics.median(times),
        layer_p99_ms=times[min(len(times) - 1, int(0.99 * len(times)))], tokens=int(out.shape[0] * tokens),
    )
