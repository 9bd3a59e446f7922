"""Secure aggregation by pairwise additive masks over Z_2^64 (pure: no Dask, no torch).

The aggregator (the coordinator) learns the sum of the participants' updates and nothing else
about any one of them (semi-honest model, see docs/privacy.md "Federated fine-tuning").

Scheme (the pairwise-masking half of Bonawitz et al., CCS 2017, without its double masking):

1. Fixed point. An update x (float vector) is encoded as round(x * 2^f) in two's complement in
   uint64; sums wrap modulo 2^64, so masks cancel *exactly*. `FixedPointCodec` refuses values so
   large that the sum of `max_participants` of them could wrap.
2. Pair seeds. Each participant holds an X25519 key pair and publishes only the public key. Two
   participants i, j derive the same shared secret by Diffie-Hellman; the aggregator, which relays
   public keys, cannot. The seed of round r is HKDF-like blake2b(secret, r): a seed revealed for
   one round says nothing about another round's.
3. Masking. For each other member j of the round's cohort, i adds PRG(seed_ij,r) if i < j (ids in
   string order) and subtracts it otherwise; PRG is SHAKE-256 in counter mode, 8 bytes a value.
   Each pair's masks cancel in the sum; one masked vector alone is uniform on Z_2^64 whenever the
   cohort has at least 2 members (it carries at least one uniform mask it cannot predict).
4. Dropout. A participant that never delivers its masked update leaves its pair masks dangling in
   the survivors' vectors. Once the aggregator has fixed the set of survivors, each survivor reveals
   the round seed it shares with each dropped peer (never with a survivor: `reveal` refuses), the
   aggregator regenerates those masks and removes them, and the sum is the exact sum of the
   survivors' updates; the dropped participant's update is excluded.

Not implemented (documented): Bonawitz's self-masks and Shamir shares, which protect a participant
whose update arrives *after* it was declared dropped against a malicious aggregator, and which let
the seeds of a dropped participant be recovered by a threshold of survivors instead of by all.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

from neuro_dask.federated.errors import FixedPointOverflowError, ProtocolError, TooFewSurvivorsError

RING_BITS = 64
_MASK_DOMAIN = b"neuro-dask/secagg/mask/v1"
_SEED_DOMAIN = b"neuro-dask/secagg/seed/v1"


@dataclass(frozen=True)
class FixedPointCodec:
    """float vector <-> uint64 vector in two's complement with `frac_bits` fractional bits.

    Resolution 2^-frac_bits (about 6e-8 for 24 bits); a value must satisfy
    |x| < 2^(63 - frac_bits) / max_participants, so that no sum of max_participants values wraps.
    """

    frac_bits: int = 24
    max_participants: int = 1024

    @property
    def limit(self) -> float:
        return float(2 ** (RING_BITS - 1 - self.frac_bits)) / self.max_participants

    def encode(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float64)
        largest = float(np.max(np.abs(x))) if x.size else 0.0
        if not np.isfinite(largest) or largest >= self.limit:
            raise FixedPointOverflowError(largest, self.limit)
        return np.rint(x * float(2**self.frac_bits)).astype(np.int64).view(np.uint64)

    def decode(self, total: np.ndarray) -> np.ndarray:
        return np.asarray(total, dtype=np.uint64).view(np.int64).astype(np.float64) / float(2**self.frac_bits)


def mask_stream(seed: bytes, length: int) -> np.ndarray:
    """PRG(seed): `length` uint64 values, uniform on Z_2^64, from SHAKE-256."""
    raw = hashlib.shake_256(_MASK_DOMAIN + seed).digest(8 * length)
    return np.frombuffer(raw, dtype="<u8").astype(np.uint64, copy=False)


def round_seed(shared_secret: bytes, round_id: int) -> bytes:
    """The pair seed of one round: revealing it does not reveal the secret or other rounds' seeds."""
    return hashlib.blake2b(round_id.to_bytes(8, "little"), key=shared_secret, person=b"nd-secagg-seed", digest_size=32).digest()


def pair_sign(me: str, peer: str) -> int:
    """+1: `me` adds the pair's mask; -1: it subtracts it. The lower id adds."""
    if me == peer:
        raise ProtocolError(f"participant {me!r} cannot pair with itself")
    return 1 if me < peer else -1


@dataclass(frozen=True)
class MaskedUpdate:
    """What a participant sends the aggregator: its masked, fixed-point update."""

    participant: str
    round_id: int
    values: np.ndarray  # uint64 [L]


class MaskingParticipant:
    """A participant's side of secure aggregation: key pair, pair secrets, masking, seed reveal.

    `entropy(n)` returns n random bytes (os.urandom by default; tests inject a seeded one).
    """

    def __init__(self, participant_id: str, codec: FixedPointCodec | None = None,
                 entropy: Callable[[int], bytes] = os.urandom):
        self.participant_id = participant_id
        self.codec = codec or FixedPointCodec()
        self._private = X25519PrivateKey.from_private_bytes(entropy(32))
        self._secrets: dict[str, bytes] = {}
        self._cohorts: dict[int, frozenset[str]] = {}

    @property
    def public_key(self) -> bytes:
        from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

        return self._private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)

    def register_peers(self, public_keys: Mapping[str, bytes]) -> None:
        """Derive a shared secret with every other participant from its public key."""
        for peer, key in public_keys.items():
            if peer == self.participant_id:
                continue
            shared = self._private.exchange(X25519PublicKey.from_public_bytes(key))
            self._secrets[peer] = hashlib.blake2b(shared, person=b"nd-secagg-pair", digest_size=32).digest()

    def mask(self, update: np.ndarray, round_id: int, cohort: Iterable[str]) -> MaskedUpdate:
        """encode(update) + sum over cohort peers of sign * PRG(seed_peer,round) (mod 2^64)."""
        cohort = frozenset(cohort)
        if self.participant_id not in cohort:
            raise ProtocolError(f"{self.participant_id!r} is not in round {round_id}'s cohort")
        if round_id in self._cohorts:
            raise ProtocolError(f"{self.participant_id!r} already masked an update for round {round_id}; "
                                f"masking twice with the same seeds would leak the difference")
        missing = sorted(cohort - set(self._secrets) - {self.participant_id})
        if missing:
            raise ProtocolError(f"{self.participant_id!r} has no public key for {missing}; register_peers first")
        y = self.codec.encode(update)
        with np.errstate(over="ignore"):
            for peer in sorted(cohort - {self.participant_id}):
                m = mask_stream(round_seed(self._secrets[peer], round_id), y.size)
                y = y + m if pair_sign(self.participant_id, peer) > 0 else y - m
        self._cohorts[round_id] = cohort
        return MaskedUpdate(self.participant_id, round_id, y)

    def reveal(self, round_id: int, dropped: Iterable[str], survivors: Iterable[str]) -> dict[str, bytes]:
        """Round seeds shared with the `dropped` peers, for the aggregator to remove their masks.

        Refuses if a peer is named both dropped and surviving, if this participant is itself named
        dropped, or if a named peer was not in the round's cohort.
        """
        dropped, survivors = set(dropped), set(survivors)
        cohort = self._cohorts.get(round_id)
        if cohort is None:
            raise ProtocolError(f"{self.participant_id!r} sent no masked update in round {round_id}")
        if self.participant_id in dropped or dropped & survivors or (dropped | survivors) != cohort:
            raise ProtocolError(f"round {round_id}: dropped {sorted(dropped)} and survivors {sorted(survivors)} "
                                f"must split the cohort {sorted(cohort)} with {self.participant_id!r} surviving")
        return {peer: round_seed(self._secrets[peer], round_id) for peer in sorted(dropped)}


@dataclass
class SecureAggregator:
    """The coordinator's side: it only ever receives MaskedUpdate objects and revealed pair seeds.

    begin(round, cohort) -> receive(masked)... -> survivors/dropped -> finish(revealed) -> sum.
    """

    codec: FixedPointCodec = field(default_factory=FixedPointCodec)
    min_survivors: int = 2
    round_id: int | None = None
    cohort: frozenset[str] = frozenset()
    received: dict[str, MaskedUpdate] = field(default_factory=dict)
    log: list[object] = field(default_factory=list)  # everything it was ever handed (tests inspect it)

    def begin(self, round_id: int, cohort: Sequence[str]) -> None:
        if len(set(cohort)) < self.min_survivors:
            raise TooFewSurvivorsError(len(set(cohort)), self.min_survivors)
        self.round_id, self.cohort, self.received = round_id, frozenset(cohort), {}

    def receive(self, masked: MaskedUpdate) -> None:
        if not isinstance(masked, MaskedUpdate):
            raise ProtocolError(f"the aggregator takes MaskedUpdate objects only, not {type(masked).__name__}")
        if masked.round_id != self.round_id or masked.participant not in self.cohort:
            raise ProtocolError(f"update from {masked.participant!r} for round {masked.round_id} is not expected "
                                f"in round {self.round_id}")
        if masked.participant in self.received:
            raise ProtocolError(f"{masked.participant!r} already sent its update for round {self.round_id}")
        if self.received and masked.values.shape != next(iter(self.received.values())).values.shape:
            raise ProtocolError(f"update from {masked.participant!r} has shape {masked.values.shape}, others differ")
        self.log.append(masked)
        self.received[masked.participant] = masked

    @property
    def survivors(self) -> list[str]:
        return sorted(self.received)

    @property
    def dropped(self) -> list[str]:
        return sorted(self.cohort - set(self.received))

    def finish(self, revealed: Mapping[str, Mapping[str, bytes]]) -> np.ndarray:
        """The exact sum (float64) of the survivors' updates. `revealed[survivor][dropped]` is the
        round seed that survivor shared with that dropped peer (empty when nobody dropped)."""
        survivors, dropped = self.survivors, self.dropped
        if len(survivors) < self.min_survivors:
            raise TooFewSurvivorsError(len(survivors), self.min_survivors)
        self.log.append({s: dict(seeds) for s, seeds in revealed.items()})
        total = np.zeros_like(self.received[survivors[0]].values)
        with np.errstate(over="ignore"):
            for s in survivors:
                total += self.received[s].values
            for s in survivors:
                seeds = revealed.get(s, {})
                if set(seeds) != set(dropped):
                    raise ProtocolError(f"survivor {s!r} revealed seeds for {sorted(seeds)}, need {dropped}")
                for peer, seed in seeds.items():
                    m = mask_stream(seed, total.size)
                    total = total - m if pair_sign(s, peer) > 0 else total + m
        self.round_id = None
        return self.codec.decode(total)
