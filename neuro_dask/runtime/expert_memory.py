"""Loaded experts kept within a byte budget, least recently used evicted first. No I/O."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Hashable

from neuro_dask.errors import ConfigError, NeuroDaskError
from neuro_dask.model.moe import ExpertWeights


class ExpertTooLargeError(NeuroDaskError):
    """One expert alone needs more bytes than the whole expert memory budget."""

    def __init__(self, key: object, size: int, budget: int):
        self.key = key
        self.size = size
        self.budget = budget
        super().__init__(
            f"expert {key!r} needs {size} bytes but the expert memory budget is {budget} bytes: "
            "raise the budget or load experts at a lower precision (neuro.worker.precision: bfloat16, int8 or int4)."
        )

    def __reduce__(self):  # raised on workers: must survive pickling back to the client
        return type(self), (self.key, self.size, self.budget)


def weights_nbytes(weights: ExpertWeights | object) -> int:
    """Bytes held by the expert's tensors (element size times element count, summed); a runner
    (runtime/runners.py: quantized, bfloat16, onnx) reports its own bytes through nbytes()."""
    nbytes = getattr(weights, "nbytes", None)
    if callable(nbytes):
        return int(nbytes())
    return sum(t.element_size() * t.numel() for t in weights.as_dict().values())


class ExpertMemory:
    """An LRU map key -> ExpertWeights (or an expert runner) whose total size never exceeds budget_bytes.

    Rules: get and put make a key the most recently used; put evicts least recently used
    keys until the new expert fits and returns them in eviction order; an expert larger than
    the whole budget is refused before anything is evicted. keys() lists least recent first.
    A lock makes each call atomic, because a Dask worker runs tasks on several threads.
    """

    def __init__(self, budget_bytes: int):
        if budget_bytes <= 0:
            raise ConfigError(f"budget_bytes={budget_bytes}: give a positive number of bytes for loaded experts")
        self.budget_bytes = int(budget_bytes)
        self._entries: OrderedDict[Hashable, tuple[ExpertWeights, int]] = OrderedDict()
        self._used = 0
        self._lock = threading.Lock()

    @property
    def bytes_used(self) -> int:
        return self._used

    def get(self, key: Hashable) -> ExpertWeights | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return None
            self._entries.move_to_end(key)
            return entry[0]

    def put(self, key: Hashable, weights: ExpertWeights) -> list[Hashable]:
        """Store weights under key (replacing any old value); the keys evicted to make room."""
        size = weights_nbytes(weights)
        if size > self.budget_bytes:
            raise ExpertTooLargeError(key, size, self.budget_bytes)
        with self._lock:
            self._remove(key)  # a replaced value is not an eviction
            evicted: list[Hashable] = []
            while self._used + size > self.budget_bytes:
                oldest = next(iter(self._entries))
                self._remove(oldest)
                evicted.append(oldest)
            self._entries[key] = (weights, size)
            self._used += size
            return evicted

    def discard(self, key: Hashable) -> None:
        with self._lock:
            self._remove(key)

    def keys(self) -> list[Hashable]:
        with self._lock:
            return list(self._entries)

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def _remove(self, key: Hashable) -> None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            self._used -= entry[1]
