"""Pure pieces of generation: batch preparation, positions, options, token selection.

Shape legend: B batch, T prompt length (after left padding), V vocabulary.
Semantics follow transformers' `generate` so that greedy output is token-identical:
left padding, positions counted over real tokens only, finished rows filled with the pad id.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from neuro_dask.errors import (
    EmptyPromptError,
    GenerationOptionError,
    InputError,
    PromptTooLongError,
    TokenOutOfRangeError,
)


@dataclass(frozen=True)
class Batch:
    ids: torch.Tensor  # [B, T] int64, left padded
    mask: torch.Tensor  # [B, T] bool, True on real tokens


def prepare_batch(
    input_ids: torch.Tensor | Sequence[Sequence[int]],
    attention_mask: torch.Tensor | None,
    pad_id: int,
    vocab_size: int,
) -> Batch:
    """Accept a LongTensor [B, T] (+ optional mask) or ragged lists (left-padded here) and check them."""
    if isinstance(input_ids, torch.Tensor):
        ids = input_ids
        if ids.dim() == 1:
            ids = ids[None]
        if ids.dim() != 2:
            raise InputError(f"input_ids must be [batch, tokens], got shape {tuple(input_ids.shape)}")
        if ids.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
            raise InputError(f"input_ids must hold integer token ids, got dtype {ids.dtype}")
        ids = ids.long()
        if attention_mask is None:
            mask = torch.ones_like(ids, dtype=torch.bool)
        else:
            if tuple(attention_mask.shape) != tuple(ids.shape):
                raise InputError(
                    f"attention_mask shape {tuple(attention_mask.shape)} differs from input_ids {tuple(ids.shape)}"
                )
            mask = attention_mask.bool()
    else:
        ids, mask = _left_pad([list(map(int, row)) for row in input_ids], pad_id)
    if ids.shape[0] == 0:
        raise InputError("no prompts given: pass at least one prompt")
    for row in range(ids.shape[0]):
        if not bool(mask[row].any()):
            raise EmptyPromptError(row)
        real = ids[row][mask[row]]
        bad = real[(real < 0) | (real >= vocab_size)]
        if bad.numel():
            raise TokenOutOfRangeError(int(bad[0]), vocab_size, row)
    # Pad slots are never looked at, but must index the embedding table.
    ids = torch.where(mask, ids, torch.zeros_like(ids))
    return Batch(ids, mask)


def _left_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max((len(r) for r in rows), default=0)
    ids = torch.full((len(rows), max(width, 1)), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), max(width, 1)), dtype=torch.bool)
    for i, row in enumerate(rows):
        if row:
            ids[i, width - len(row) :] = torch.tensor(row, dtype=torch.long)
            mask[i, width - len(row) :] = True
    return ids, mask


def positions_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """Position of each token among its row's real tokens; pads get 1, as transformers' generate
    gives them (a pad's position never reaches a real token through attention, but an
    architecture that mixes positions otherwise, deepseek_v4's compressed attention, sees it)."""
    pos = mask.long().cumsum(-1) - 1
    return pos.masked_fill(~mask, 1)


def check_length(mask: torch.Tensor, max_new_tokens: int, limit: int) -> None:
    lengths = mask.sum(-1)
    for row, length in enumerate(lengths.tolist()):
        if length > limit:
            raise PromptTooLongError(length, limit, row)
        if length + max_new_tokens > limit:
            raise PromptTooLongError(
                length + max_new_tokens, limit, row, "max_position_embeddings (prompt + max_new_tokens)"
            )


@dataclass(frozen=True)
class SamplingOptions:
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None

    def __post_init__(self) -> None:
        if not self.do_sample:
            return
        if not self.temperature > 0:
            raise GenerationOptionError("temperature", self.temperature, "must be > 0 when do_sample=True")
        if self.top_k is not None and self.top_k < 1:
            raise GenerationOptionError("top_k", self.top_k, "must be a positive integer or None")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise GenerationOptionError("top_p", self.top_p, "must be in (0, 1] or None")


def select_next(logits: torch.Tensor, opts: SamplingOptions, generator: torch.Generator | None) -> torch.Tensor:
    """logits [B, V] -> next tokens [B]. Warpers in transformers' order: temperature, top-k, top-p."""
    if not opts.do_sample:
        return logits.argmax(dim=-1)
    probs = next_token_probs(logits, opts)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def next_token_probs(logits: torch.Tensor, opts: SamplingOptions) -> torch.Tensor:
    """logits [B, V] -> the distribution sampling draws from [B, V] (float32), after the warpers."""
    scores = logits.float() / opts.temperature
    if opts.top_k is not None and opts.top_k < scores.shape[-1]:
        kth = torch.topk(scores, opts.top_k, dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if opts.top_p is not None and opts.top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=False, dim=-1)
        cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
        remove_sorted = cumulative <= (1 - opts.top_p)
        remove_sorted[..., -1] = False  # always keep the most likely token
        remove = remove_sorted.scatter(-1, order, remove_sorted)
        scores = scores.masked_fill(remove, float("-inf"))
    return scores.softmax(dim=-1)


def make_generator(seed: int | None) -> torch.Generator | None:
    if seed is None:
        return None
    return torch.Generator().manual_seed(int(seed))
