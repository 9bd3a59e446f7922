"""Errors of federated fine-tuning; all derive from neuro_dask's root NeuroDaskError."""

from __future__ import annotations

from neuro_dask.errors import NeuroDaskError


class FederatedError(NeuroDaskError):
    """Root of the errors neuro_dask.federated raises on purpose."""


class FixedPointOverflowError(FederatedError, ValueError):
    def __init__(self, largest: float, limit: float):
        super().__init__(
            f"an update value of magnitude {largest:.3g} does not fit the fixed-point range (|x| < {limit:.3g} "
            f"so that the sum of all participants cannot wrap); clip updates (DPSettings.clip_norm) or lower "
            f"frac_bits"
        )
        self.largest, self.limit = largest, limit


class ProtocolError(FederatedError):
    """A participant or the aggregator was asked for something the protocol forbids (e.g. to reveal
    the pair seed of a peer whose masked update arrived, which would unmask that peer)."""


class TooFewSurvivorsError(FederatedError):
    def __init__(self, survivors: int, minimum: int):
        super().__init__(
            f"only {survivors} participants survived the round, the aggregator needs at least {minimum}: "
            f"with fewer, the sum would reveal an individual update; the round is discarded, retry it"
        )
        self.survivors, self.minimum = survivors, minimum


class ParticipantDropped(FederatedError):
    """Raised by a participant (or injected in tests) that leaves mid-round."""
