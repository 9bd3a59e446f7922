"""Limits on what one peer may ask: the size of a request, and how often it may ask.

Pure: no Dask, no HTTP, no clock of its own (the rate limiter is handed one). The model API and
the gateway read the numbers from `neuro.security.*` (SecuritySettings) and call these.

- `check_request_limits` refuses a request whose prompts, new tokens or batch are above the
  limits with a LimitExceededError naming the setting to raise.
- `RateLimiter` is a token bucket per key (an API key, a client address): `requests_per_minute`
  refill continuously, up to `burst` may come at once. A key idle long enough for its bucket to
  be full again is forgotten (a full bucket and no bucket behave alike), and at most `max_keys`
  keys are kept, so memory stays bounded whatever the keys are.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass
from typing import Any

from neuro_dask.errors import LimitExceededError

PROMPT_TOKENS = "max-prompt-tokens"
NEW_TOKENS = "max-new-tokens"
BATCH = "max-batch"
_EPSILON = 1e-9


@dataclass(frozen=True)
class RequestLimits:
    """The sizes one request may have (neuro.security.max-prompt-tokens, -new-tokens, -batch)."""

    max_prompt_tokens: int
    max_new_tokens: int
    max_batch: int

    @classmethod
    def from_settings(cls, settings: Any) -> RequestLimits:
        """From a SecuritySettings (or anything with the same three fields)."""
        return cls(int(settings.max_prompt_tokens), int(settings.max_new_tokens), int(settings.max_batch))


def check_prompt_tokens(lengths: Iterable[int], limit: int, start: int = 0) -> None:
    """Each prompt's length in tokens, in order (the first is prompt `start`): the first one above
    `limit` is refused."""
    for index, length in enumerate(lengths, start):
        if length > limit:
            raise LimitExceededError(
                PROMPT_TOKENS, limit, int(length), f"prompt {index}'s length in tokens", "shorten the prompt"
            )


def check_new_tokens(max_new_tokens: int, limit: int) -> None:
    if max_new_tokens > limit:
        raise LimitExceededError(NEW_TOKENS, limit, int(max_new_tokens), "max_new_tokens", "ask for fewer tokens")


def check_batch(prompts: int, limit: int, fix: str = "send fewer prompts per call") -> None:
    if prompts > limit:
        raise LimitExceededError(BATCH, limit, int(prompts), "the number of prompts in one call", fix)


def check_request_limits(
    limits: RequestLimits,
    prompt_lengths: Iterable[int] = (),
    max_new_tokens: int | None = None,
    batch: int | None = None,
) -> None:
    """Refuse a request above `limits`: the batch (default: the number of prompts) first, then
    max_new_tokens, then each prompt's length. Raises LimitExceededError; returns None when it fits."""
    lengths = list(prompt_lengths)
    check_batch(len(lengths) if batch is None else batch, limits.max_batch)
    if max_new_tokens is not None:
        check_new_tokens(max_new_tokens, limits.max_new_tokens)
    check_prompt_tokens(lengths, limits.max_prompt_tokens)


def default_burst(requests_per_minute: int) -> int:
    """Ten seconds' worth of requests, at least one."""
    return max(1, requests_per_minute // 6)


class RateLimiter:
    """A token bucket per key. `take(key)` spends one token and returns 0.0, or spends nothing and
    returns the seconds until a token is there; `allow(key)` is `take(key) == 0.0`.

    requests_per_minute 0 means unlimited (nothing is kept). `clock()` returns monotonic seconds.
    """

    def __init__(
        self, requests_per_minute: int, clock: Callable[[], float], burst: int | None = None, max_keys: int = 100_000
    ):
        if requests_per_minute < 0:
            raise ValueError(f"requests_per_minute must be >= 0 (0 = unlimited), got {requests_per_minute}")
        self.requests_per_minute = int(requests_per_minute)
        self.burst = default_burst(self.requests_per_minute) if burst is None else int(burst)
        if self.burst < 1:
            raise ValueError(f"burst must be at least 1, got {burst}")
        if max_keys < 1:
            raise ValueError(f"max_keys must be at least 1, got {max_keys}")
        self.max_keys = max_keys
        self._clock = clock
        self._rate = self.requests_per_minute / 60.0  # tokens per second
        self._refill = self.burst / self._rate if self._rate else 0.0  # seconds from empty to full
        # key -> (tokens, last seen), least recently seen first
        self._buckets: OrderedDict[Hashable, tuple[float, float]] = OrderedDict()

    @property
    def unlimited(self) -> bool:
        return self.requests_per_minute == 0

    def __len__(self) -> int:
        """Keys remembered now."""
        return len(self._buckets)

    def take(self, key: Hashable) -> float:
        if self.unlimited:
            return 0.0
        now = self._clock()
        self._forget_idle(now)
        tokens, last = self._buckets.pop(key, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + max(0.0, now - last) * self._rate)
        if tokens >= 1.0 - _EPSILON:  # a refill computed in floats may land a hair below 1
            tokens = max(0.0, tokens - 1.0)
            wait = 0.0
        else:
            wait = (1.0 - tokens) / self._rate
        self._buckets[key] = (tokens, now)  # to the end: the most recently seen
        while len(self._buckets) > self.max_keys:  # under a flood of keys: forget the idlest
            self._buckets.popitem(last=False)
        return wait

    def allow(self, key: Hashable) -> bool:
        return self.take(key) == 0.0

    def _forget_idle(self, now: float) -> None:
        """Drop the keys whose bucket has refilled completely: oldest first, so this stops at the
        first key still refilling (a key's bucket is at worst empty when it is last seen)."""
        while self._buckets:
            key, (_, last) = next(iter(self._buckets.items()))
            if now - last < self._refill:
                return
            del self._buckets[key]
