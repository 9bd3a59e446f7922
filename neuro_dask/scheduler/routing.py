"""Who clients are routed to, in what order, and what they are told of each worker.

Pure: addresses, names, reputation records and the routes the coordinator serves in; routes,
standings and referees out. The `neuro_scheduler` plugin gathers its state, calls these, and
replies (docs/security.md for how clients use a standing).

Rules:
1. A served worker is routed to only when it has the stake (a ledger is on and its name is
   staked; no ledger: everyone) and its owner has not paused it.
2. Its standing, what clients are told, is its reputation record's: trusted, established,
   consecutive validated results, owner, score and `WorkerRecord.routable`.
3. Each expert's workers are ranked by score, highest first; ties keep the coordinator's order
   (fastest first). A worker without a name (it joined without announcing one) ranks with the
   newcomer's score, UNNAMED_SCORE, whatever its record says.
4. Referees for a dispute are the expert's hosts that have a name and are not paused.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Mapping
from typing import Any

from neuro_dask.trust.disputes import Referee
from neuro_dask.trust.reputation import WorkerRecord

UNNAMED_SCORE = 0.5  # a newcomer's score: an unnamed worker ranks as one (rule 3)
DEFAULT_PRECISION = "float32"  # a worker that never said otherwise computes in float32


def stake_ok(ledger_on: bool, name: str | None, staked: Collection[str]) -> bool:
    """Rule 1's stake half: without a ledger everyone qualifies; with one, only staked names."""
    return not ledger_on or name in staked


def routed_workers(
    routes: Mapping[Any, Iterable[str]], has_stake: Callable[[str], bool], paused: Collection[str]
) -> set[str]:
    """Rule 1: every worker of `routes` that has the stake and is not paused."""
    served = {w for workers in routes.values() for w in workers}
    return {w for w in served if has_stake(w) and w not in paused}


def standing_of(record: WorkerRecord) -> dict[str, Any]:
    """Rule 2: what clients are told of one worker's reputation (a fresh dict)."""
    return {
        "trusted": record.trusted,
        "established": record.established,
        "consecutive_valid": record.consecutive_valid,
        "owner": record.owner,
        "score": record.score,
        "routable": record.routable,
    }


def rank_scores(standing: Mapping[str, Mapping[str, Any]], named: Collection[str]) -> dict[str, float]:
    """Rule 3: the score each routed worker ranks by (UNNAMED_SCORE for one without a name)."""
    return {w: s["score"] if w in named else UNNAMED_SCORE for w, s in standing.items()}


def rank_routes(routes: Mapping[tuple[int, int], Iterable[str]], scores: Mapping[str, float]) -> list[list[Any]]:
    """Rule 3: [layer, expert, workers best first] per expert, only the workers `scores` ranks."""
    # sorted is stable: equal scores keep the coordinator's fastest-first order
    return [
        [layer, expert, sorted((w for w in workers if w in scores), key=lambda w: -scores[w])]
        for (layer, expert), workers in routes.items()
    ]


def unloadable_reasons(
    model: str, unloadable: Iterable[tuple[int, int]], load_errors: Mapping[tuple[str, int, int], str]
) -> list[list[Any]]:
    """[layer, expert, the last worker's reason] for experts no live worker could load."""
    return [[layer, expert, load_errors.get((model, layer, expert), "")] for layer, expert in unloadable]


def referee_candidates(
    hosts: Iterable[str], identity: Mapping[str, str], paused: Collection[str], record_of: Callable[[str], WorkerRecord]
) -> list[tuple[str, Referee]]:
    """Rule 4: (address, Referee) for each named, unpaused host; trust/disputes.py orders them."""
    out = []
    for address in hosts:
        name = identity.get(address)
        if name is None or address in paused:
            continue
        r = record_of(name)
        out.append((address, Referee(name, r.owner or name, r.trusted, r.score)))
    return out


def address_of(identity: Mapping[str, str], name: str) -> str | None:
    """The address of the worker named `name`, None if none is connected under it."""
    return next((a for a, n in identity.items() if n == name), None)


def resolve_worker(identity: Mapping[str, str], worker: str) -> tuple[str, str]:
    """(address, name) of a worker given by either; unknown: `worker` stands for both."""
    address = next((a for a, n in identity.items() if worker in (a, n)), worker)
    return address, identity.get(address, worker)


def precision_of(precisions: Mapping[tuple[str, str], str], identity: Mapping[str, str], name: str, model: str) -> str:
    """The precision the worker named `name` computes `model` in (clients compare within its tolerance)."""
    address = address_of(identity, name)
    return precisions.get((address, model), DEFAULT_PRECISION) if address else DEFAULT_PRECISION
