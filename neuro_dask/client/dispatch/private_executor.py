"""PrivateExecutor: a layer's expert calls on secret shares, so that no worker sees hidden states.

Per layer and expert (docs/privacy.md):
  1. the client encodes rows x in fixed point (Z_2^64, scale 2^f), splits them into two additive
     shares and sends each to a replica of the expert of a DIFFERENT owner (Standing.owner, or the
     worker's own address when it declares none); each worker returns [gate | up] of its share;
  2. the client adds the two answers (scale 2^2f), decodes, computes h = silu(gate) * up itself,
     re-encodes, re-splits (fresh randomness) and sends the shares of h to a pair again;
  3. each worker returns down(share); the client adds and decodes: the expert's output.
Two round trips per layer instead of one; a worker only ever receives uniformly random ring
elements. Experts with fewer than two distinct owners among their live replicas are refused
(PrivateTierUnavailableError) after waiting `missing_expert_wait` for the scheduler to place
more: the tier's guarantee assumes the two share holders do not collude.

With neuro.client.trust, each step is computed on two independent splits by worker-disjoint
pairs and the two ring sums must be equal bit for bit (the linear map is exact on the ring);
a disagreement is settled by a third split, and the liar found by re-asking one of the losing
shares of a third worker (`_verify`). An expert with no second disjoint pair runs unverified
(counted in `stats["unverified"]`).

It wraps a DistributedExecutor and uses its public side: routes, suspects, reports (load, call
records, judged replies, receipts, disputes) and its request scope, priced at the private tier
(`requests`); calls go over Dask comms to each worker's `neuro_expert_share` handler (the direct
transport path whatever neuro.client.transport says).
With a ledger, requests are held at the private tier's price; each share holder signs a receipt
for every share it computes, and the request's fee pays the rows those receipts show.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import torch
import torch.nn.functional as F

from neuro_dask.client.dispatch.executor import DistributedExecutor
from neuro_dask.client.dispatch.requests import PaidRequests
from neuro_dask.client.dispatch.routes import ExpertUnavailableError, RouteTable
from neuro_dask.client.dispatch.trusted import Dispute, Outcome
from neuro_dask.errors import NeuroDaskError
from neuro_dask.privacy.fixed_point import FRAC_BITS, decode, encode
from neuro_dask.privacy.share_wire import decode_share_response, encode_share_request
from neuro_dask.privacy.sharing import RandomBytes, reconstruct, split
from neuro_dask.protocol.records import CallReport

log = logging.getLogger(__name__)


class PrivateTierUnavailableError(NeuroDaskError):
    """Some expert has no two live replicas of distinct owners: its shares cannot be kept apart."""

    def __init__(self, model: str, layer: int, experts, owners: Mapping[int, list[str]]):
        self.model, self.layer, self.experts = model, layer, sorted(experts)
        self.owners = {int(e): list(o) for e, o in owners.items()}
        super().__init__(
            f"privacy='private' needs every expert served by workers of at least 2 distinct owners, but expert(s) "
            f"{self.experts} of layer {layer} of model {model!r} have live replicas of owner(s) "
            f"{ {e: self.owners.get(e, []) for e in self.experts} }: start workers of another owner "
            "(`--neuro-owner ID`), raise the scheduler's --neuro-replicas, or use the standard tier"
        )


def owner_of(routes: RouteTable, worker: str) -> str:
    """The owner that counts for non-collusion: the declared owner, or the worker itself."""
    return routes.standing_of(worker).owner or worker


def plan_pairs(
    routes: RouteTable,
    layer: int,
    rows: Mapping[int, int],
    exclude: set[str] = frozenset(),
    avoid: Mapping[int, set[str]] | None = None,
) -> tuple[dict[int, tuple[str, str]], dict[int, list[str]]]:
    """Pure: expert -> (worker of share 0, worker of share 1) of distinct owners, spreading rows
    over the least-loaded replicas; and expert -> its live owners for experts without a pair.
    `exclude`: workers not to use at all; `avoid[e]`: workers not to use for expert e (those
    that computed another split of it, so that a second opinion is an independent one)."""
    load: dict[str, int] = {}
    pairs: dict[int, tuple[str, str]] = {}
    short: dict[int, list[str]] = {}
    avoid = avoid or {}
    for expert in sorted(rows):
        candidates = [w for w in routes.ranked(layer, expert) if w not in exclude and w not in avoid.get(expert, ())]
        if not candidates:
            short[expert] = []
            continue
        first = min(candidates, key=lambda w: load.get(w, 0))
        others = [w for w in candidates if owner_of(routes, w) != owner_of(routes, first)]
        if not others:
            short[expert] = sorted({owner_of(routes, w) for w in candidates})
            continue
        second = min(others, key=lambda w: load.get(w, 0))
        for w in (first, second):
            load[w] = load.get(w, 0) + rows[expert]
        pairs[expert] = (first, second)
    return pairs, short


@dataclass(frozen=True)
class Computed:
    """One expert's linear step computed on one split: who held which share, what each answered,
    and their sum (the step's exact ring value: any honest split of the input gives the same)."""

    pair: tuple[str, str]
    shares: tuple[torch.Tensor, torch.Tensor]
    answers: tuple[torch.Tensor, torch.Tensor]
    calls: tuple = ()  # per holder: (the call's message, the worker's signed response), for disputes

    @property
    def total(self) -> torch.Tensor:
        return reconstruct(*self.answers)


class PrivateQuorumError(NeuroDaskError):
    """Two independent splits of a private call disagreed and no third could settle it."""

    def __init__(self, layer: int, expert: int, step: str, pairs):
        self.layer, self.expert, self.step, self.pairs = layer, expert, step, [tuple(p) for p in pairs]
        super().__init__(
            f"layer {layer} expert {expert} ({step}): the share holders {self.pairs} disagreed and no "
            "further independent pair of distinct owners was available to decide; nothing unverified "
            "was used. Start more workers of other owners, or raise --neuro-replicas"
        )


class PrivateExecutor:
    """Runs a layer's experts on secret shares, over the wrapped DistributedExecutor's routes."""

    privacy = "private"
    tier = "private"

    def __init__(self, base: DistributedExecutor, frac_bits: int = FRAC_BITS, random_bytes: RandomBytes = os.urandom):
        self.base = base
        self.frac_bits = frac_bits
        self.random_bytes = random_bytes
        self._stats_lock = threading.Lock()
        self._layer = threading.local()  # this thread's layer call: workers used, messages, outcome
        self.stats = {
            "layers": 0,
            "round_trips": 0,
            "messages": 0,
            "bytes_sent": 0,
            "bytes_received": 0,
            "worker_compute_s": 0.0,
            "rows": 0,
            "verified": 0,
            "unverified": 0,
            "disputes": 0,
            "caught": 0,
        }

    # ---- what it shares with the wrapped executor -------------------------------------------

    @property
    def model_id(self) -> str:
        return self.base.model_id

    @property
    def settings(self):
        return self.base.settings

    @property
    def routes(self) -> RouteTable:
        return self.base.routes

    @cached_property
    def requests(self) -> PaidRequests:
        """The wrapped executor's requests, held at the private tier's price (configs/neuro.yaml
        `price-per-private-expert-token`)."""
        return self.base.requests.priced_at("private")

    @property
    def settlements(self) -> list[dict]:
        return self.base.settlements

    def fetch_routes(self) -> RouteTable:
        return self.base.fetch_routes()

    def counters(self) -> dict[str, Any]:
        """The private tier counts for itself (shares, round trips, verified steps): a snapshot."""
        with self._stats_lock:
            return dict(self.stats)

    def flush_reports(self) -> None:
        self.base.flush_reports()

    def close(self) -> None:
        self.base.close()

    # ---- one layer ----------------------------------------------------------------------------

    def run_layer(self, layer: int, groups: Mapping[int, torch.Tensor]) -> dict[int, torch.Tensor]:
        base = self.base
        started = base.clock()
        base.start_layer(layer, groups)  # new replicas, reputation; reports load
        f = self.frac_bits
        call = self._layer
        call.workers, call.messages, call.outcome, call.checked = set(), 0, "failed", False
        try:
            gate_up = self._step(layer, "gate_up", {e: encode(x, f) for e, x in groups.items()}, None)
            hidden = {}
            for e, shares in gate_up.items():
                g, u = decode(shares, 2 * f, torch.float32).chunk(2, dim=-1)
                hidden[e] = encode(F.silu(g) * u, f)
            down = self._step(layer, "down", hidden, int(next(iter(groups.values())).shape[1]))
            if call.outcome == "failed":
                call.outcome = "checked" if call.checked else "ok"
        finally:
            self._record_call(layer, len(groups), base.clock() - started)
        with self._stats_lock:
            self.stats["layers"] += 1
            self.stats["rows"] += sum(int(x.shape[0]) for x in groups.values())
        return {e: decode(down[e], 2 * f, groups[e].dtype) for e in groups}

    def _record_call(self, layer: int, experts: int, seconds: float) -> None:
        """One record per layer for the dashboard's call stream, as the standard tier's (transport
        "private"; outcome ok, checked, caught or failed), sent with the next route refresh."""
        call = self._layer
        self.base.record_call(
            CallReport(layer, experts, tuple(sorted(call.workers)), seconds, call.messages, 0, call.outcome, "private")
        )

    def _step(
        self, layer: int, step: str, secrets: dict[int, torch.Tensor], width: int | None
    ) -> dict[int, torch.Tensor]:
        """The step's exact ring values: from one split, or, with neuro.client.trust, agreed on by
        two independent splits on worker-disjoint pairs (a third settles a disagreement)."""
        first = self._shared_step(layer, step, secrets, width)
        if not self.base.settings.trust:
            return {e: c.total for e, c in first.items()}
        return self._verify(layer, step, secrets, width, first)

    def _verify(
        self, layer: int, step: str, secrets: dict[int, torch.Tensor], width: int | None, first: dict[int, Computed]
    ) -> dict[int, torch.Tensor]:
        """Private quorum. Shares are random, so a second split reveals nothing more; the linear
        map is exact on the ring, so honest splits reconstruct to identical integers and one
        wrong share changes the sum. Agreement validates all four holders; a disagreement is
        settled by a third split, and the losing pair's liar is found by re-asking one of its
        shares of a third worker."""
        used = {e: set(c.pair) for e, c in first.items()}
        second = self._shared_step(layer, step, secrets, width, avoid=used, required=False)
        results: dict[int, torch.Tensor] = {}
        outcomes: list[tuple[str, str, int]] = []  # (worker, kind, expert)
        for e, c1 in first.items():
            c2 = second.get(e)
            if c2 is None:  # no worker-disjoint pair of distinct owners: one opinion only
                self._count("unverified")
                results[e] = c1.total
                continue
            self._layer.checked = True
            if torch.equal(c1.total, c2.total):
                self._count("verified")
                outcomes += [(w, "validated", e) for w in (*c1.pair, *c2.pair)]
                results[e] = c1.total
                continue
            self._count("disputes")
            results[e], judged = self._settle(layer, step, e, secrets[e], width, (c1, c2))
            outcomes += judged
        self._report_judged(layer, step, outcomes)
        return results

    def _settle(
        self,
        layer: int,
        step: str,
        expert: int,
        secret: torch.Tensor,
        width: int | None,
        opinions: tuple[Computed, Computed],
    ) -> tuple[torch.Tensor, list[tuple[str, str, int]]]:
        """A third split decides. It avoids both disputed pairs where enough workers host the
        expert; else one pair, then the other: a third split without the liar matches the honest
        one bit for bit, one with it matches neither (its error depends on the random share)."""
        c1, c2 = opinions
        for avoid in ({*c1.pair, *c2.pair}, set(c1.pair), set(c2.pair)):
            c3 = self._shared_step(layer, step, {expert: secret}, width, avoid={expert: avoid}, required=False).get(
                expert
            )
            if c3 is None:
                continue
            agree = [c for c in opinions if torch.equal(c.total, c3.total)]
            if len(agree) == 1:
                good = agree[0]
                bad = c2 if good is c1 else c1
                judged = [(w, "validated", expert) for w in {*good.pair, *c3.pair}]
                honest = [*good.pair, *c3.pair]
                liar, witnesses = self._find_liar(layer, step, expert, width, bad, good.total, honest)
                if liar is not None:
                    self._count("caught")
                    self._layer.outcome = "caught"
                    judged += [(liar, "invalid", expert)]
                    judged += [(w, "validated", expert) for w in bad.pair if w != liar and w not in honest]
                    self._dispute(layer, expert, bad, liar, witnesses)
                return good.total, judged
        raise PrivateQuorumError(layer, expert, step, [c.pair for c in opinions])

    def _find_liar(
        self,
        layer: int,
        step: str,
        expert: int,
        width: int | None,
        bad: Computed,
        truth: torch.Tensor,
        honest: list[str],
    ) -> tuple[str | None, list[str]]:
        """Re-ask share 0 of the losing split of a worker that may see it (not share 1's holder,
        nor of its owner), one known honest first: the same answer means share 1's holder lied;
        an answer that with share 1's makes the truth means share 0's holder lied. (None, ...)
        when no witness settles it (no one is judged then); the witnesses asked come second."""
        base = self.base
        w0, w1 = bad.pair
        ranked = [
            w
            for w in base.routes.ranked(layer, expert)
            if w not in (w0, w1) and owner_of(base.routes, w) != owner_of(base.routes, w1)
        ]
        asked: list[str] = []
        for witness in sorted(ranked, key=lambda w: w not in honest)[:2]:
            asked.append(witness)
            msg = {
                **encode_share_request(base.model_id, layer, step, self.frac_bits, {expert: bad.shares[0]}),
                **self.requests.stamp(),
            }
            reply = base.client.sync(self._call_all, {witness: msg}, base.settings.deadline)[witness]
            try:
                if isinstance(reply, BaseException):
                    raise reply
                answer = decode_share_response(reply, {expert: bad.shares[0]}, width)[expert]
            except Exception as exc:
                log.info("private quorum: witness %s did not answer (%s)", witness, exc)
                continue
            base.reports.note_receipt(witness, reply)
            if torch.equal(answer, bad.answers[0]):
                return w1, asked
            if torch.equal(reconstruct(answer, bad.answers[1]), truth):
                return w0, asked
        return None, asked

    def _dispute(self, layer: int, expert: int, bad: Computed, liar: str, witnesses: list[str]) -> None:
        """The liar's signed answer to the scheduler, which recomputes it on a referee (the map is
        exact, so an honest referee's bytes are identical). The referee must not see the other
        share of the split: its holder, and the witnesses that were shown share 0, are excluded."""
        index = bad.pair.index(liar)
        if not bad.calls:
            return
        msg, response = bad.calls[index]
        receipt = response.get("receipt") if isinstance(response, dict) else None
        if not isinstance(receipt, dict):
            return
        others = [bad.pair[1 - index]] + (witnesses if index == 1 else [])
        evidence = {
            "receipt": dict(receipt),
            "expert": int(expert),
            "dtype": "int64",
            "hidden": int(msg["width"]),
            "inputs": bytes(msg["data"]),
            "outputs": bytes(response["data"]),
            "exclude": others,
        }
        self.base.reports.file_disputes([Dispute(liar, layer, expert, evidence)])

    def _report_judged(self, layer: int, step: str, outcomes: list[tuple[str, str, int]]) -> None:
        """Validated share holders are reported (credited up to their receipts); a caught one is
        skipped by this client for the cooldown. Its lie cannot be proven to the scheduler without
        revealing the secret, so it costs it nothing beyond this client's routing and pay."""
        if not outcomes:
            return
        self.base.note_outcomes([Outcome(w, kind, f"private:{step}:{layer}:{e}", layer, e) for w, kind, e in outcomes])
        for w in {w for w, kind, _ in outcomes if kind == "invalid"}:
            self.base.suspect(w)

    def _count(self, key: str) -> None:
        with self._stats_lock:
            self.stats[key] += 1

    def _shared_step(
        self,
        layer: int,
        step: str,
        secrets: dict[int, torch.Tensor],
        width: int | None,
        avoid: Mapping[int, set[str]] | None = None,
        required: bool = True,
    ) -> dict[int, Computed]:
        """Apply the step's linear map to every secret through two non-colluding workers;
        `width`: the outputs' columns (None: any even width, the same from both workers).
        `avoid`: workers not to use per expert; with `required=False`, experts that find no pair
        are left out instead of waited for."""
        base = self.base
        pending = dict(secrets)
        results: dict[int, Computed] = {}
        exclude: set[str] = base.suspected()
        waited_since: float | None = None
        while pending:
            pairs, short = plan_pairs(base.routes, layer, {e: x.shape[0] for e, x in pending.items()}, exclude, avoid)
            if short and not pairs:
                if not required:
                    break
                waited_since = self._wait(layer, short, waited_since)
                exclude = set()
                continue
            per_worker: dict[str, dict[int, torch.Tensor]] = {}
            for e, workers in pairs.items():
                for worker, share in zip(workers, split(pending[e], self.random_bytes), strict=True):
                    per_worker.setdefault(worker, {})[e] = share  # a fresh split per expert and try
            stamp = self.requests.stamp()
            calls = {
                w: {**encode_share_request(base.model_id, layer, step, self.frac_bits, g), **stamp}
                for w, g in per_worker.items()
            }
            outcomes = base.client.sync(self._call_all, calls, base.settings.deadline)
            answers: dict[str, dict[int, torch.Tensor]] = {}
            for worker, sent in per_worker.items():
                try:
                    outcome = outcomes[worker]
                    if isinstance(outcome, BaseException):
                        raise outcome
                    answers[worker] = decode_share_response(outcome, sent, width)
                    base.reports.note_receipt(worker, outcome)  # share rows are paid by the signed receipts
                except Exception as exc:  # refused, closed, timed out or malformed: a failed call
                    log.warning(
                        "private layer %d %s: call to %s failed (%s); re-sharing its experts elsewhere",
                        layer,
                        step,
                        worker,
                        exc,
                    )
                    exclude.add(worker)
                    base.suspect(worker)
                    continue
                with self._stats_lock:
                    self.stats["bytes_sent"] += len(calls[worker]["data"])
                    self.stats["bytes_received"] += len(outcome["data"])
                    self.stats["worker_compute_s"] += float(outcome.get("compute_s") or 0.0)
            with self._stats_lock:
                self.stats["round_trips"] += 1
                self.stats["messages"] += len(calls)
            call = self._layer
            if hasattr(call, "workers"):  # inside run_layer (the thread's layer call)
                call.workers.update(answers)
                call.messages += len(calls)
            for e, (w0, w1) in pairs.items():
                if w0 in answers and w1 in answers:  # else both shares are re-sent, freshly split
                    a, b = answers[w0][e], answers[w1][e]
                    if a.shape != b.shape or a.shape[1] % 2 and width is None:
                        raise NeuroDaskError(
                            f"layer {layer} expert {e}: workers {w0} and {w1} answered shares of "
                            f"shapes {tuple(a.shape)} and {tuple(b.shape)}; they serve different "
                            "weights for the same expert"
                        )
                    results[e] = Computed(
                        (w0, w1),
                        (per_worker[w0][e], per_worker[w1][e]),
                        (a, b),
                        ((calls[w0], outcomes[w0]), (calls[w1], outcomes[w1])),
                    )
                    del pending[e]
        return results

    async def _call_all(self, calls: Mapping[str, dict[str, Any]], timeout: float) -> dict[str, Any]:
        client = self.base.client

        async def one(worker: str, msg: dict[str, Any]):
            return await asyncio.wait_for(client.rpc(worker).neuro_expert_share(**msg), timeout)

        replies = await asyncio.gather(*(one(w, m) for w, m in calls.items()), return_exceptions=True)
        return dict(zip(calls, replies, strict=True))

    def _wait(self, layer: int, short: Mapping[int, list[str]], since: float | None) -> float:
        """Poll the scheduler for routes until every expert has a pair, then refuse."""
        base = self.base
        now = base.clock()
        since = now if since is None else since
        if now - since >= base.settings.missing_expert_wait:
            if any(not owners for owners in short.values()):
                raise ExpertUnavailableError(base.model_id, layer, [e for e, o in short.items() if not o], now - since)
            raise PrivateTierUnavailableError(base.model_id, layer, short, short)
        base.sleep(0.05)  # poll: replicas of other owners may still be loading
        try:
            base.routes = base.fetch_routes()
        except (OSError, NeuroDaskError) as exc:
            log.debug("private tier: could not fetch routes: %s", exc)
        base.forgive_suspects()
        return since


def make_private(model: Any, **options: Any) -> Any:
    """Switch a distributed model to the private tier in place (same as nd.load(..., privacy="private"))."""
    if isinstance(model.executor, PrivateExecutor):
        return model
    if not isinstance(model.executor, DistributedExecutor):
        raise NeuroDaskError("the private tier needs a distributed model: nd.load(path, client=client)")
    private = PrivateExecutor(model.executor, **options)
    model.executor = private
    model.use_requests(private.requests)
    return model
