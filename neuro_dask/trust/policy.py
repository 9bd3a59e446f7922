"""A client's trust policy, and the rule for the governed parameters the ledger hands out.

Governed parameters (ledger on) travel with the routes, so every client of a network applies
the same ones:
  1. None handed out: the local policy stands.
  2. `spot_check_bps` (basis points) replaces the local spot-check rate; 0 or absent keeps it.
  3. `min_quorum` replaces the local replication and quorum minimum; the quorum's target and
     maximum replicas grow to at least that minimum, so the policy stays valid.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace

from neuro_dask.trust.hedging import HedgePolicy
from neuro_dask.trust.quorum import QuorumPolicy
from neuro_dask.trust.replication import ReplicationPolicy
from neuro_dask.trust.validation import ValidationPolicy


@dataclass
class TrustPolicy:
    quorum: QuorumPolicy = field(default_factory=QuorumPolicy)
    replication: ReplicationPolicy = field(default_factory=ReplicationPolicy)
    validation: ValidationPolicy = field(default_factory=ValidationPolicy)
    hedging: HedgePolicy = field(default_factory=HedgePolicy)


def governed(policy: TrustPolicy, params: Mapping[str, int]) -> TrustPolicy:
    """`policy` under the governed `params` (rules 1-3)."""
    if not params:
        return policy
    spot_check = params.get("spot_check_bps", 0) / 10_000 or policy.replication.spot_check
    min_quorum = int(params.get("min_quorum", policy.replication.min_quorum))
    replication = replace(policy.replication, spot_check=spot_check, min_quorum=min_quorum)
    quorum = replace(
        policy.quorum,
        min_quorum=min_quorum,
        target_replicas=max(policy.quorum.target_replicas, min_quorum),
        max_total_replicas=max(policy.quorum.max_total_replicas, min_quorum),
    )
    return replace(policy, replication=replication, quorum=quorum)
