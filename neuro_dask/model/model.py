"""MoEModel: the public object. Trunk and router here; experts behind an ExpertExecutor; requests
(billing, versions) through a RequestScope (model/moe.py's protocols).

Shape legend: B batch, T tokens this step, S cache slots, D hidden, V vocabulary.
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch

from neuro_dask.errors import GenerationOptionError, TokenizerMissingError
from neuro_dask.model.batching import GenerationBatcher, StepCoalescer
from neuro_dask.model.cache import KVCache
from neuro_dask.model.config import MoEConfig
from neuro_dask.model.gc_pause import collect_young, full_collections_deferred
from neuro_dask.model.generation import (
    Batch,
    SamplingOptions,
    check_length,
    make_generator,
    positions_from_mask,
    prepare_batch,
    select_next,
)
from neuro_dask.model.layers import RotaryEmbedding, attention_mask
from neuro_dask.model.moe import ExpertExecutor, NoRequests, RequestScope, combine, group_by_expert, route_tokens
from neuro_dask.model.speculation import DraftLength
from neuro_dask.model.speculative import SpeculationStats, resolve_drafter, speculative_steps
from neuro_dask.model.tokenizer import Tokenizer
from neuro_dask.model.trunk import Trunk, TrunkLayer
from neuro_dask.security.limits import RequestLimits, check_request_limits
from neuro_dask.settings import ClientSettings, SecuritySettings

log = logging.getLogger(__name__)
_LANES_LOCK = threading.Lock()
_TOLD: set[str] = set()  # reasons already logged once


def plain_decoding_because(reason: str) -> None:
    """Say once per process why a model decodes plainly although speculation was asked for."""
    if reason not in _TOLD:
        _TOLD.add(reason)
        log.warning("speculative decoding is off for this model (plain decoding instead): %s", reason)


# A speculative generation may carry this many positions through its passes per token it asks
# for (drafts the model rejects included): what its request holds for, and where drafting stops.
SPECULATIVE_FEED = 3

PromptIds = torch.Tensor | Sequence[Sequence[int]]


@dataclass(frozen=True)
class GenerationDefaults:
    """From generation_config.json (falling back to config.json): what ends and pads a sequence."""

    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None
    bos_token_id: int | None = None

    @property
    def pad_or_eos(self) -> int:
        if self.pad_token_id is not None:
            return self.pad_token_id
        return self.eos_token_ids[0] if self.eos_token_ids else 0


class TextStep(NamedTuple):
    token: int
    text: str


@dataclass(frozen=True)
class ScoreResult:
    tokens: list[int]
    logprobs: list[float]  # one per token after the first

    @property
    def total(self) -> float:
        """The log-likelihood of the text (after its first token)."""
        return float(sum(self.logprobs))

    @property
    def perplexity(self) -> float:
        return float(math.exp(-self.total / len(self.logprobs))) if self.logprobs else float("nan")


@dataclass
class MoEModel:
    config: MoEConfig
    trunk: Trunk
    executor: ExpertExecutor
    tokenizer: Tokenizer | None = None
    generation: GenerationDefaults = field(default_factory=GenerationDefaults)
    source: str = "<memory>"
    # The ShardStore this model was assembled from (None: built in memory); drafts read more of it.
    store: Any = field(default=None, repr=False, compare=False)
    # Where requests begin and end (a scheduler with a ledger bills them); a local model's are free.
    requests: RequestScope = field(default_factory=NoRequests)

    def __post_init__(self) -> None:
        self.rotary = self._rotary()
        # Concurrent generations (threads) share each expert call: see model/batching.py.
        self.batching = StepCoalescer(self._run_experts)
        self.batcher = GenerationBatcher(self._generate_rows)
        # Pipelining: a generation's rows split into `micro_batches` lanes that run in their own
        # threads, each lane with its own coalescer, so that while one lane waits for its experts
        # over the network another computes attention (docs/performance.md).
        self.micro_batches = self.requests.micro_batches
        self._lanes: list[StepCoalescer] = []
        self._lane = threading.local()
        # Speculative decoding (model/speculative.py): drafts built once per kind, the draft
        # length each kind's passes have earned, and the counters.
        self.speculation = SpeculationStats()
        self._drafters: dict[tuple, Any] = {}
        self._draft_lengths: dict[str, DraftLength] = {}
        self._speculate: tuple[Any, Any] | None = None  # this model's default (speculate())
        # Rows routed to each (layer, expert) so far: which experts a self-draft copies first.
        self.expert_load: Counter[tuple[int, int]] = Counter()

    def use_requests(self, requests: RequestScope) -> None:
        """Begin and end this model's requests through `requests` (a distributed model's, once its
        executor exists), with its lanes per generation (neuro.client.micro-batches)."""
        self.requests = requests
        self.micro_batches = requests.micro_batches

    def _rotary(self) -> RotaryEmbedding | None:
        return RotaryEmbedding(self.config.head_dim, self.config.rope_theta)

    def _run_experts(self, layer: int, groups):
        return self.executor.run_layer(layer, groups)

    def _coalescer(self) -> StepCoalescer:
        """The coalescer of this thread's lane (the first lane's outside any pipelined generation)."""
        return getattr(self._lane, "coalescer", None) or self.batching

    def _lane_coalescer(self, index: int) -> StepCoalescer:
        if index == 0:
            return self.batching
        with _LANES_LOCK:
            while len(self._lanes) < index:
                self._lanes.append(StepCoalescer(self._run_experts))
            return self._lanes[index - 1]

    @property
    def dtype(self) -> torch.dtype:
        return self.trunk.embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.trunk.embed_tokens.weight.device

    # ---- one pass over the layers -------------------------------------------------------------

    def _hidden(
        self,
        ids: torch.Tensor,
        positions: torch.Tensor,
        key_valid: torch.Tensor,
        cache: KVCache | None,
        routed: torch.Tensor,
        tree: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """ids, positions, routed [B, T]; key_valid [B, S] -> final-normed hidden [B, T, D].
        `tree` [T, T] bool: which of the new tokens each may see (a draft tree), instead of causal.

        `routed` marks the tokens whose expert outputs matter; pads and finished rows are
        never sent to an expert, which matters once an expert call crosses the network.
        """
        h = self.trunk.embed_tokens(ids)
        rope = self.rotary(positions, h.dtype)
        start = cache.length if cache is not None else 0
        mask = attention_mask(key_valid, start, ids.shape[1], self.config.sliding_window)
        if tree is not None:
            new = slice(start, start + ids.shape[1])
            mask[:, :, :, new] = tree[None, None] & key_valid[:, None, None, new]
        for layer in self.trunk.layers:
            h = h + layer.self_attn(layer.input_layernorm(h), rope, mask, cache, layer.index)
            x = layer.post_attention_layernorm(h)
            h = h + (self._moe(layer, x, routed) if layer.is_moe else layer.mlp(x))
        if cache is not None:
            cache.advance()
        return self.trunk.norm(h)

    def _moe(self, layer: TrunkLayer, x: torch.Tensor, routed: torch.Tensor) -> torch.Tensor:
        """x [B, T, D] -> routed experts' weighted sum (+ shared expert) [B, T, D]."""
        rows = x[routed]  # [N, D], N routed tokens
        out = torch.zeros_like(x)
        if rows.shape[0]:
            weights, experts = route_tokens(
                layer.router(rows), self.config.num_experts_per_tok, self.config.norm_topk_prob
            )
            groups = group_by_expert(rows, experts)
            self._count_load(layer.index, groups.inputs)
            outputs = self._coalescer().run_layer(layer.index, groups.inputs)
            moe = combine(groups, outputs, weights, rows)
            shared = layer.shared_output(rows)
            out[routed] = moe if shared is None else moe + shared
        return out

    def _count_load(self, layer: int, inputs: Mapping[int, torch.Tensor]) -> None:
        load = self.expert_load
        for e, rows in inputs.items():
            load[(layer, e)] += rows.shape[0]

    # ---- public API ---------------------------------------------------------------------------

    def _batch(self, input_ids: PromptIds, attention_mask: torch.Tensor | None) -> Batch:
        return prepare_batch(input_ids, attention_mask, self.generation.pad_or_eos, self.config.vocab_size)

    @staticmethod
    def request_limits() -> RequestLimits:
        """What one call may ask (neuro.security.max-prompt-tokens, max-new-tokens, max-batch), read
        from Dask's config at each call (a few microseconds), so `dask.config.set` applies at once."""
        return RequestLimits.from_settings(SecuritySettings.load())

    def _check_limits(self, batch: Batch, max_new_tokens: int | None) -> None:
        """Refuse (LimitExceededError) a call above neuro.security's limits, before any work."""
        check_request_limits(
            self.request_limits(), batch.mask.sum(-1).tolist(), max_new_tokens, batch=batch.ids.shape[0]
        )

    def forward(self, input_ids: PromptIds, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [B, T, V] (float32 when the trunk is float32); rows left-padded as given."""
        batch = self._batch(input_ids, attention_mask)
        self._check_limits(batch, None)
        check_length(batch.mask, 0, self.config.max_position_embeddings)
        with torch.inference_mode():
            return self._forward_logits(batch)

    def _forward_logits(self, batch: Batch) -> torch.Tensor:
        hidden = self._hidden(batch.ids, positions_from_mask(batch.mask), batch.mask, None, batch.mask)
        return self.trunk.lm_head(hidden)

    __call__ = forward

    def stream(
        self,
        input_ids: PromptIds | str,
        attention_mask: torch.Tensor | None = None,
        max_new_tokens: int = 32,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        stop_token_ids: Sequence[int] = (),
        speculative: Any = "config",
        draft_model: Any = None,
    ) -> Iterator[torch.Tensor] | Iterator[TextStep]:
        """Ids in: yield the next token of every row [B] per step; finished rows get the pad id.
        A prompt string in: yield a `TextStep(token, text)` per new token, `text` being what it
        adds to the answer (print it with end="" as it comes).

        Ends when every row has produced an EOS or stop token, or after max_new_tokens.
        A call above neuro.security's limits (prompt length, max_new_tokens, prompts) raises
        LimitExceededError before any work.

        `speculative` (default: neuro.client.speculative): None for plain decoding;
        "prompt-lookup", "self", "mtp" (a checkpoint's multi-token-prediction layer) or
        "draft-model" (with `draft_model=`, a local model of the same vocabulary) to draft tokens
        and verify several per pass over the layers, with the same output as plain decoding
        (greedy: token for token; sampling: the same distribution).
        """
        opts = SamplingOptions(do_sample, temperature, top_k, top_p)
        drafter = self._drafter(speculative, draft_model)
        if max_new_tokens < 0:
            raise GenerationOptionError("max_new_tokens", max_new_tokens, "must be >= 0")
        if isinstance(input_ids, str):
            ids = self.require_tokenizer().encode(input_ids)
            steps = self.stream(
                [ids], None, max_new_tokens, do_sample, temperature, top_k, top_p, seed, stop_token_ids, drafter
            )
            return self._text_steps(steps, set(self.generation.eos_token_ids) | set(stop_token_ids))
        batch = self._batch(input_ids, attention_mask)
        self._check_limits(batch, max_new_tokens)
        check_length(batch.mask, max_new_tokens, self.config.max_position_embeddings)
        return self._stream(batch, max_new_tokens, opts, make_generator(seed), stop_token_ids, drafter=drafter)

    def _text_steps(self, steps: Iterator[torch.Tensor], stops: set[int]) -> Iterator[TextStep]:
        """Decode as tokens come: each step's text is what the answer so far adds to the last."""
        tok, new, said = self.require_tokenizer(), [], ""
        for step in steps:
            token = int(step[0])
            if token in stops:
                return
            new.append(token)
            text = tok.decode(new)
            yield TextStep(token, text[len(said) :] if text.startswith(said) else text)
            said = text

    def _stream(
        self,
        batch: Batch,
        max_new_tokens: int,
        opts: SamplingOptions,
        generator: torch.Generator | None,
        stop_token_ids: Sequence[int],
        charge: bool = True,
        drafter: Any = None,
    ) -> Iterator[torch.Tensor]:
        """`charge`: hold and settle this generation as a request (False: a lane of one that is).
        `drafter`: speculative decoding with these drafts (None: plain, one token per pass)."""
        if max_new_tokens == 0:
            return
        b, t = batch.ids.shape
        stops = torch.tensor(sorted(set(self.generation.eos_token_ids) | set(stop_token_ids)), dtype=torch.long)
        pad = self.generation.pad_or_eos
        key_valid = torch.zeros(b, t + max_new_tokens, dtype=torch.bool)
        key_valid[:, :t] = batch.mask
        positions = positions_from_mask(batch.mask)
        unfinished = torch.ones(b, dtype=torch.bool)
        coalescer = self._coalescer()
        fed = max_new_tokens * (SPECULATIVE_FEED if drafter is not None else 1)  # positions passes may carry
        request = self._request(b * (t + fed)) if charge else contextlib.nullcontext()
        with torch.inference_mode(), full_collections_deferred(), request, coalescer.participant():
            if drafter is not None:
                session = drafter.start([batch.ids[r][batch.mask[r]].tolist() for r in range(b)], max_new_tokens)
                yield from speculative_steps(
                    self,
                    batch,
                    max_new_tokens,
                    opts,
                    generator,
                    stops,
                    session,
                    self._draft_length(drafter.name),
                    self._note_pass,
                    coalescer,
                    fed,
                    trees=self.supports_trees(),
                )
                return
            logits, cache = self._prefill(batch.ids, positions, key_valid[:, :t], batch.mask, t + max_new_tokens)
            next_pos = positions[:, -1:] + 1
            for step in range(max_new_tokens):
                collect_young()
                token = select_next(logits, opts, generator)
                token = torch.where(unfinished, token, torch.full_like(token, pad))
                with coalescer.idle():  # the reader holds the token: the others go on without us
                    yield token
                unfinished &= ~torch.isin(token, stops)
                if step == max_new_tokens - 1 or not bool(unfinished.any()):
                    return
                key_valid[:, t + step] = True
                logits = self._decode(
                    token[:, None], next_pos, key_valid[:, : t + step + 1], cache, unfinished[:, None]
                )
                next_pos = next_pos + 1

    # ---- the trunk's three entry points (a transformers trunk overrides them: model/hf_model.py) ---

    def _prefill(
        self, ids: torch.Tensor, positions: torch.Tensor, key_valid: torch.Tensor, routed: torch.Tensor, capacity: int
    ) -> tuple[torch.Tensor, KVCache]:
        """The prompt through the model: last position's logits [B, V] (float32) and the cache."""
        cfg = self.config
        cache = KVCache(
            cfg.num_hidden_layers,
            ids.shape[0],
            cfg.num_key_value_heads,
            cfg.head_dim,
            capacity,
            self.dtype,
            self.device,
        )
        hidden = self._hidden(ids, positions, key_valid, cache, routed)
        return self.trunk.lm_head(hidden[:, -1]).float(), cache

    def _decode(
        self, ids: torch.Tensor, positions: torch.Tensor, key_valid: torch.Tensor, cache: KVCache, routed: torch.Tensor
    ) -> torch.Tensor:
        """One new token per row [B, 1] -> the next logits [B, V] (float32)."""
        hidden = self._hidden(ids, positions, key_valid, cache, routed)
        return self.trunk.lm_head(hidden[:, -1]).float()

    def _verify(
        self, ids: torch.Tensor, positions: torch.Tensor, key_valid: torch.Tensor, cache: KVCache, routed: torch.Tensor
    ) -> torch.Tensor:
        """Several new tokens per row [B, T] -> the logits after each [B, T, V] (float32), cached."""
        hidden = self._hidden(ids, positions, key_valid, cache, routed)
        return self.trunk.lm_head(hidden).float()

    def _rollback(self, cache: KVCache, length: int) -> None:
        """Keep the cache's first `length` slots (the tokens a verification pass kept)."""
        cache.truncate(length)

    def _can_roll_back(self, cache: KVCache) -> bool:
        return True  # KVCache.truncate and keep

    def supports_trees(self) -> bool:
        """Whether a pass may verify a tree of drafts (a mask over them, and a cache whose slots
        can be moved): the hand-written trunk, without a sliding window."""
        return self.config.sliding_window is None

    def _verify_tree(self, ids, positions, key_valid, cache: KVCache, routed, tree: torch.Tensor) -> torch.Tensor:
        """The root and a draft tree's nodes [1, N+1] -> the logits after each [1, N+1, V]."""
        hidden = self._hidden(ids, positions, key_valid, cache, routed, tree)
        return self.trunk.lm_head(hidden).float()

    def _keep(self, cache: KVCache, start: int, slots: list[int]) -> None:
        cache.keep(start, slots)

    # ---- speculative decoding -----------------------------------------------------------------

    def speculate(self, speculative: Any = "prompt-lookup", draft_model: Any = None) -> None:
        """Make speculative decoding this model's default (for generate, stream, map and a gateway
        serving it): a kind ("prompt-lookup", "self", "mtp", "draft-model" with `draft_model=`), a
        Drafter, or None to decode plainly whatever neuro.client.speculative says. The drafts are
        built now, so a wrong choice fails here rather than at the first request; calling it
        again rebuilds them (a self-draft then copies the experts hottest by now)."""
        with _LANES_LOCK:
            self._drafters.pop((speculative, id(draft_model)), None)
        self._drafter(speculative, draft_model)
        self._speculate = (speculative, draft_model)

    def _drafter(self, speculative: Any, draft_model: Any = None) -> Any:
        """The drafts `speculative=` asks for, built once per kind (a self-draft loads a copy)."""
        if isinstance(speculative, str) and speculative == "config":
            if self._speculate is not None:
                speculative, draft_model = self._speculate
            else:
                speculative = ClientSettings.load().speculative
        if speculative is None and draft_model is not None:
            speculative = "draft-model"
        if speculative is None or speculative is False or speculative == "off":
            return None
        reason = self.speculation_unsupported()
        if reason:
            plain_decoding_because(reason)
            return None
        if hasattr(speculative, "start"):
            return speculative
        key = (speculative, id(draft_model))
        with _LANES_LOCK:
            drafter = self._drafters.get(key)
        if drafter is None:
            drafter = resolve_drafter(speculative, self, draft_model)
            with _LANES_LOCK:
                drafter = self._drafters.setdefault(key, drafter)
        return drafter

    def _note_pass(self, drafted: int, kept: int) -> None:
        self.speculation.record(drafted, kept)
        self.requests.note_pass(drafted, kept)  # the dashboard's tokens-per-pass figure

    def speculation_unsupported(self) -> str:
        """Why this model cannot roll its cache back past rejected drafts ("" when it can)."""
        return ""

    def _draft_length(self, name: str) -> DraftLength:
        with _LANES_LOCK:
            lengths = self._draft_lengths.get(name)
            if lengths is None:
                # Before any pass is measured: over a network a drafted token costs little beside a
                # pass's round trips; in process it costs about as much as a pass, so a local
                # model starts plain and drafts only once its passes show that it pays.
                prior = 1.0 if self.tier == "local" else 0.05
                lengths = DraftLength(max_k=ClientSettings.load().draft_max, extra_fraction=prior)
                self._draft_lengths[name] = lengths
            return lengths

    @contextlib.contextmanager
    def _request(self, tokens: int) -> Iterator[None]:
        """One request from start to end: a scope that charges for work (a scheduler with a ledger)
        holds the fee for at most `tokens` x layers x top-k x 2 (one check per call) expert-tokens
        before any work and settles by the validated work after; NoRequests does nothing."""
        self.requests.begin(tokens * self.config.num_hidden_layers * self.config.num_experts_per_tok * 2)
        try:
            yield
        finally:
            self.requests.end()

    def generate(
        self,
        input_ids: PromptIds,
        attention_mask: torch.Tensor | None = None,
        max_new_tokens: int = 32,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        stop_token_ids: Sequence[int] = (),
        speculative: Any = "config",
        draft_model: Any = None,
    ) -> torch.Tensor:
        """LongTensor [B, T + new], prompt included (left-padded), as transformers returns it.
        `speculative`, `draft_model`: as for `stream` (the same output, fewer passes).

        Calls from several threads with the same decoding options (and no seed) are batched
        together (model/batching.py): each caller gets exactly its own rows back. A call above
        neuro.security's limits raises LimitExceededError before it is queued (the limits are
        per call: a batch formed of several calls may hold more prompts than max-batch)."""
        batch = self._batch(input_ids, attention_mask)
        prompt = torch.where(batch.mask, batch.ids, torch.full_like(batch.ids, self.generation.pad_or_eos))
        SamplingOptions(do_sample, temperature, top_k, top_p)  # refuse bad options before queueing
        drafter = self._drafter(speculative, draft_model)
        if max_new_tokens < 0:
            raise GenerationOptionError("max_new_tokens", max_new_tokens, "must be >= 0")
        self._check_limits(batch, max_new_tokens)
        if max_new_tokens == 0:
            return prompt
        # Before queueing: one caller's too-long row must not fail the others batched with it.
        check_length(batch.mask, max_new_tokens, self.config.max_position_embeddings)
        rows = [batch.ids[r][batch.mask[r]].tolist() for r in range(batch.ids.shape[0])]
        if do_sample and seed is not None:  # a seeded sample must not depend on who else is asking
            new = self._generate_rows(
                (do_sample, temperature, top_k, top_p, seed, tuple(stop_token_ids), drafter), rows, max_new_tokens
            )
        else:
            # One batch is one paid request: only calls paid by the same account share it.
            key = (do_sample, temperature, top_k, top_p, None, tuple(stop_token_ids), drafter, self._payer())
            new = self.batcher.generate(key, rows, max_new_tokens)
        steps = self._steps_taken(new, stop_token_ids, max_new_tokens)
        if steps == 0:
            return prompt
        return torch.cat([prompt, torch.stack([t[:steps] for t in new])], dim=1)

    def _generate_rows(self, key: tuple, rows: list[list[int]], max_new_tokens: int) -> list[torch.Tensor]:
        """Each row's new tokens (pad once it stopped), max_new_tokens long."""
        lanes = min(self.micro_batches, len(rows))
        if lanes <= 1:
            return self._lane_rows(key, rows, max_new_tokens)
        size = -(-len(rows) // lanes)
        chunks = [rows[i : i + size] for i in range(0, len(rows), size)]
        tokens = sum(len(r) + max_new_tokens for r in rows)
        with self._request(tokens):  # one request for the whole generation, held by this thread
            stamp = self.requests.stamp()
            with ThreadPoolExecutor(len(chunks), thread_name_prefix="neuro-lane") as pool:
                parts = [
                    pool.submit(self._run_lane, i, key, chunk, max_new_tokens, stamp) for i, chunk in enumerate(chunks)
                ]
                return [row for part in parts for row in part.result()]

    def _run_lane(
        self, index: int, key: tuple, rows: list[list[int]], max_new_tokens: int, stamp: dict
    ) -> list[torch.Tensor]:
        self._lane.coalescer = self._lane_coalescer(index)
        seed = key[4]
        lane_key = (*key[:4], None if seed is None else seed + index, *key[5:])
        try:
            with self.requests.lane(stamp):  # the lane's calls carry the generation's request and ticket
                return self._lane_rows(lane_key, rows, max_new_tokens, charge=False)
        finally:
            self._lane.coalescer = None

    def _lane_rows(
        self, key: tuple, rows: list[list[int]], max_new_tokens: int, charge: bool = True
    ) -> list[torch.Tensor]:
        do_sample, temperature, top_k, top_p, seed, stops, drafter = key[:7]
        batch = self._batch(rows, None)  # every caller's rows: checked per call in generate, not here
        check_length(batch.mask, max_new_tokens, self.config.max_position_embeddings)
        steps = list(
            self._stream(
                batch,
                max_new_tokens,
                SamplingOptions(do_sample, temperature, top_k, top_p),
                make_generator(seed),
                stops,
                charge=charge,
                drafter=drafter,
            )
        )
        pad = self.generation.pad_or_eos
        new = torch.stack(steps, dim=1) if steps else torch.empty(len(rows), 0, dtype=torch.long)
        if new.shape[1] < max_new_tokens:  # every row stopped early: the rest is padding
            new = torch.cat([new, torch.full((len(rows), max_new_tokens - new.shape[1]), pad)], dim=1)
        return list(new)

    def _steps_taken(self, new: list[torch.Tensor], stop_token_ids: Sequence[int], max_new_tokens: int) -> int:
        """How many steps a batch of just these rows would have run: until every row stopped."""
        stops = set(self.generation.eos_token_ids) | set(stop_token_ids)
        last = 0
        for row in new:
            hits = [i for i, t in enumerate(row.tolist()) if t in stops]
            last = max(last, hits[0] + 1 if hits else max_new_tokens)
        return min(last, max_new_tokens)

    def charging(self, account: str | None):
        """`with model.charging("alice"): ...`: generations started in this thread inside the block
        are paid by that ledger account (a scheduler with a ledger); a no-op for local models."""
        return self.requests.charging(account) if account else contextlib.nullcontext()

    def _payer(self) -> str | None:
        return self.requests.account

    def score(self, texts_or_ids: str | Sequence[str] | PromptIds) -> list[ScoreResult]:
        """Per-token log-probabilities of each text (or id row) under the model, from one prefill:
        token t's log p(t | the tokens before it); the first token has no context and no score."""
        if isinstance(texts_or_ids, str):
            texts_or_ids = [texts_or_ids]
        if len(texts_or_ids) and isinstance(texts_or_ids[0], str):
            rows = self.require_tokenizer().encode_batch(list(texts_or_ids))
        else:
            rows = texts_or_ids
        batch = self._batch(rows, None)
        self._check_limits(batch, None)
        check_length(batch.mask, 0, self.config.max_position_embeddings)
        with torch.inference_mode():
            logprobs = torch.log_softmax(self._forward_logits(batch).float(), dim=-1)
        results = []
        for r in range(batch.ids.shape[0]):
            ids = batch.ids[r][batch.mask[r]]
            lp = logprobs[r][batch.mask[r]]
            scores = lp[:-1].gather(1, ids[1:, None])[:, 0].tolist() if ids.numel() > 1 else []
            results.append(ScoreResult(ids.tolist(), scores))
        return results

    def map(
        self,
        collection,
        task: str = "generate",
        batch_size: int = 32,
        max_new_tokens: int = 32,
        progress: bool = True,
        **options,
    ):
        """Generate for (or score) every prompt of a list, a dask Bag or a dask/pandas Series, in
        batches so that each expert call carries many tokens; returns the same kind of collection.
        A prompt that fails (one longer than neuro.security.max-prompt-tokens included) becomes a
        `MapFailure` (with the error) and the others are delivered. max_new_tokens above
        neuro.security.max-new-tokens, or a batch_size above max-batch, raise LimitExceededError
        before any work. See neuro_dask/model/mapping.py."""
        from neuro_dask.model.mapping import map_collection

        return map_collection(
            self,
            collection,
            task=task,
            batch_size=batch_size,
            max_new_tokens=max_new_tokens,
            progress=progress,
            **options,
        )

    def generate_text(self, prompts: str | Sequence[str], max_new_tokens: int = 32, **options) -> list[str]:
        """Encode, generate, and decode only the new tokens (cut at the first EOS/stop token)."""
        tok = self.require_tokenizer()
        texts = [prompts] if isinstance(prompts, str) else list(prompts)
        ids = tok.encode_batch(texts)
        out = self.generate(ids, max_new_tokens=max_new_tokens, **options)
        width = max(len(r) for r in ids)
        stops = set(self.generation.eos_token_ids) | set(options.get("stop_token_ids", ()))
        return [tok.decode(_until_stop(row[width:].tolist(), stops)) for row in out]

    @property
    def model_id(self) -> str | None:
        """The id the scheduler serves this model under (its manifest's); None for a local model."""
        return self.executor.model_id

    @property
    def tier(self) -> str:
        """Where the experts run: "local" (this process), "standard" (on workers) or "private"
        (on workers, on secret shares: `nd.load(..., privacy="private")`)."""
        return self.executor.tier

    def stats(self) -> dict[str, Any]:
        """Counters of this model's expert calls so far, as a plain dict (a snapshot: later calls
        do not change it). Always "tier" and "model_id" (see above); then, by tier:

        * "local": nothing more (no network, nothing to count).
        * "standard": "layers" (layer calls, as timed: the most recent 100,000), "layer_ms_p50",
          "bytes_sent" and "bytes_received" (the hidden states' payload, both ways), and with the
          trust layer on (neuro.client.trust) "units" (expert calls judged), "replicas_sent",
          "unchecked" (accepted on a trusted worker's word alone), "hedges"; over the direct
          transport, "latency": the latency book's estimate per worker ("ewma_ms", "samples") and
          "paths", how each is reached (direct, relayed, punched or lan: docs/distributed.md).
        * "private": "layers", "rows" ((token, expert) pairs sent as shares), "round_trips",
          "messages", "bytes_sent", "bytes_received" (the shares), "worker_compute_s", and with
          trust on "verified", "unverified", "disputes", "caught" (steps checked by two
          independent splits, steps that could not be, disagreements, liars reported).
        """
        stats = {"tier": self.tier, "model_id": self.model_id, **self.executor.counters()}
        speculation = self.speculation.snapshot()
        if speculation["passes"]:
            stats["speculation"] = speculation
        return stats

    def close(self) -> None:
        """Release the executor's connections (a distributed model); a local model has none."""
        self.executor.close()

    def __enter__(self) -> MoEModel:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def require_tokenizer(self) -> Tokenizer:
        if self.tokenizer is None:
            raise TokenizerMissingError(self.source)
        return self.tokenizer


def _until_stop(tokens: list[int], stops: set[int]) -> list[int]:
    for i, tok in enumerate(tokens):
        if tok in stops:
            return tokens[:i]
    return tokens
