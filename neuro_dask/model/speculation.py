"""Speculative decoding's rules: many tokens per pass over the layers, exactly. Pure: torch only.

Over a network every MoE layer of every pass waits one round trip, whatever the pass carries;
one pass can check K drafted tokens for about the price of one (docs/performance.md). A draft
proposes K tokens per row; one verification pass over [last token, d1..dK] gives the model's
distribution p_i after each prefix; `verify` keeps the longest prefix the model agrees with and
adds one token of the model's own, so a pass yields 1 to K+1 tokens:

- greedy: d_i is kept while it is the argmax of p_i; the first disagreement is replaced by the
  argmax. Output is token for token that of plain greedy decoding.
- sampling: drafts here are point masses (a lookup, or a draft model's greedy choice), so the
  standard rule (Leviathan et al. 2023, Chen et al. 2023) with q = 1 at d_i reads: keep d_i with
  probability p_i(d_i); on rejection draw from p_i with d_i removed and renormalised. Each kept
  or drawn token is then distributed exactly as p_i given its prefix, which is plain sampling's
  distribution (tests/unit/test_speculation.py checks it statistically).

Rows of a batch share the cache's slot index (left padding), so a pass commits the same number
of tokens m + 1 for every row: m is the fewest drafts any unfinished row kept, and each row's
(m+1)-th token is its own: its kept draft d_{m+1}, or its correction. Exact either way, since
each of those is a valid draw of that position.

Shape legend: B batch, K drafts per row, V vocabulary.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from neuro_dask.model.generation import SamplingOptions, next_token_probs


@dataclass(frozen=True)
class Verdict:
    """One verification pass, judged: per row, how many drafts the model kept, and the tokens
    it yields (`tokens[r, :accepted[r]]` are the kept drafts, `tokens[r, accepted[r]]` the
    model's own next token; later entries are meaningless)."""

    accepted: torch.Tensor  # [B] long
    tokens: torch.Tensor  # [B, K+1] long


def verify(
    logits: torch.Tensor, drafts: torch.Tensor, opts: SamplingOptions, generator: torch.Generator | None
) -> Verdict:
    """logits [B, K+1, V] (position i: the model after the last token and d1..di); drafts [B, K]."""
    b, k1, _ = logits.shape
    k = k1 - 1
    if drafts.shape != (b, k):
        raise ValueError(f"drafts {tuple(drafts.shape)} for logits {tuple(logits.shape)}: want [{b}, {k}]")
    if not opts.do_sample:
        best = logits.argmax(dim=-1)  # [B, K+1]
        agree = best[:, :k] == drafts
        accepted = _leading_true(agree)
        return Verdict(accepted, _tokens_with_correction(drafts, best, accepted))
    probs = next_token_probs(logits.reshape(b * k1, -1), opts).reshape(b, k1, -1)
    tokens = torch.zeros(b, k1, dtype=torch.long)
    accepted = torch.zeros(b, dtype=torch.long)
    for r in range(b):  # rows are independent; the generator is drawn in row order
        n = 0
        while n < k:
            d = int(drafts[r, n])
            u = float(torch.rand((), generator=generator))
            if u < float(probs[r, n, d]):
                tokens[r, n] = d
                n += 1
                continue
            residual = probs[r, n].clone()
            residual[d] = 0.0
            tokens[r, n] = _draw(residual, generator)
            break
        else:
            tokens[r, k] = _draw(probs[r, k], generator)  # every draft kept: the bonus token
        accepted[r] = n
    return Verdict(accepted, tokens)


def _leading_true(agree: torch.Tensor) -> torch.Tensor:
    """[B, K] bool -> [B]: how many leading entries of each row are True."""
    if agree.shape[1] == 0:
        return torch.zeros(agree.shape[0], dtype=torch.long)
    return agree.long().cumprod(dim=1).sum(dim=1)


def _tokens_with_correction(drafts: torch.Tensor, best: torch.Tensor, accepted: torch.Tensor) -> torch.Tensor:
    tokens = torch.cat([drafts, drafts.new_zeros(drafts.shape[0], 1)], dim=1)
    rows = torch.arange(drafts.shape[0])
    tokens[rows, accepted] = best[rows, accepted]
    return tokens


def _draw(probs: torch.Tensor, generator: torch.Generator | None) -> int:
    total = float(probs.sum())
    if not total > 0:  # p put all its mass on the rejected draft: cannot happen, as u < 1 keeps it
        raise ArithmeticError("speculative sampling: an empty residual distribution")
    return int(torch.multinomial(probs / total, 1, generator=generator))


def committed(verdict: Verdict, unfinished: torch.Tensor) -> int:
    """m: the drafts every unfinished row kept (the pass commits m + 1 tokens per row)."""
    live = verdict.accepted[unfinished]
    return int(live.min()) if live.numel() else 0


def pad_drafts(proposals: Sequence[Sequence[int]], k: int, filler: int = 0) -> torch.Tensor:
    """Rows' proposals (each up to k tokens) as [B, K] with K the longest, shorter rows filled.
    A filler is a draft like any other (most likely rejected): exactness never depends on drafts."""
    width = min(k, max((len(p) for p in proposals), default=0))
    out = torch.full((len(proposals), width), filler, dtype=torch.long)
    for r, p in enumerate(proposals):
        p = list(p)[:width]
        if p:
            out[r, : len(p)] = torch.tensor(p, dtype=torch.long)
    return out


# ---- trees: several candidate continuations in one pass -----------------------------------------------


@dataclass(frozen=True)
class DraftTree:
    """Candidate continuations of one sequence as a tree (SpecInfer, SpecExec): node i (1..N) is
    `tokens[i-1]`, a child of node `parents[i-1]` (0: the last committed token, the root).
    Siblings hold distinct tokens; parents come before their children."""

    tokens: tuple[int, ...]
    parents: tuple[int, ...]

    def __post_init__(self) -> None:
        if len(self.tokens) != len(self.parents):
            raise ValueError("a draft tree needs one parent per token")
        seen: set[tuple[int, int]] = set()
        for i, (t, p) in enumerate(zip(self.tokens, self.parents), start=1):
            if not 0 <= p < i:
                raise ValueError(f"node {i}'s parent {p} must come before it")
            if (p, t) in seen:
                raise ValueError(f"node {i} repeats token {t} among its siblings")
            seen.add((p, t))

    @property
    def size(self) -> int:
        return len(self.tokens)

    def depths(self) -> list[int]:
        """Depth of the root (0) and of every node: a node's position is the root's plus its depth."""
        depth = [0]
        for p in self.parents:
            depth.append(depth[p] + 1)
        return depth

    def visible(self) -> torch.Tensor:
        """[N+1, N+1] bool: row i may attend to column j iff j is i or one of its ancestors."""
        n = self.size + 1
        out = torch.zeros(n, n, dtype=torch.bool)
        out[0, 0] = True
        for i, p in enumerate(self.parents, start=1):
            out[i] = out[p]
            out[i, i] = True
        return out

    def children(self, node: int) -> list[int]:
        return [i for i, p in enumerate(self.parents, start=1) if p == node]

    @classmethod
    def chain(cls, tokens: Sequence[int]) -> DraftTree:
        return cls(tuple(tokens), tuple(range(len(tokens))))

    @classmethod
    def from_paths(cls, paths: Sequence[Sequence[int]]) -> DraftTree:
        """The trie of several continuations (shared prefixes merged), in the order given."""
        tokens: list[int] = []
        parents: list[int] = []
        index: dict[tuple[int, int], int] = {}
        for path in paths:
            node = 0
            for t in path:
                key = (node, int(t))
                if key not in index:
                    tokens.append(int(t))
                    parents.append(node)
                    index[key] = len(tokens)
                node = index[key]
        return cls(tuple(tokens), tuple(parents))


def verify_tree(
    logits: torch.Tensor, tree: DraftTree, opts: SamplingOptions, generator: torch.Generator | None
) -> tuple[list[int], list[int]]:
    """logits [N+1, V] (row i: the model after the root's path to node i) -> (the nodes kept,
    root to leaf, and the tokens the pass yields: theirs, then one of the model's own).

    Greedy: follow the child that is the argmax, then add the argmax. Sampling: at each node the
    children are tried in order, each kept with its probability under what is left of p (a
    rejected child's mass removed, the rest renormalised); if none is kept, the token is drawn
    from what is left. That is the chain rule applied child by child, so each yielded token is
    distributed exactly as p after its prefix."""
    node, path = 0, []
    while True:
        kids = tree.children(node)
        if not opts.do_sample:
            want = int(logits[node].argmax())
            nxt = next((c for c in kids if tree.tokens[c - 1] == want), None)
            if nxt is None:
                return path, [tree.tokens[c - 1] for c in path] + [want]
        else:
            residual = next_token_probs(logits[node][None], opts)[0].clone()
            nxt = None
            for c in kids:
                d = tree.tokens[c - 1]
                total = float(residual.sum())
                if total > 0 and float(torch.rand((), generator=generator)) < float(residual[d]) / total:
                    nxt = c
                    break
                residual[d] = 0.0
            if nxt is None:
                return path, [tree.tokens[c - 1] for c in path] + [_draw(residual, generator)]
        path.append(nxt)
        node = nxt


# ---- drafts that need nothing extra ------------------------------------------------------------------


@dataclass(frozen=True)
class PromptLookup:
    """Prompt lookup decoding (Saxena 2023; transformers' `prompt_lookup_num_tokens`): the last
    n tokens of the context (n from max_ngram down to min_ngram) are looked up earlier in the
    same context, and what followed the latest earlier occurrence is the draft. Free: no model,
    no memory; strong wherever the answer repeats its context (summaries, edits, code, retrieval)."""

    max_ngram: int = 3
    min_ngram: int = 1
    name: str = "prompt-lookup"

    def propose_many(self, context: Sequence[int], k: int, width: int) -> list[list[int]]:
        """Up to `width` distinct continuations, from the latest earlier occurrences of the longest
        n-gram that has any: the tree of a lookup that is unsure which occurrence is being copied."""
        tokens = list(context)
        for n in range(min(self.max_ngram, len(tokens) - 1), self.min_ngram - 1, -1):
            tail, found = tokens[-n:], []
            for start in range(len(tokens) - n - 1, -1, -1):
                if tokens[start : start + n] == tail:
                    follow = tokens[start + n : start + n + k]
                    if follow and follow not in found:
                        found.append(follow)
                        if len(found) == width:
                            break
            if found:
                return found
        return []

    def propose(self, context: Sequence[int], k: int) -> list[int]:
        tokens = list(context)
        for n in range(min(self.max_ngram, len(tokens) - 1), self.min_ngram - 1, -1):
            tail = tokens[-n:]
            for start in range(len(tokens) - n - 1, -1, -1):  # the latest earlier occurrence first
                if tokens[start : start + n] == tail:
                    follow = tokens[start + n : start + n + k]
                    if follow:
                        return follow
        return []


# ---- how many to draft ---------------------------------------------------------------------------------


@dataclass
class DraftLength:
    """How many tokens to draft per pass: the K that maximises expected tokens per second.

    A pass drafting K tokens yields E(K) = (1 - a^(K+1)) / (1 - a) tokens when each draft is kept
    with probability a (measured: kept / offered, smoothed), and costs c(K) = fixed + K x extra
    seconds: the fixed part is what every pass pays (over a network, mostly round trips), the
    extra one what each more token costs (expert rows, attention, drafting). Both are measured
    from the passes themselves (least squares over recent passes), so a longer round trip buys
    longer drafts, and when no K > 0 beats a plain step (E(0)/c(0)) the answer is 0: speculation
    turns itself off rather than make decoding slower. A draft length of 0 is retried now and
    then with K = 1 so that a draft that got better is noticed.
    """

    max_k: int = 8
    prior_acceptance: float = 0.6  # until passes are measured
    prior_sibling: float = 0.3
    decay: float = 0.9  # weight of the past in the kept / offered counts
    extra_fraction: float = 0.05  # prior: one more token costs 5% of a pass (network-bound)
    explore_every: int = 16
    window: int = 64
    passes: list[tuple[int, float]] = field(default_factory=list)  # (k, seconds) of recent passes
    _plain_streak: int = 0
    _kept: float = -1.0
    _tried: float = -1.0
    _sib_kept: float = -1.0
    _sib_tried: float = -1.0

    def __post_init__(self) -> None:
        self._kept, self._tried = 2 * self.prior_acceptance, 2.0  # the prior weighs as two drafts
        self._sib_kept, self._sib_tried = 2 * self.prior_sibling, 2.0

    @property
    def acceptance(self) -> float:
        """How often a draft is kept: kept / (kept + rejected), recent passes weighing most."""
        return self._kept / self._tried if self._tried > 0 else self.prior_acceptance

    def choose(self, limit: int | None = None) -> int:
        return self.choose_shape(limit, trees=False)[0]

    def choose_shape(self, limit: int | None = None, trees: bool = True) -> tuple[int, int]:
        """(depth, width): width 2 adds the draft's second choice beside each token of the chain
        (a tree of 2 x depth nodes), when the pass's fixed cost makes the extra nodes pay."""
        cap = self.max_k if limit is None else max(0, min(self.max_k, limit))
        if cap == 0:
            return 0, 1
        fixed, extra = self.costs()
        best, best_rate = (0, 1), 1.0 / fixed
        for k in range(1, cap + 1):
            shapes = [(k, 1, self.expected_tokens(k), k)]
            if trees:
                shapes.append((k, 2, self.expected_tree_tokens(k), 2 * k))
            for depth, width, tokens, nodes in shapes:
                rate = tokens / (fixed + nodes * extra)
                if rate > best_rate * 1.0001:
                    best, best_rate = (depth, width), rate
        best_k = best[0]
        if best_k == 0:
            self._plain_streak += 1
            if self._plain_streak >= self.explore_every:
                self._plain_streak = 0
                return 1, 1
        else:
            self._plain_streak = 0
        return best if best_k else (0, 1)

    def expected_tokens(self, k: int) -> float:
        a = min(max(self.acceptance, 0.0), 0.999)
        return (1 - a ** (k + 1)) / (1 - a)

    def expected_tree_tokens(self, k: int) -> float:
        """A chain of k with the second choice beside each: where the chain's token is rejected
        (after i kept, probability a^i (1 - a)), the sibling is kept with probability s."""
        a = min(max(self.acceptance, 0.0), 0.999)
        return self.expected_tokens(k) + self.sibling * (1 - a) * self.expected_tokens(k - 1)

    @property
    def sibling(self) -> float:
        """How often a second choice is kept where the first was rejected."""
        return self._sib_kept / self._sib_tried if self._sib_tried > 0 else self.prior_sibling

    def costs(self) -> tuple[float, float]:
        """(fixed, extra) seconds: least squares over recent passes, else the priors."""
        ks = [k for k, _ in self.passes]
        if len(set(ks)) >= 2:
            n = len(self.passes)
            mk, ms = sum(ks) / n, sum(s for _, s in self.passes) / n
            var = sum((k - mk) ** 2 for k in ks)
            slope = sum((k - mk) * (s - ms) for k, s in self.passes) / var
            fixed = ms - slope * mk
            if fixed > 0:
                return fixed, max(slope, 1e-6 * fixed)
        seconds = [s for _, s in self.passes] or [1.0]
        fixed = sorted(seconds)[len(seconds) // 2]
        return fixed, self.extra_fraction * fixed

    def observe(self, k: int, kept: int, seconds: float, nodes: int | None = None, sibling: bool | None = None) -> None:
        """One pass: drafted a chain of k (a tree of `nodes`), kept `kept` (of the rows' fewest),
        in `seconds` (drafting included); `sibling`: whether a second choice was kept where the
        chain's token was rejected (None: the pass offered none there)."""
        if math.isfinite(seconds) and seconds >= 0:
            self.passes.append((k if nodes is None else nodes, seconds))
            del self.passes[: -self.window]
        if sibling is not None:
            self._sib_kept = self.decay * self._sib_kept + (1 if sibling else 0)
            self._sib_tried = self.decay * self._sib_tried + 1
        if k > 0:  # kept drafts, then one rejection unless every draft was kept
            self._kept = self.decay * self._kept + kept
            self._tried = self.decay * self._tried + kept + (1 if kept < k else 0)
