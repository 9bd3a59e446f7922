"""An MTP draft (`speculative="mtp"`): the checkpoint's own multi-token-prediction layer drafts.

DeepSeek-V3 and its kin (R1, V3.1, Kimi K2, GLM-4.5) were trained with a layer that reads the
main model's last hidden state and the next token and guesses the token after
(neuro_dask/model/mtp.py). `neuro-dask shard` keeps that layer in the store
(store/mtp_sharder.py); this draft runs it on the client. Each verification pass already gives
the main model's hidden states of every kept position, so the layer adds one local decoder
layer per draft token and no network round trip: DeepSeek reports 85-90% of its second-token
guesses accepted (DeepSeek-V3 report, 5.4.3).

The layer's routed experts run here, as many as `memory_budget` allows (a DeepSeek-V3 MTP
layer has 256 of them, 11 GB in FP8); an expert not copied contributes nothing, as in the
self-draft: a worse draft, never a wrong answer, since the real model verifies every token.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from neuro_dask.client.self_draft import DEFAULT_BUDGET, PartialExpertExecutor
from neuro_dask.model.generation import Batch, positions_from_mask
from neuro_dask.model.hf_trunk import expert_calls
from neuro_dask.model.mtp import MtpLayer, build_mtp_layers
from neuro_dask.model.speculation import DraftTree
from neuro_dask.model.speculative import SpeculationError, chain_tree, register_draft
from neuro_dask.store.manifest import ROLE_MTP_EXPERT
from neuro_dask.store.shard_store import ShardStore

log = logging.getLogger(__name__)


class MtpModel:
    """The layer with the main model's embedding, output head and rotary tables."""

    def __init__(self, model: Any, layer: MtpLayer, experts: PartialExpertExecutor):
        self.model = model
        self.layer = layer
        self.experts = experts
        self.config = model.trunk.config

    def step(self, ids, previous, positions, key_valid, cache) -> tuple[torch.Tensor, torch.Tensor]:
        """ids [B, n] the next tokens, previous [B, n, D] the states before them -> (g [B, n, D],
        logits [B, n, V] of the token after each next one); the cache gains n positions."""
        from transformers.masking_utils import create_causal_mask

        base, device = self.model.trunk.base_model, self.model.device
        embeds = base.embed_tokens(ids.to(device))
        positions = positions.to(device)
        mask = create_causal_mask(
            config=self.config,
            inputs_embeds=embeds,
            attention_mask=key_valid.to(device, torch.long),
            cache=cache,
            position_ids=positions,
        )
        rotary = base.rotary_emb(embeds, positions)
        with expert_calls(self.experts.run_layer):
            g = self.layer(embeds, previous.to(embeds.dtype), positions, mask, cache, rotary)
        logits = self.model.trunk.get_output_embeddings()(self.layer.shared_head.norm(g))
        return g, logits.float()


class _MtpSession:
    """One generation's MTP state. Slot s pairs the main model's state at slot s with the token
    at slot s + 1 (the layer's position s); the layer's cache holds the pairs whose state the
    main model has given (`fed`), and drafts are pairs of the layer's own state, taken back."""

    wants_hidden = True  # speculative_steps hands each commit the main model's states

    def __init__(self, mtp: MtpModel, rows: list[list[int]], capacity: int, max_k: int):
        from transformers.cache_utils import DynamicCache

        self.mtp = mtp
        batch: Batch = mtp.model._batch(rows, None)
        b, t = batch.ids.shape
        size = t + capacity + max_k + 2
        self.ids = torch.zeros(b, size, dtype=torch.long)
        self.ids[:, :t] = batch.ids
        self.valid = torch.zeros(b, size, dtype=torch.bool)
        self.valid[:, :t] = batch.mask
        self.positions = torch.zeros(b, size, dtype=torch.long)
        self.positions[:, :t] = positions_from_mask(batch.mask)
        self.tokens = t  # slots holding the context
        self.fed = 0  # slots whose pair is in the layer's cache
        self.pending: list[torch.Tensor] = []  # the main model's states for slots fed.., not yet fed
        self.cache = DynamicCache()
        self.blind = False  # a commit came without states: no drafts from here on

    def commit(self, tokens: torch.Tensor, hidden: torch.Tensor | None = None) -> None:
        n = tokens.shape[1]
        at = self.tokens
        self.ids[:, at : at + n] = tokens
        self.valid[:, at : at + n] = True
        self.positions[:, at : at + n] = self.positions[:, at - 1 : at] + 1 + torch.arange(n)
        self.tokens += n
        if hidden is None:
            self.blind = True
        else:
            self.pending.append(hidden)

    def propose(self, k: int) -> list[list[int]]:
        chain = self._chain(k)
        return [[] for _ in range(self.ids.shape[0])] if chain is None else chain[0].tolist()

    def propose_tree(self, k: int, width: int) -> DraftTree | None:
        chain = self._chain(k)
        return None if chain is None else chain_tree(chain[0], chain[1], width)

    def _chain(self, k: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The layer's greedy chain of k tokens per row [B, k], and its second choices [B, k]."""
        if k == 0 or self.blind or not self.pending:
            return None
        with torch.inference_mode():
            states = torch.cat(self.pending, dim=1)
            self.pending = []
            start, end = self.fed, self.fed + states.shape[1]  # end == self.tokens - 1
            g, logits = self._feed(self.ids[:, start + 1 : end + 1], states, start)
            self.fed = end
            firsts, seconds = [], []
            for i in range(k):
                top = logits[:, -1].topk(2, dim=-1).indices.cpu()
                firsts.append(top[:, 0])
                seconds.append(top[:, 1])
                if i < k - 1:  # the layer's own state stands in for the main model's
                    g, logits = self._feed(top[:, :1], g[:, -1:], end + i)
            self.cache.crop(-(int(self.cache.get_seq_length()) - self.fed))  # crop takes how many to drop
            self.valid[:, self.tokens :] = False
        return torch.stack(firsts, dim=1), torch.stack(seconds, dim=1)

    def _feed(self, ids: torch.Tensor, states: torch.Tensor, start: int) -> tuple[torch.Tensor, torch.Tensor]:
        n = ids.shape[1]
        for slot in range(max(start, self.tokens), start + n):  # draft slots: past the context
            self.valid[:, slot] = True
            self.positions[:, slot] = self.positions[:, slot - 1] + 1
        return self.mtp.step(ids, states, self.positions[:, start : start + n], self.valid[:, : start + n], self.cache)


class MtpDraft:
    """Drafts from the checkpoint's first multi-token-prediction layer (greedy: exact for sampling too)."""

    name = "mtp"

    def __init__(self, mtp: MtpModel, max_k: int = 8):
        self.mtp = mtp
        self.max_k = max_k

    def start(self, rows: list[list[int]], capacity: int) -> _MtpSession:
        return _MtpSession(self.mtp, rows, capacity, self.max_k)


def mtp_draft(model: Any, memory_budget: int = DEFAULT_BUDGET) -> MtpDraft:
    """An MTP draft for `model`, from its store (`model.source`): the first multi-token-prediction
    layer, and its routed experts in index order as far as `memory_budget` bytes allow."""
    if not hasattr(model, "final_hidden"):
        raise SpeculationError(
            f"{model.source} has no multi-token-prediction layer: only a store sharded with --layout "
            "transformers keeps one (DeepSeek-V3, Kimi K2, GLM-4.5); use prompt-lookup, self or a draft model"
        )
    try:
        store = model.store or ShardStore(model.source, verify=True)
    except Exception as exc:
        raise SpeculationError(f"an MTP draft reads the model's store ({model.source}): {exc}") from exc
    manifest = store.manifest
    if manifest.mtp is None:
        raise SpeculationError(
            f"{model.source} has no multi-token-prediction layers (a checkpoint ships them as "
            "num_nextn_predict_layers: DeepSeek-V3, Kimi K2, GLM-4.5); use prompt-lookup, self or a draft model"
        )
    first = int(manifest.config["num_hidden_layers"])
    where = str(store.path(manifest.mtp))
    # DeepSeek-V3, Kimi K2 and GLM-4.5 ship one such layer; a chain of drafts reuses it (as vLLM does)
    (layer,) = build_mtp_layers(manifest.config, store.read_mtp(), 1, model.dtype, model.device, where)
    experts = sorted(a.expert for a in manifest.mtp_experts if a.layer == first)
    chosen = experts[: max(0, memory_budget // max(1, _expert_bytes(manifest, first, model.dtype)))]
    weights = {(first, e): store.read_expert(first, e, model.dtype, role=ROLE_MTP_EXPERT) for e in chosen}
    log.info("MTP draft: layer %d with %d of its %d experts", first, len(chosen), len(experts))
    return MtpDraft(MtpModel(model, layer, PartialExpertExecutor(weights)))


def _expert_bytes(manifest, layer: int, dtype: torch.dtype) -> int:
    """One expert's bytes in `dtype`, from its file's parameter count."""
    params = max((a.parameters for a in manifest.mtp_experts if a.layer == layer), default=0)
    return params * dtype.itemsize


register_draft("mtp", mtp_draft)
