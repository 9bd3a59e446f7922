"""TransformersMoEModel: neuro_dask's API over the checkpoint's own transformers model.

The trunk is a transformers `PreTrainedModel` (`model.hf`) whose experts call neuro_dask
(model/hf_trunk.py); everything MoEModel offers (generate, stream, score, map, concurrent
generations sharing expert calls, micro-batch lanes, requests paid on a ledger) works on top,
because MoEModel only asks its trunk for three things: prefill, decode one step, and full logits.
`model.hf` is a real transformers model: its own `generate` (streamers, logits processors,
assistant models, prompt lookup) runs with the experts on the network too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from neuro_dask.model.generation import Batch, positions_from_mask
from neuro_dask.model.hf_trunk import ExpertCalls, expert_calls, experts_modules
from neuro_dask.model.model import MoEModel


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
    ):
        device = self.device
        with expert_calls(self._dispatch, None if routed is None else routed.to(device)):
            return self.trunk(
                input_ids=ids.to(device),
                attention_mask=key_valid.to(device, torch.long),
                position_ids=positions.to(device),
                cache=cache,
                use_cache=last_only,
                logits_to_keep=1 if last_only else 0,
            )

    def _prefill(self, ids, positions, key_valid, routed, capacity):
        out = self._run(ids, positions, key_valid, routed)
        return out.logits[:, -1].float().cpu(), out.cache

    def _decode(self, ids, positions, key_valid, cache, routed):
        out = self._run(ids, positions, key_valid, routed, cache)
        return out.logits[:, -1].float().cpu()

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
