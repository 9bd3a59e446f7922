"""Test doubles shared by several test modules."""

from __future__ import annotations


class CountingExecutor:
    """Wraps a model's executor and counts the layers it runs: proves that a refused request
    sent no work at all."""

    def __init__(self, inner):
        self.inner = inner
        self.calls = 0

    @property
    def model_id(self):
        return self.inner.model_id

    @property
    def tier(self):
        return self.inner.tier

    def counters(self):
        return self.inner.counters()

    def run_layer(self, layer, groups):
        self.calls += 1
        return self.inner.run_layer(layer, groups)

    def close(self):
        self.inner.close()


class RoundTripExecutor(CountingExecutor):
    """A local executor that waits `seconds` per layer call, as a network would, and says it is
    remote ("standard"): what speculative decoding's controller needs to see before drafting."""

    def __init__(self, inner, seconds: float = 0.002):
        super().__init__(inner)
        self.seconds = seconds

    @property
    def tier(self):
        return "standard"

    def run_layer(self, layer, groups):
        import time

        time.sleep(self.seconds)  # the simulated round trip, not a poll
        return super().run_layer(layer, groups)
