"""KV cache: preallocated per layer, so a decode step copies one slot instead of the whole history."""

from __future__ import annotations

import torch


class KVCache:
    """Keys and values of every trunk layer, [B, G, capacity, Dh] each, filled left to right.

    All rows share the slot index (left padding keeps prompts aligned); which slots hold real
    tokens is tracked by the caller's key_valid mask, not here.
    """

    def __init__(
        self,
        layers: int,
        batch: int,
        kv_heads: int,
        head_dim: int,
        capacity: int,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
    ):
        shape = (batch, kv_heads, capacity, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.capacity = capacity
        self.length = 0  # slots filled; advanced once per step by advance()
        self._pending = 0

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write this step's k, v [B, G, T, Dh] after the filled slots; return every slot so far."""
        t = k.shape[2]
        end = self.length + t
        if end > self.capacity:
            raise RuntimeError(f"KV cache overflow: {end} slots needed, {self.capacity} allocated")
        self.keys[layer][:, :, self.length : end] = k
        self.values[layer][:, :, self.length : end] = v
        self._pending = t
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def truncate(self, length: int) -> None:
        """Forget every slot from `length` on (speculative decoding: drafts the model rejected)."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot truncate a cache of {self.length} slots to {length}")
        self.length = length

    def keep(self, start: int, slots: list[int]) -> None:
        """Move `slots` (written from `start` on) to start, start+1, ... and forget the rest: the
        path a tree verification kept (model/speculation.py's DraftTree)."""
        if any(not start <= s < self.length for s in slots):
            raise ValueError(f"slots {slots} are not among the written slots {start}..{self.length - 1}")
        index = torch.tensor(slots, dtype=torch.long)
        end = start + len(slots)
        for layer in range(len(self.keys)):
            self.keys[layer][:, :, start:end] = self.keys[layer].index_select(2, index)
            self.values[layer][:, :, start:end] = self.values[layer].index_select(2, index)
        self.length = end

    def advance(self) -> None:
        """Commit the slots written by this step's layers."""
        self.length += self._pending
        self._pending = 0
