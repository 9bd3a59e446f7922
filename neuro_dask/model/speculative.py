"""Speculative generation: a draft proposes tokens, one pass over the layers verifies them all.

The rules (what is kept, how many to draft) are in model/speculation.py; this module runs them
on a model: the prompt's prefill, then passes over [last token, drafts...] whose expert calls go
wherever the model's executor sends them (the network, with its quorums and hedges, the
private tier, a local executor), and the KV cache rolled back past the drafts a pass rejected.
Tokens come out one per step, as from plain decoding, so `stream`, `generate`, `map` and the
gateway see no difference but the speed.

Drafts (`Drafter`: one `DraftSession` per generation, advanced in lockstep with it):
- `PromptLookup` (speculation.py): n-grams of the context, free.
- `ModelDraft`: any local causal MoEModel with the same vocabulary (a small trained draft, or
  the model's own trunk with local low-precision copies of its experts: `self_draft`).
- `MtpDraft` (client/mtp_draft.py): the checkpoint's multi-token-prediction layer, which reads
  the model's final hidden states (a session that `wants_hidden` gets them with each commit).

Shape legend: B batch, K drafts per row, T prompt length, V vocabulary.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from neuro_dask.errors import NeuroDaskError
from neuro_dask.model.generation import Batch, SamplingOptions, positions_from_mask, select_next
from neuro_dask.model.speculation import (
    DraftLength,
    DraftTree,
    PromptLookup,
    committed,
    pad_drafts,
    verify,
    verify_tree,
)


class SpeculationError(NeuroDaskError):
    """A speculative generation cannot run as asked (an unknown draft, a draft of another vocabulary)."""


class DraftSession(Protocol):
    def propose(self, k: int) -> list[list[int]]:
        """Up to k draft tokens per row, after everything committed so far."""
        ...

    def commit(self, tokens: torch.Tensor, hidden: torch.Tensor | None = None) -> None:
        """tokens [B, n]: what every row's context gained (the same n for every row). Only a
        session whose `wants_hidden` is true is given hidden [B, h, D]: the model's final hidden
        states of the positions its pass kept, the last of which is the one right before
        tokens[:, -1] (after the prefill, every prompt position's)."""
        ...


class Drafter(Protocol):
    name: str

    def start(self, rows: list[list[int]], capacity: int) -> DraftSession:
        """One generation's session: `rows` the prompts, `capacity` tokens at most to be committed."""
        ...


# ---- prompt lookup ------------------------------------------------------------------------------------


@dataclass
class _LookupSession:
    lookup: PromptLookup
    contexts: list[list[int]]

    def propose(self, k: int) -> list[list[int]]:
        return [self.lookup.propose(c, k) for c in self.contexts]

    def propose_tree(self, k: int, width: int) -> DraftTree | None:
        """One sequence's continuations after up to `width` earlier occurrences, as a tree."""
        paths = self.lookup.propose_many(self.contexts[0], k, width)
        return DraftTree.from_paths(paths) if paths else None

    def commit(self, tokens: torch.Tensor) -> None:
        for context, new in zip(self.contexts, tokens.tolist(), strict=True):
            context.extend(new)


@dataclass(frozen=True)
class PromptLookupDrafter:
    lookup: PromptLookup = field(default_factory=PromptLookup)
    name: str = "prompt-lookup"

    def start(self, rows: list[list[int]], capacity: int) -> _LookupSession:
        return _LookupSession(self.lookup, [list(r) for r in rows])


# ---- a draft model --------------------------------------------------------------------------------------


class _ModelSession:
    """A draft model's own KV cache, kept in step with the verified tokens: each proposal feeds the
    tokens committed since the last one (one pass), drafts greedily, and rolls its cache back to
    the committed tokens (its drafts are recomputed only if the main model kept them)."""

    def __init__(self, draft: Any, rows: list[list[int]], capacity: int, max_k: int):
        self.draft = draft
        batch: Batch = draft._batch(rows, None)
        b, t = batch.ids.shape
        self.key_valid = torch.zeros(b, t + capacity + max_k + 1, dtype=torch.bool)
        self.key_valid[:, :t] = batch.mask
        positions = positions_from_mask(batch.mask)
        with torch.inference_mode():
            _, self.cache = draft._prefill(
                batch.ids, positions, self.key_valid[:, :t], batch.mask, self.key_valid.shape[1]
            )
        self.filled = t
        self.next_pos = positions[:, -1:] + 1
        self.pending = torch.empty(b, 0, dtype=torch.long)
        self.routed = torch.ones(b, 1, dtype=torch.bool)

    def propose(self, k: int) -> list[list[int]]:
        if k == 0 or self.pending.shape[1] == 0:
            return [[] for _ in range(self.pending.shape[0])]
        return self._chain(k)[0].tolist()

    def propose_tree(self, k: int, width: int) -> DraftTree | None:
        """The greedy chain, with the draft's second choice beside each token when width > 1."""
        if k == 0 or self.pending.shape[1] == 0:
            return None
        return chain_tree(*self._chain(k), width)

    def _chain(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The draft's greedy chain of k tokens per row [B, k], and its second choices [B, k]."""
        with torch.inference_mode():
            logits = self._feed(self.pending)[:, -1]
            self.pending = torch.empty(self.pending.shape[0], 0, dtype=torch.long)
            committed_at, pos_at = self.filled, self.next_pos
            firsts, seconds = [], []
            for i in range(k):
                top = logits.topk(2, dim=-1).indices
                firsts.append(top[:, 0])
                seconds.append(top[:, 1])
                if i < k - 1:
                    logits = self._feed(top[:, :1])[:, -1]
            self.draft._rollback(self.cache, committed_at)
            self.key_valid[:, committed_at:] = False
            self.filled, self.next_pos = committed_at, pos_at
        return torch.stack(firsts, dim=1), torch.stack(seconds, dim=1)

    def _feed(self, ids: torch.Tensor) -> torch.Tensor:
        n = ids.shape[1]
        self.key_valid[:, self.filled : self.filled + n] = True
        positions = self.next_pos + torch.arange(n)
        routed = self.routed.expand(ids.shape[0], n)
        logits = self.draft._verify(ids, positions, self.key_valid[:, : self.filled + n], self.cache, routed)
        self.filled += n
        self.next_pos = self.next_pos + n
        return logits

    def commit(self, tokens: torch.Tensor) -> None:
        self.pending = torch.cat([self.pending, tokens], dim=1)


def chain_tree(first: torch.Tensor, second: torch.Tensor, width: int) -> DraftTree:
    """A draft's greedy chain first [1, k] as a tree, with its second choices second [1, k]
    beside each token when width > 1 (each a leaf)."""
    if width < 2:
        return DraftTree.chain(first[0].tolist())
    tokens, parents, main = [], [], 0
    for i in range(first.shape[1]):
        tokens += [int(first[0, i]), int(second[0, i])]
        parents += [main, main]
        main = len(tokens) - 1  # the chain's node at this depth (the sibling is a leaf)
    return DraftTree(tuple(tokens), tuple(parents))


@dataclass(eq=False)  # one per draft model: generations batch together by it (hashed by identity)
class ModelDraft:
    """Drafts from a local causal model with the same vocabulary (greedy: exact for sampling too)."""

    draft: Any  # an MoEModel whose experts run in this process
    max_k: int = 8
    name: str = "draft-model"
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def start(self, rows: list[list[int]], capacity: int) -> _ModelSession:
        return _ModelSession(self.draft, rows, capacity, self.max_k)


# ---- counters ---------------------------------------------------------------------------------------------


@dataclass
class SpeculationStats:
    """Totals over a model's speculative generations (model.stats()["speculation"])."""

    passes: int = 0
    drafted: int = 0  # draft tokens offered per row, summed over passes
    kept: int = 0  # drafts committed (the rows' fewest kept, per pass)
    tokens: int = 0  # tokens each pass yielded (kept + 1), summed
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def record(self, k: int, m: int) -> None:
        with self.lock:
            self.passes += 1
            self.drafted += k
            self.kept += m
            self.tokens += m + 1

    def snapshot(self) -> dict[str, float]:
        with self.lock:
            per_pass = self.tokens / self.passes if self.passes else 0.0
            rate = self.kept / self.drafted if self.drafted else 0.0
            return {
                "passes": self.passes,
                "drafted": self.drafted,
                "kept": self.kept,
                "tokens": self.tokens,
                "tokens_per_pass": round(per_pass, 3),
                "acceptance": round(rate, 3),
            }


# ---- the generation loop --------------------------------------------------------------------------------


def speculative_steps(
    model: Any,
    batch: Batch,
    max_new_tokens: int,
    opts: SamplingOptions,
    generator: torch.Generator | None,
    stops: torch.Tensor,
    session: DraftSession,
    lengths: DraftLength,
    note_pass: Callable[[int, int], None],
    coalescer: Any,
    feed_limit: int,
    trees: bool = False,
) -> Iterator[torch.Tensor]:
    """Yield the next token of every row [B] per step, as MoEModel._stream does (finished rows
    get the pad id), from passes that each verify a draft. The caller holds the request, for
    `feed_limit` positions per row at most (each pass carries its drafts and one token more)."""
    b, t = batch.ids.shape
    pad = model.generation.pad_or_eos
    key_valid = torch.zeros(b, t + max_new_tokens, dtype=torch.bool)
    key_valid[:, :t] = batch.mask
    positions = positions_from_mask(batch.mask)
    unfinished = torch.ones(b, dtype=torch.bool)
    states = getattr(session, "wants_hidden", False)  # an MTP draft reads the model's own states
    with _hidden_of(model, states) as seen:
        logits, cache = model._prefill(batch.ids, positions, key_valid[:, :t], batch.mask, t + max_new_tokens)
    hidden = seen[-1] if seen else None  # [B, T, D]: the states before each token of `new`, and earlier
    next_pos = positions[:, -1:] + 1
    filled, emitted, fed = t, 0, 1
    new = select_next(logits, opts, generator)[:, None]  # [B, 1]: this pass's tokens
    drafting = model._can_roll_back(cache)
    while True:
        for i in range(new.shape[1]):
            token = torch.where(unfinished, new[:, i], torch.full_like(new[:, i], pad))
            with coalescer.idle():  # the reader holds the token: the others go on without us
                yield token
            emitted += 1
            unfinished &= ~torch.isin(token, stops)
            if emitted == max_new_tokens or not bool(unfinished.any()):
                return
        last = new[:, -1]
        if not drafting:  # this cache cannot take tokens back: plain steps, one token per pass
            key_valid[:, filled] = True
            logits = model._decode(last[:, None], next_pos, key_valid[:, : filled + 1], cache, unfinished[:, None])
            new = select_next(logits, opts, generator)[:, None]
            filled, fed, next_pos = filled + 1, fed + 1, next_pos + 1
            continue
        if states:
            session.commit(new, hidden)
        else:  # a Drafter written before hidden states were offered takes the tokens alone
            session.commit(new)
        started = time.perf_counter()
        if trees and b == 1:
            limit = min(max_new_tokens - emitted, feed_limit - fed) - 1
            depth, width = lengths.choose_shape(limit=limit // 2 if limit > 1 else limit, trees=True)
            with coalescer.idle():
                tree = session.propose_tree(depth, width) if depth and limit > 0 else None
            if tree is not None and tree.size <= limit:
                with _hidden_of(model, states) as seen:
                    new, used = _tree_pass(model, tree, last, next_pos, key_valid, filled, cache, opts, generator)
                hidden = seen[-1][:, [0, *used]] if seen else None
                main, sibling = tree_outcome(tree, used)
                lengths.observe(depth, main, time.perf_counter() - started, nodes=tree.size, sibling=sibling)
                note_pass(tree.size, len(used))
                filled += len(used) + 1
                fed += tree.size + 1
                next_pos = next_pos + len(used) + 1
                continue
        with coalescer.idle():  # drafting is this generation's own work: the others go on
            limit = min(max_new_tokens - emitted, feed_limit - fed) - 1
            drafts = pad_drafts(session.propose(lengths.choose(limit=limit)) if limit > 0 else [], lengths.max_k)
            if drafts.shape[0] != b:
                drafts = torch.empty(b, 0, dtype=torch.long)
        k = drafts.shape[1]
        ids = torch.cat([last[:, None], drafts], dim=1)  # [B, K+1]
        key_valid[:, filled : filled + k + 1] = True
        with _hidden_of(model, states) as seen:
            logits = model._verify(
                ids,
                next_pos + torch.arange(k + 1),
                key_valid[:, : filled + k + 1],
                cache,
                unfinished[:, None].expand(b, k + 1),
            )
        verdict = verify(logits, drafts, opts, generator)
        m = committed(verdict, unfinished)
        # The slots of rejected drafts: out of the cache and out of attention's sight (a rollback
        # by nothing still lets a sliding-window cache trim what it kept for one).
        model._rollback(cache, filled + m + 1)
        key_valid[:, filled + m + 1 : filled + k + 1] = False
        filled += m + 1
        fed += k + 1
        next_pos = next_pos + m + 1
        lengths.observe(k, m, time.perf_counter() - started)
        note_pass(k, m)
        new = verdict.tokens[:, : m + 1]
        hidden = seen[-1][:, : m + 1] if seen else None


def _hidden_of(model: Any, wanted: bool):
    """A block in which the model's passes record their final hidden states (if `wanted`)."""
    return model.final_hidden() if wanted else contextlib.nullcontext([])


def _tree_pass(model, tree: DraftTree, last, next_pos, key_valid, filled: int, cache, opts, generator):
    """One pass over the root and a tree's nodes: the tokens it yields [1, n] and the nodes kept;
    the kept nodes' cache slots moved next to the root's, the others forgotten."""
    n = tree.size
    ids = torch.tensor([[int(last[0]), *tree.tokens]])
    positions = next_pos + torch.tensor([tree.depths()])
    key_valid[:, filled : filled + n + 1] = True
    routed = torch.ones(1, n + 1, dtype=torch.bool)
    logits = model._verify_tree(ids, positions, key_valid[:, : filled + n + 1], cache, routed, tree.visible())
    path, tokens = verify_tree(logits[0], tree, opts, generator)
    model._keep(cache, filled + 1, [filled + node for node in path])
    key_valid[:, filled + 1 + len(path) : filled + n + 1] = False
    return torch.tensor([tokens]), path


def tree_outcome(tree: DraftTree, path: list[int]) -> tuple[int, bool | None]:
    """(the chain's tokens kept, whether a second choice was kept where the chain's was
    rejected: None if there was no second choice there). The chain is each node's first child."""
    node, main = 0, 0
    for kept in path:
        kids = tree.children(node)
        if kept != kids[0]:
            return main, True
        main += 1
        node = kept
    kids = tree.children(node)
    return main, (False if len(kids) > 1 else None)


# ---- choosing a draft ---------------------------------------------------------------------------------------

# Drafts built from a model by name. "self" and "mtp" are registered by neuro_dask/client/
# self_draft.py and mtp_draft.py (they read the model's store, which is the client's business);
# loading a model imports them.
_FACTORIES: dict[str, Callable[..., Drafter]] = {"prompt-lookup": lambda model: PromptLookupDrafter()}


def register_draft(name: str, factory: Callable[..., Drafter]) -> None:
    _FACTORIES[name] = factory


def draft_kinds() -> tuple[str, ...]:
    return (*_FACTORIES, "draft-model")


def resolve_drafter(choice: Any, model: Any, draft_model: Any = None) -> Drafter | None:
    """`speculative=` of generate/stream/map: None or False (plain decoding), True or
    "prompt-lookup", "draft-model" (with `draft_model=`, a local model with the same
    vocabulary), "self" (the model's trunk with local low-precision expert copies), "mtp" (the
    checkpoint's multi-token-prediction layer: client/mtp_draft.py), or a Drafter."""
    if choice is None or choice is False or choice in ("off", "none", ""):
        return None
    if choice is True:
        choice = "prompt-lookup"
    if hasattr(choice, "start"):
        return choice
    if choice == "draft-model":
        if draft_model is None:
            raise SpeculationError("speculative='draft-model' needs draft_model=, a local model of the same vocabulary")
        return model_draft(model, draft_model)
    factory = _FACTORIES.get(choice) if isinstance(choice, str) else None
    if factory is None:
        raise SpeculationError(
            f"speculative={choice!r}: use one of {', '.join(draft_kinds())}, a Drafter, or None for plain decoding"
        )
    return factory(model)


def model_draft(model: Any, draft: Any) -> ModelDraft:
    if int(draft.config.vocab_size) != int(model.config.vocab_size):
        raise SpeculationError(
            f"the draft model's vocabulary ({draft.config.vocab_size} tokens) differs from the model's "
            f"({model.config.vocab_size}): a draft must share the tokenizer"
        )
    return ModelDraft(draft)
