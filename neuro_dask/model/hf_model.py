"""TransformersMoEModel: neuro_dask's API over the checkpoint's own transformers model.

The trunk is a transformers `PreTrainedModel` (`model.hf`) whose experts call neuro_dask
(model/hf_trunk.py); everything MoEModel offers (generate, stream, score, map, concurrent
generations sharing expert calls, micro-batch lanes, requests paid on a ledger) works on top,
because MoEModel only asks its trunk for a few things: prefill, decode one step, full logits,
and for speculative decoding, a pass over several new tokens and a cache rollback.
`model.hf` is a real transformers model: its own `generate` (streamers, logits processors,
assistant models, prompt lookup) runs with the experts on the network too.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from neuro_dask.model.generation import Batch, positions_from_mask
from neuro_dask.model.hf_trunk import ExpertCalls, expert_calls, experts_modules
from neuro_dask.model.model import MoEModel, plain_decoding_because

_RECORD = threading.local()  # this thread's list of final hidden states, inside final_hidden()
_HOOK_LOCK = threading.Lock()


def _record_final_norm(_module, _args, output) -> None:
    seen = getattr(_RECORD, "seen", None)
    if seen is not None:
        seen.append(output)


@dataclass
class TransformersMoEModel(MoEModel):
    """`trunk` is the transformers causal LM (experts on meta, calling neuro_dask)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        # transformers' own entry points (model.hf.generate, a pipeline) run with no neuro_dask
        # frame on the stack: their experts calls go to this model's executor, every row sent.
        for module in experts_modules(self.trunk).values():
            module._neuro_calls = ExpertCalls(self._dispatch)

    @property
    def hf(self):
        """The transformers model itself (a PreTrainedModel)."""
        return self.trunk

    @property
    def dtype(self) -> torch.dtype:
        return self.trunk.get_input_embeddings().weight.dtype

    @property
    def device(self) -> torch.device:
        return self.trunk.get_input_embeddings().weight.device

    def _rotary(self) -> None:
        return None  # transformers computes its own positions' embeddings

    def _dispatch(self, layer: int, groups):
        return self._coalescer().run_layer(layer, groups)

    def _run(
        self,
        ids: torch.Tensor,
        positions: torch.Tensor,
        key_valid: torch.Tensor,
        routed: torch.Tensor | None,
        cache: Any = None,
        last_only: bool = True,
        use_cache: bool | None = None,
    ):
        device = self.device
        with expert_calls(self._dispatch, None if routed is None else routed.to(device)):
            return self.trunk(
                input_ids=ids.to(device),
                attention_mask=key_valid.to(device, torch.long),
                position_ids=positions.to(device),
                cache=cache,
                use_cache=last_only if use_cache is None else use_cache,
                logits_to_keep=1 if last_only else 0,
            )

    def _prefill(self, ids, positions, key_valid, routed, capacity):
        out = self._run(ids, positions, key_valid, routed)
        return out.logits[:, -1].float().cpu(), out.cache

    def _decode(self, ids, positions, key_valid, cache, routed):
        out = self._run(ids, positions, key_valid, routed, cache)
        return out.logits[:, -1].float().cpu()

    def _verify(self, ids, positions, key_valid, cache, routed):
        """Several new tokens per row -> the logits after each [B, T, V], the cache extended."""
        if hasattr(cache, "activate_past_recording"):  # sliding-window layers keep what a rollback needs
            cache.activate_past_recording()
        out = self._run(ids, positions, key_valid, routed, cache, last_only=False, use_cache=True)
        return out.logits.float().cpu()

    @contextlib.contextmanager
    def final_hidden(self) -> Iterator[list[torch.Tensor]]:
        """The final norm's output [B, T, D] of every pass this thread runs inside the block
        (what a multi-token-prediction layer reads: client/mtp_draft.py). Other threads'
        passes on the same model are not recorded."""
        norm = getattr(self.trunk.base_model, "norm", None)
        if norm is None:
            raise AttributeError(f"{type(self.trunk).__name__} has no final norm to read hidden states from")
        with _HOOK_LOCK:
            if not getattr(norm, "_neuro_recorded", False):
                norm.register_forward_hook(_record_final_norm)
                norm._neuro_recorded = True
        previous = getattr(_RECORD, "seen", None)
        _RECORD.seen = seen = []
        try:
            yield seen
        finally:
            _RECORD.seen = previous

    def supports_trees(self) -> bool:
        return False  # transformers builds its own masks: drafts are verified as chains

    def speculation_unsupported(self) -> str:
        # transformers' own rule for assisted generation: a stateful model (recurrent, linear
        # attention or compressed layers) cannot take back the tokens a state has absorbed.
        if getattr(self.trunk, "_is_stateful", False):
            return f"{type(self.trunk).__name__} keeps a state that cannot be rolled back past rejected drafts"
        return ""

    def _can_roll_back(self, cache) -> bool:
        """Whether drafts may be verified on this cache and taken back: transformers' own caches
        crop (a model's own cache class that overrides crop may not: MiniMax's linear-attention
        cache refuses). A sparse-attention indexer's cache (DeepSeek-V3.2's DSA and its kin) is
        refused too: its indexer picks each query's keys from the whole pass, so verifying
        several tokens at once does not give the logits one-at-a-time decoding gives (measured
        on axk2 and hy_v4 in tests/golden). Such models decode plainly."""
        from transformers.cache_utils import Cache

        crop = getattr(type(cache), "crop", None)
        why = ""
        if crop is None or crop.__module__ != Cache.__module__:
            why = f"{type(cache).__name__} cannot be rolled back"
        elif any(hasattr(layer, "indexer_keys") for layer in getattr(cache, "layers", ())):
            why = "its sparse-attention indexer selects keys differently for a pass of several tokens"
        if why:
            plain_decoding_because(why)
        return not why

    def _rollback(self, cache, length: int) -> None:
        """Keep the cache's first `length` positions (transformers' Cache.crop takes how many to drop)."""
        drop = int(cache.get_seq_length()) - int(length)
        cache.crop(-max(drop, 0))  # crop(0) trims what a sliding window kept for a rollback

    def _forward_logits(self, batch: Batch) -> torch.Tensor:
        out = self._run(batch.ids, positions_from_mask(batch.mask), batch.mask, batch.mask, last_only=False)
        return out.logits.cpu()

    def hf_generate(self, input_ids: torch.Tensor, **kwargs) -> torch.Tensor:
        """transformers' own `generate` (streamers, logits processors, assistant_model,
        prompt_lookup_num_tokens...) with the experts on the network, paid as one request."""
        ids = torch.as_tensor(input_ids)
        budget = ids.numel() + ids.shape[0] * int(kwargs.get("max_new_tokens", 20))
        self._check_limits(self._batch(ids, kwargs.get("attention_mask")), kwargs.get("max_new_tokens"))
        with self._request(budget), torch.inference_mode():
            return self.trunk.generate(
                ids.to(self.device), **{k: (v.to(self.device) if torch.is_tensor(v) else v) for k, v in kwargs.items()}
            )
