"""Secure aggregation by double masking over Z_2^64 (Bonawitz et al., CCS 2017; pure: no Dask,
no torch).

The aggregator (the coordinator) learns the sum of the surviving participants' updates and
nothing else about any one of them, even if it lies about who dropped out (docs/privacy.md
"Federated fine-tuning").

1. Fixed point. An update x (float vector) is encoded as round(x * 2^f) in two's complement in
   uint64; sums wrap modulo 2^64, so masks cancel *exactly*. `FixedPointCodec` refuses values so
   large that the sum of `max_participants` of them could wrap.
2. Pair seeds. Each participant holds an X25519 key pair and publishes only the public key. Two
   participants i, j derive the same shared secret by Diffie-Hellman; the aggregator, which relays
   public keys, cannot. The seed of round r is HKDF-like blake2b(secret, r): a seed revealed for
   one round says nothing about another round's.
3. Masking. For each other member j of the round's cohort, i adds PRG(seed_ij,r) if i < j (ids in
   string order) and subtracts it otherwise; PRG is SHAKE-256 in counter mode, 8 bytes a value.
   Each pair's masks cancel in the sum. i also adds PRG(b_i) for a fresh random *self-mask seed*
   b_i, and sends, with its masked vector, Shamir shares of b_i (threshold: a majority of the
   cohort), one per cohort peer, each encrypted and authenticated with the pair's secret: the
   aggregator relays them but cannot read them.
4. Unmasking. Once the aggregator has fixed survivors and dropped, every survivor is asked once
   (`reveal`): it returns its share of each *survivor's* self-mask seed and its round seed with
   each *dropped* peer, never both for one peer, and never twice in a round. The aggregator
   recovers each survivor's b from a threshold of shares, removes the self-masks and the dangling
   pair masks of the dropped, and the sum is the exact sum of the survivors' updates.
   Why double masking: an aggregator that declares a participant dropped after its vector has
   arrived learns that participant's pair seeds but not its self-mask, so the vector stays masked.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

from neuro_dask.federated import shamir
from neuro_dask.federated.errors import FixedPointOverflowError, ProtocolError, TooFewSurvivorsError

RING_BITS = 64
_MASK_DOMAIN = b"neuro-dask/secagg/mask/v1"
_SEED_DOMAIN = b"neuro-dask/secagg/seed/v1"
_SHARE_DOMAIN = b"neuro-dask/secagg/share/v1"
_TAG_BYTES = 16


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
    return hashlib.blake2b(
        round_id.to_bytes(8, "little"), key=shared_secret, person=b"nd-secagg-seed", digest_size=32
    ).digest()


def threshold_for(cohort_size: int) -> int:
    """Shares needed to recover a self-mask seed: a majority of the cohort."""
    return cohort_size // 2 + 1


def share_point(cohort: Iterable[str], participant: str) -> int:
    """A participant's Shamir x-coordinate: its 1-based place in the sorted cohort."""
    return sorted(cohort).index(participant) + 1


def _share_key(shared_secret: bytes, round_id: int, sender: str, receiver: str) -> bytes:
    context = f"{round_id}/{sender}/{receiver}".encode()
    return hashlib.blake2b(_SHARE_DOMAIN + context, key=shared_secret, digest_size=32).digest()


def seal_share(shared_secret: bytes, round_id: int, sender: str, receiver: str, share: bytes) -> bytes:
    """`share` encrypted (SHAKE-256 keystream) and authenticated (keyed blake2b) for `receiver`."""
    key = _share_key(shared_secret, round_id, sender, receiver)
    stream = hashlib.shake_256(b"stream" + key).digest(len(share))
    sealed = bytes(a ^ b for a, b in zip(share, stream, strict=True))
    return sealed + hashlib.blake2b(sealed, key=key, digest_size=_TAG_BYTES).digest()


def open_share(shared_secret: bytes, round_id: int, sender: str, receiver: str, sealed: bytes) -> bytes:
    key = _share_key(shared_secret, round_id, sender, receiver)
    body, tag = sealed[:-_TAG_BYTES], sealed[-_TAG_BYTES:]
    if len(sealed) <= _TAG_BYTES or hashlib.blake2b(body, key=key, digest_size=_TAG_BYTES).digest() != tag:
        raise ProtocolError(f"the share {sender!r} sent {receiver!r} for round {round_id} was altered in transit")
    stream = hashlib.shake_256(b"stream" + key).digest(len(body))
    return bytes(a ^ b for a, b in zip(body, stream, strict=True))


def pair_sign(me: str, peer: str) -> int:
    """+1: `me` adds the pair's mask; -1: it subtracts it. The lower id adds."""
    if me == peer:
        raise ProtocolError(f"participant {me!r} cannot pair with itself")
    return 1 if me < peer else -1


@dataclass(frozen=True)
class MaskedUpdate:
    """What a participant sends the aggregator: its masked, fixed-point update and the sealed
    shares of its self-mask seed, one per cohort peer (only that peer can open its share)."""

    participant: str
    round_id: int
    values: np.ndarray  # uint64 [L]
    sealed_shares: Mapping[str, bytes] = field(default_factory=dict)  # peer -> sealed share


@dataclass(frozen=True)
class Reveal:
    """A survivor's answer when the round is unmasked: shares of the survivors' self-mask seeds
    (x-coordinate, share) and the round seeds it shares with the dropped peers."""

    participant: str
    self_shares: Mapping[str, tuple[int, bytes]]  # survivor -> (x, share of its self-mask seed)
    pair_seeds: Mapping[str, bytes]  # dropped peer -> round seed


class MaskingParticipant:
    """A participant's side of secure aggregation: key pair, pair secrets, masking, seed reveal.

    `entropy(n)` returns n random bytes (os.urandom by default; tests inject a seeded one).
    """

    def __init__(
        self, participant_id: str, codec: FixedPointCodec | None = None, entropy: Callable[[int], bytes] = os.urandom
    ):
        self.participant_id = participant_id
        self.codec = codec or FixedPointCodec()
        self._private = X25519PrivateKey.from_private_bytes(entropy(32))
        self._entropy = entropy
        self._secrets: dict[str, bytes] = {}
        self._cohorts: dict[int, frozenset[str]] = {}
        self._own_shares: dict[int, tuple[int, bytes]] = {}  # round -> my share of my self-mask seed
        self._revealed: set[int] = set()  # rounds already unmasked: never a second answer

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
        """encode(update) + PRG(b) + sum over cohort peers of sign * PRG(seed_peer,round) (mod 2^64),
        with b a fresh self-mask seed, Shamir-shared among the cohort (sealed per peer)."""
        cohort = frozenset(cohort)
        if self.participant_id not in cohort:
            raise ProtocolError(f"{self.participant_id!r} is not in round {round_id}'s cohort")
        if round_id in self._cohorts:
            raise ProtocolError(
                f"{self.participant_id!r} already masked an update for round {round_id}; "
                f"masking twice with the same seeds would leak the difference"
            )
        missing = sorted(cohort - set(self._secrets) - {self.participant_id})
        if missing:
            raise ProtocolError(f"{self.participant_id!r} has no public key for {missing}; register_peers first")
        y = self.codec.encode(update)
        self_seed = self._entropy(32)
        with np.errstate(over="ignore"):
            y = y + mask_stream(self_seed, y.size)
            for peer in sorted(cohort - {self.participant_id}):
                m = mask_stream(round_seed(self._secrets[peer], round_id), y.size)
                y = y + m if pair_sign(self.participant_id, peer) > 0 else y - m
        points = {member: share_point(cohort, member) for member in cohort}
        shares = shamir.split(self_seed, list(points.values()), threshold_for(len(cohort)), self._entropy)
        sealed = {
            peer: seal_share(self._secrets[peer], round_id, self.participant_id, peer, shares[x])
            for peer, x in points.items()
            if peer != self.participant_id
        }
        self._own_shares[round_id] = (points[self.participant_id], shares[points[self.participant_id]])
        self._cohorts[round_id] = cohort
        return MaskedUpdate(self.participant_id, round_id, y, sealed)

    def reveal(
        self, round_id: int, dropped: Iterable[str], survivors: Iterable[str], sealed_for_me: Mapping[str, bytes]
    ) -> Reveal:
        """Once per round: shares of the survivors' self-mask seeds (opened from `sealed_for_me`,
        survivor -> the sealed share it sent this participant; its own kept here) and the round
        seeds shared with the dropped peers.

        Refuses a second call for the round (two answers could hold a peer's self-mask share *and*
        its pair seeds, unmasking it), a peer named both dropped and surviving, this participant
        named dropped, peers outside the round's cohort, and a missing or altered share.
        """
        dropped, survivors = set(dropped), set(survivors)
        cohort = self._cohorts.get(round_id)
        if cohort is None:
            raise ProtocolError(f"{self.participant_id!r} sent no masked update in round {round_id}")
        if round_id in self._revealed:
            raise ProtocolError(
                f"{self.participant_id!r} already answered the unmasking of round {round_id}; "
                "a second answer could unmask a peer"
            )
        if self.participant_id in dropped or dropped & survivors or (dropped | survivors) != cohort:
            raise ProtocolError(
                f"round {round_id}: dropped {sorted(dropped)} and survivors {sorted(survivors)} "
                f"must split the cohort {sorted(cohort)} with {self.participant_id!r} surviving"
            )
        missing = sorted(survivors - {self.participant_id} - set(sealed_for_me))
        if missing:
            raise ProtocolError(f"round {round_id}: no self-mask share from survivor(s) {missing}")
        self._revealed.add(round_id)
        shares = {self.participant_id: self._own_shares.pop(round_id)}
        x = share_point(cohort, self.participant_id)
        for peer in sorted(survivors - {self.participant_id}):
            shares[peer] = (
                x,
                open_share(self._secrets[peer], round_id, peer, self.participant_id, sealed_for_me[peer]),
            )
        seeds = {peer: round_seed(self._secrets[peer], round_id) for peer in sorted(dropped)}
        return Reveal(self.participant_id, shares, seeds)


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

    @property
    def needed(self) -> int:
        """Survivors a round needs: the configured minimum, and a threshold of self-mask shares."""
        return max(self.min_survivors, threshold_for(len(self.cohort)))

    def receive(self, masked: MaskedUpdate) -> None:
        if not isinstance(masked, MaskedUpdate):
            raise ProtocolError(f"the aggregator takes MaskedUpdate objects only, not {type(masked).__name__}")
        if masked.round_id != self.round_id or masked.participant not in self.cohort:
            raise ProtocolError(
                f"update from {masked.participant!r} for round {masked.round_id} is not expected "
                f"in round {self.round_id}"
            )
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

    def sealed_for(self, participant: str) -> dict[str, bytes]:
        """The sealed self-mask shares the survivors addressed to `participant` (to relay)."""
        return {
            s: self.received[s].sealed_shares[participant]
            for s in self.survivors
            if s != participant and participant in self.received[s].sealed_shares
        }

    def finish(self, revealed: Mapping[str, Reveal]) -> np.ndarray:
        """The exact sum (float64) of the survivors' updates from every survivor's Reveal."""
        survivors, dropped = self.survivors, self.dropped
        if len(survivors) < self.needed:
            raise TooFewSurvivorsError(len(survivors), self.needed)
        self.log.append(dict(revealed))
        threshold = threshold_for(len(self.cohort))
        total = np.zeros_like(self.received[survivors[0]].values)
        with np.errstate(over="ignore"):
            for s in survivors:
                total += self.received[s].values
            for s in survivors:
                answer = revealed.get(s)
                if not isinstance(answer, Reveal) or set(answer.pair_seeds) != set(dropped):
                    raise ProtocolError(f"survivor {s!r} did not reveal the round seeds of {dropped}")
                for peer, seed in answer.pair_seeds.items():
                    m = mask_stream(seed, total.size)
                    total = total - m if pair_sign(s, peer) > 0 else total + m
            for s in survivors:
                points = dict(r.self_shares[s] for r in revealed.values() if s in r.self_shares)
                total -= mask_stream(shamir.combine(points, threshold), total.size)
        self.round_id = None
        return self.codec.decode(total)
