"""Federated averaging rounds with secure aggregation: the participant and the coordinator.

Pure of Dask: a participant is a plain object; the coordinator calls its methods through handles
that either return values (in-process) or futures with `.result(timeout)` (Dask actors, see
neuro_dask/federated/dask_rounds.py).

One round r, cohort S (the participants still in the federation):
  1. coordinator -> each i in S: the global trainable vector w (float32 [P]), r, S
  2. i: delta_i = local_update(w) on its own data; clip + noise share (dp.py); mask (secure_aggregation.py)
     i -> coordinator: the masked uint64 vector only
  3. the coordinator waits; whoever failed or timed out is dropped (for this round and after)
  4. coordinator -> each survivor: (dropped, survivors); survivor -> coordinator: pair seeds with the dropped
  5. coordinator: exact sum of the survivors' deltas; w <- w + server_lr * sum / |survivors|
  6. optionally, coordinator: metrics of the new w on its own held-out data (`evaluate`), kept in
     the round's result (`FederatedCoordinator.table()`: one row per round, to print or plot)
"""

from __future__ import annotations

import json
import logging
import os
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from neuro_dask.demo.addition import Problem
from neuro_dask.federated.dp import DPSettings, PrivacyAccountant, privatize
from neuro_dask.federated.errors import ParticipantDropped, TooFewSurvivorsError
from neuro_dask.federated.secure_aggregation import (
    FixedPointCodec,
    MaskedUpdate,
    MaskingParticipant,
    Reveal,
    SecureAggregator,
)
from neuro_dask.federated.training import LocalSteps, LocalTrainer

log = logging.getLogger(__name__)


def read_problems(path: str | Path) -> list[Problem]:
    """A participant's data file: one JSON list [a, b] per line."""
    out = []
    for line in Path(path).read_text().splitlines():
        if line.strip():
            a, b = json.loads(line)
            out.append(Problem(int(a), int(b)))
    return out


def write_problems(path: str | Path, problems: Sequence[Problem]) -> None:
    Path(path).write_text("".join(json.dumps([p.a, p.b]) + "\n" for p in problems))


class Participant:
    """Holds local data, a model loaded from the base store, and its secure-aggregation keys.

    data: the problems themselves, or a path to read them from (a path in the worker's config),
    or a zero-argument callable run where the participant lives (tests: data made on the worker).
    drop_in_rounds: rounds in which it leaves mid-round (after training, before sending): tests.
    """

    def __init__(
        self,
        participant_id: str,
        store_path: str,
        data: Any,
        local: LocalSteps = LocalSteps(),
        dp: DPSettings = DPSettings(),
        seed: int = 0,
        codec: FixedPointCodec | None = None,
        entropy: Callable[[int], bytes] | None = None,
        drop_in_rounds: Sequence[int] = (),
    ):
        import neuro_dask as nd

        if callable(data):
            data = data()
        if isinstance(data, (str, Path)):
            data = read_problems(data)
        self.participant_id = participant_id
        self.data: list[Problem] = list(data)
        self.dp = dp
        self.rng = random.Random(f"{seed}/{participant_id}")
        self.noise_rng = np.random.default_rng(self.rng.getrandbits(64))
        self.trainer = LocalTrainer(nd.load(store_path), local)
        self.masking = MaskingParticipant(participant_id, codec, entropy or os.urandom)
        self.drop_in_rounds = set(drop_in_rounds)

    def public_key(self) -> bytes:
        return self.masking.public_key

    def register_peers(self, public_keys: Mapping[str, bytes]) -> None:
        self.masking.register_peers(public_keys)

    def data_size(self) -> int:
        return len(self.data)

    def train_and_mask(self, round_id: int, global_flat: np.ndarray, cohort: Sequence[str]) -> MaskedUpdate:
        delta = self.trainer.local_update(global_flat, self.data, self.rng)
        update = privatize(delta, self.dp, len(cohort), self.noise_rng)
        masked = self.masking.mask(update, round_id, cohort)
        if round_id in self.drop_in_rounds:
            raise ParticipantDropped(f"{self.participant_id} left during round {round_id}")
        return masked

    def reveal(
        self, round_id: int, dropped: Sequence[str], survivors: Sequence[str], sealed_for_me: Mapping[str, bytes]
    ) -> Reveal:
        return self.masking.reveal(round_id, dropped, survivors, sealed_for_me)


def _resolve(value: Any, timeout: float | None) -> Any:
    """In-process handles return values; Dask actor handles return futures."""
    return value.result(timeout) if hasattr(value, "result") and callable(value.result) else value


@dataclass
class RoundResult:
    """One round: who survived and who dropped, the norm of the mean update, the privacy spent
    so far (with DP), and the global model's metrics after the round (with `evaluate`)."""

    round_id: int
    survivors: list[str]
    dropped: list[str]
    update_norm: float
    epsilon: float | None = None
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class FederatedCoordinator:
    """Runs rounds over participant handles; holds the global vector and never an unmasked update.

    evaluate: optional, global vector [P] -> {metric: value} (e.g. `training.evaluator(model,
    held_out)`: loss and accuracy on the coordinator's own held-out data), measured once before the
    first round (`initial_metrics`) and after every round (`RoundResult.metrics`).
    """

    handles: Mapping[str, Any]
    global_flat: np.ndarray
    codec: FixedPointCodec = field(default_factory=FixedPointCodec)
    dp: DPSettings = field(default_factory=DPSettings)
    delta: float = 1e-5
    server_lr: float = 1.0
    min_survivors: int = 2
    timeout: float | None = 600.0
    cohort: list[str] = field(default_factory=list)
    history: list[RoundResult] = field(default_factory=list)
    aggregator: SecureAggregator | None = None
    accountant: PrivacyAccountant | None = None
    evaluate: Callable[[np.ndarray], Mapping[str, float]] | None = None
    initial_metrics: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.cohort = sorted(self.handles) if not self.cohort else list(self.cohort)
        self.aggregator = SecureAggregator(self.codec, self.min_survivors)
        self.accountant = PrivacyAccountant(self.dp)
        if self.evaluate is not None and not self.initial_metrics:
            self.initial_metrics = self._measure()

    def _measure(self) -> dict[str, float]:
        return {str(k): float(v) for k, v in self.evaluate(self.global_flat).items()} if self.evaluate else {}

    def table(self) -> list[dict[str, Any]]:
        """One plain row per round, for a table or a plot: "rounds" (rounds done: 0 is the start,
        before any round, present when there are `initial_metrics`), "survivors", "dropped" (how
        many), "update_norm", "epsilon" (None without DP), then the round's metrics."""
        rows: list[dict[str, Any]] = []
        if self.initial_metrics:
            rows.append(
                {
                    "rounds": 0,
                    "survivors": len(self.handles),
                    "dropped": 0,
                    "update_norm": None,
                    "epsilon": None,
                    **self.initial_metrics,
                }
            )
        for r in self.history:
            rows.append(
                {
                    "rounds": r.round_id + 1,
                    "survivors": len(r.survivors),
                    "dropped": len(r.dropped),
                    "update_norm": r.update_norm,
                    "epsilon": r.epsilon,
                    **r.metrics,
                }
            )
        return rows

    def setup_keys(self) -> None:
        """Relay public keys: each participant derives its pair secrets; the coordinator learns none."""
        keys = {pid: _resolve(self.handles[pid].public_key(), self.timeout) for pid in self.cohort}
        for fut in [self.handles[pid].register_peers(keys) for pid in self.cohort]:
            _resolve(fut, self.timeout)

    def run_round(self) -> RoundResult:
        round_id = len(self.history)
        cohort = list(self.cohort)
        agg = self.aggregator
        assert agg is not None and self.accountant is not None
        agg.begin(round_id, cohort)
        pending: dict[str, Any] = {}
        for pid in cohort:
            try:
                pending[pid] = self.handles[pid].train_and_mask(round_id, self.global_flat, cohort)
            except Exception as exc:  # an in-process participant fails at call time
                log.warning("round %d: %s dropped (%s)", round_id, pid, exc)
        for pid, fut in pending.items():
            try:
                agg.receive(_resolve(fut, self.timeout))
            except Exception as exc:  # a remote one through its future: error, lost worker or timeout
                log.warning("round %d: %s dropped (%s)", round_id, pid, exc)
        survivors, dropped = agg.survivors, agg.dropped
        if len(survivors) < agg.needed:
            raise TooFewSurvivorsError(len(survivors), agg.needed)
        # Every survivor answers once: shares of the survivors' self-masks, seeds of the dropped.
        futs = {s: self.handles[s].reveal(round_id, dropped, survivors, agg.sealed_for(s)) for s in survivors}
        revealed = {s: _resolve(f, self.timeout) for s, f in futs.items()}
        total = agg.finish(revealed)
        mean = total / len(survivors)
        self.global_flat = (self.global_flat.astype(np.float64) + self.server_lr * mean).astype(np.float32)
        self.accountant.record_round(len(survivors), len(cohort))
        eps = self.accountant.epsilon(self.delta) if self.dp.noise_multiplier > 0 else None
        self.cohort = survivors  # a dropped participant's revealed round seeds are spent; it stays out
        result = RoundResult(round_id, survivors, dropped, float(np.linalg.norm(mean)), eps, self._measure())
        self.history.append(result)
        log.info(
            "round %d: %d survivors, dropped %s, |mean update| %.4f %s",
            round_id,
            len(survivors),
            dropped,
            result.update_norm,
            result.metrics,
        )
        return result
