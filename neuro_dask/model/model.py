"""MoEModel: the public object. Trunk and router here; experts behind an ExpertExecutor.

Shape legend: B batch, T tokens this step, S cache slots, D hidden, V vocabulary.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch

from neuro_dask.errors import GenerationOptionError, TokenizerMissingError
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
from neuro_dask.model.moe import ExpertExecutor, combine, group_by_expert, route_tokens
from neuro_dask.model.tokenizer import Tokenizer
from neuro_dask.model.trunk import Trunk, TrunkLayer

log = logging.getLogger(__name__)

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


@dataclass
class MoEModel:
    config: MoEConfig
    trunk: Trunk
    executor: ExpertExecutor
    tokenizer: Tokenizer | None = None
    generation: GenerationDefaults = field(default_factory=GenerationDefaults)
    source: str = "<memory>"

    def __post_init__(self) -> None:
        self.rotary = RotaryEmbedding(self.config.head_dim, self.config.rope_theta)

    @property
    def dtype(self) -> torch.dtype:
        return self.trunk.embed_tokens.weight.dtype

    # ---- one pass over the layers -------------------------------------------------------------

    def _hidden(
        self,
        ids: torch.Tensor,
        positions: torch.Tensor,
        key_valid: torch.Tensor,
        cache: KVCache | None,
        routed: torch.Tensor,
    ) -> torch.Tensor:
        """ids, positions, routed [B, T]; key_valid [B, S] -> final-normed hidden [B, T, D].

        `routed` marks the tokens whose expert outputs matter; pads and finished rows are
        never sent to an expert, which matters once an expert call crosses the network.
        """
        h = self.trunk.embed_tokens(ids)
        rope = self.rotary(positions, h.dtype)
        start = cache.length if cache is not None else 0
        mask = attention_mask(key_valid, start, ids.shape[1], self.config.sliding_window)
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
            outputs = self.executor.run_layer(layer.index, groups.inputs)
            moe = combine(groups, outputs, weights, rows)
            shared = layer.shared_output(rows)
            out[routed] = moe if shared is None else moe + shared
        return out

    # ---- public API ---------------------------------------------------------------------------

    def _batch(self, input_ids: PromptIds, attention_mask: torch.Tensor | None) -> Batch:
        return prepare_batch(input_ids, attention_mask, self.generation.pad_or_eos, self.config.vocab_size)

    def forward(self, input_ids: PromptIds, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [B, T, V] (float32 when the trunk is float32); rows left-padded as given."""
        batch = self._batch(input_ids, attention_mask)
        check_length(batch.mask, 0, self.config.max_position_embeddings)
        with torch.inference_mode():
            return self._forward_logits(batch)

    def _forward_logits(self, batch: Batch) -> torch.Tensor:
        hidden = self._hidden(batch.ids, positions_from_mask(batch.mask), batch.mask, None, batch.mask)
        return self.trunk.lm_head(hidden)

    __call__ = forward

    def stream(
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
    ) -> Iterator[torch.Tensor]:
        """Yield the next token of every row [B] per step; finished rows get the pad id.

        Ends when every row has produced an EOS or stop token, or after max_new_tokens.
        """
        opts = SamplingOptions(do_sample, temperature, top_k, top_p)
        if max_new_tokens < 0:
            raise GenerationOptionError("max_new_tokens", max_new_tokens, "must be >= 0")
        batch = self._batch(input_ids, attention_mask)
        check_length(batch.mask, max_new_tokens, self.config.max_position_embeddings)
        return self._stream(batch, max_new_tokens, opts, make_generator(seed), stop_token_ids)

    def _stream(
        self,
        batch: Batch,
        max_new_tokens: int,
        opts: SamplingOptions,
        generator: torch.Generator | None,
        stop_token_ids: Sequence[int],
    ) -> Iterator[torch.Tensor]:
        if max_new_tokens == 0:
            return
        b, t = batch.ids.shape
        cfg = self.config
        stops = torch.tensor(sorted(set(self.generation.eos_token_ids) | set(stop_token_ids)), dtype=torch.long)
        pad = self.generation.pad_or_eos
        cache = KVCache(cfg.num_hidden_layers, b, cfg.num_key_value_heads, cfg.head_dim,
                        t + max_new_tokens, self.dtype, self.trunk.embed_tokens.weight.device)
        key_valid = torch.zeros(b, t + max_new_tokens, dtype=torch.bool)
        key_valid[:, :t] = batch.mask
        positions = positions_from_mask(batch.mask)
        unfinished = torch.ones(b, dtype=torch.bool)
        with torch.inference_mode(), full_collections_deferred(), self._request(b * (t + max_new_tokens)):
            hidden = self._hidden(batch.ids, positions, key_valid[:, :t], cache, batch.mask)
            next_pos = positions[:, -1:] + 1
            for step in range(max_new_tokens):
                collect_young()
                logits = self.trunk.lm_head(hidden[:, -1]).float()
                token = select_next(logits, opts, generator)
                token = torch.where(unfinished, token, torch.full_like(token, pad))
                yield token
                unfinished &= ~torch.isin(token, stops)
                if step == max_new_tokens - 1 or not bool(unfinished.any()):
                    return
                key_valid[:, t + step] = True
                hidden = self._hidden(token[:, None], next_pos, key_valid[:, :t + step + 1], cache,
                                      unfinished[:, None])
                next_pos = next_pos + 1

    @contextlib.contextmanager
    def _request(self, tokens: int) -> Iterator[None]:
        """An executor that charges for work (a scheduler with a ledger) is told where a request
        starts and ends: it holds the fee for at most `tokens` x layers x top-k x 2 (one check per
        call) expert-tokens before any work and settles by the validated work after."""
        begin = getattr(self.executor, "begin_request", None)
        if begin is None:
            yield
            return
        begin(tokens * self.config.num_hidden_layers * self.config.num_experts_per_tok * 2)
        try:
            yield
        finally:
            self.executor.end_request()

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
    ) -> torch.Tensor:
        """LongTensor [B, T + new], prompt included (left-padded), as transformers returns it."""
        batch = self._batch(input_ids, attention_mask)
        steps = list(self.stream(batch.ids, batch.mask, max_new_tokens, do_sample, temperature,
                                 top_k, top_p, seed, stop_token_ids))
        prompt = torch.where(batch.mask, batch.ids, torch.full_like(batch.ids, self.generation.pad_or_eos))
        if not steps:
            return prompt
        return torch.cat([prompt, torch.stack(steps, dim=1)], dim=1)

    def generate_text(self, prompts: str | Sequence[str], max_new_tokens: int = 32, **options) -> list[str]:
        """Encode, generate, and decode only the new tokens (cut at the first EOS/stop token)."""
        tok = self.require_tokenizer()
        texts = [prompts] if isinstance(prompts, str) else list(prompts)
        ids = tok.encode_batch(texts)
        out = self.generate(ids, max_new_tokens=max_new_tokens, **options)
        width = max(len(r) for r in ids)
        stops = set(self.generation.eos_token_ids) | set(options.get("stop_token_ids", ()))
        return [tok.decode(_until_stop(row[width:].tolist(), stops)) for row in out]

    def close(self) -> None:
        """Release the executor's connections (a distributed model); a local model has none."""
        close = getattr(self.executor, "close", None)
        if close is not None:
            close()

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
