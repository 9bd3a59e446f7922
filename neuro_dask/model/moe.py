"""The MoE split: router on the client, experts behind an executor, combine on the client.

Shape legend: N routed tokens, K experts per token, E experts, D hidden, I expert intermediate.

One layer's MoE step is three pure functions around one call to an executor:
    route_tokens   -> (weights [N, K], experts [N, K])
    group_by_expert-> {expert: rows [n_e, D]} plus where each row came from
    executor.run_layer(layer, groups) -> {expert: outputs [n_e, D]}
    combine        -> [N, D] = sum_k weight_k * expert_k(x)
Each expert runs once over all of its tokens, whatever executor carries the call.

Two protocols meet here. An ExpertExecutor runs layers (`run_layer`) and lets go of what it holds
(`close`). A RequestScope is where generations start and end as requests, for executors whose work
is billed and versioned by a scheduler: MoEModel tells it where a request begins and ends, and
whose account pays; a local model has NoRequests.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class ExpertWeights:
    """One expert's SwiGLU weights, HF orientation: gate, up [I, D]; down [D, I]."""

    gate_proj: torch.Tensor
    up_proj: torch.Tensor
    down_proj: torch.Tensor

    TENSOR_NAMES = ("gate_proj", "up_proj", "down_proj")

    def as_dict(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, name) for name in self.TENSOR_NAMES}


def run_expert(x: torch.Tensor, w: ExpertWeights) -> torch.Tensor:
    """SwiGLU expert: x [n, D] -> [n, D]."""
    return F.linear(F.silu(F.linear(x, w.gate_proj)) * F.linear(x, w.up_proj), w.down_proj)


class ExpertExecutor(Protocol):
    """Runs one layer's expert calls. In process (LocalExpertExecutor, runtime/local.py), on workers
    (client/dispatch/executor.py) and on secret shares (client/dispatch/private_executor.py).

    It also says what it is, for `MoEModel.model_id`, `.tier` and `.stats()`: the scheduler's id of
    the model (None in process), where the experts run ("local", "standard" or "private"), and a
    snapshot of its own counters (`counters()`, {} in process)."""

    model_id: str | None
    tier: str

    def counters(self) -> dict[str, Any]:
        """A snapshot of this executor's call counters (a new dict each time)."""
        ...

    def run_layer(self, layer: int, groups: Mapping[int, torch.Tensor]) -> dict[int, torch.Tensor]:
        """groups: expert id -> rows [n_e, D]; returns expert id -> outputs [n_e, D]."""
        ...

    def close(self) -> None:
        """Let go of connections and send what is still to be reported; a no-op in process."""
        ...


class RequestScope(Protocol):
    """Billing and versions: where a generation starts and ends as one request.

    A scheduler with a ledger holds a request's fee before any work (`begin`) and settles it after
    (`end`); every expert call of the request carries its `stamp` (the request id and the
    scheduler's ticket). State is per thread: concurrent generations are separate requests, and
    the lanes of one pipelined generation (threads of their own) join its request with `lane`.
    """

    micro_batches: int  # lanes a generation's rows split into (neuro.client.micro-batches)

    def begin(self, expert_tokens: int) -> None:
        """Hold the fee for at most `expert_tokens` (layer, token, expert) evaluations, or raise."""
        ...

    def end(self) -> None:
        """Settle this thread's request (nothing when none was begun)."""
        ...

    def stamp(self) -> dict[str, Any]:
        """What this thread's expert calls carry: {"request": id, "ticket": ...}, or {} outside one."""
        ...

    def lane(self, stamp: Mapping[str, Any]) -> contextlib.AbstractContextManager[None]:
        """Inside the block, this thread's calls work for the request `stamp` names (a lane's thread)."""
        ...

    def note_pass(self, drafted: int, kept: int) -> None:
        """A speculative decoding pass of this thread's request verified `drafted` tokens, kept `kept`."""
        ...

    def charging(self, account: str | None) -> contextlib.AbstractContextManager[None]:
        """Inside the block, requests this thread begins are paid by `account`."""
        ...

    @property
    def account(self) -> str | None:
        """Who pays for this thread's next request (None: no one is charged)."""
        ...

    @property
    def current_version(self) -> str | None:
        """The model id current on this model's channel, as last heard at a request's start."""
        ...


class NoRequests:
    """The request scope of a model whose experts nobody bills: every request is free and local."""

    micro_batches = 1
    account = None
    current_version = None

    def begin(self, expert_tokens: int) -> None:
        pass

    def end(self) -> None:
        pass

    def stamp(self) -> dict[str, Any]:
        return {}

    @contextlib.contextmanager
    def lane(self, stamp: Mapping[str, Any]) -> Iterator[None]:
        yield

    def note_pass(self, drafted: int, kept: int) -> None:
        pass  # nobody watches a local model's passes but its own stats()

    def charging(self, account: str | None) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()


def route_tokens(logits: torch.Tensor, top_k: int, normalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k softmax router: logits [N, E] -> weights [N, K] (logits' dtype), experts [N, K] (int64).

    Softmax runs in float32 before top-k, as every supported architecture does; `normalize`
    rescales the chosen k to sum to one (Mixtral always, Qwen/OLMoE by norm_topk_prob).
    """
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
    weights, experts = torch.topk(probs, top_k, dim=-1)
    if normalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights.to(logits.dtype), experts


@dataclass(frozen=True)
class ExpertGroups:
    """Rows of one layer grouped by expert, ascending expert id, and where each row came from."""

    inputs: dict[int, torch.Tensor]  # expert -> rows [n_e, D]
    token_index: dict[int, torch.Tensor]  # expert -> [n_e] positions in the N routed tokens
    slot_index: dict[int, torch.Tensor]  # expert -> [n_e] which of the K choices it was


def group_by_expert(x: torch.Tensor, experts: torch.Tensor) -> ExpertGroups:
    """One stable sort instead of a mask per expert: O(N K log) and no E-sized one-hot."""
    n, k = experts.shape
    flat = experts.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=0).tolist()
    inputs: dict[int, torch.Tensor] = {}
    token_index: dict[int, torch.Tensor] = {}
    slot_index: dict[int, torch.Tensor] = {}
    start = 0
    for expert, count in enumerate(counts):
        if count == 0:
            continue
        picked = order[start : start + count]
        start += count
        tokens = torch.div(picked, k, rounding_mode="floor")
        token_index[expert] = tokens
        slot_index[expert] = picked - tokens * k
        inputs[expert] = x.index_select(0, tokens)
    return ExpertGroups(inputs, token_index, slot_index)


def combine(
    groups: ExpertGroups, outputs: Mapping[int, torch.Tensor], weights: torch.Tensor, like: torch.Tensor
) -> torch.Tensor:
    """sum_k weight_k * expert_k(x), accumulated in ascending expert order -> [N, D]."""
    out = torch.zeros_like(like)
    for expert, tokens in groups.token_index.items():
        y = outputs[expert]
        if y.shape != groups.inputs[expert].shape:
            raise RuntimeError(
                f"expert {expert} returned shape {tuple(y.shape)} for input {tuple(groups.inputs[expert].shape)}"
            )
        gate = weights[tokens, groups.slot_index[expert]].unsqueeze(-1)
        out.index_add_(0, tokens, (y * gate).to(out.dtype))
    return out


class LocalExpertExecutor:
    """Runs experts in this process: the reference, and the single-machine default.

    `weights` maps (layer, expert) to ExpertWeights; a store-backed mapping may load lazily.
    """

    model_id = None
    tier = "local"

    def __init__(self, weights: Mapping[tuple[int, int], ExpertWeights]):
        self.weights = weights

    def run_layer(self, layer: int, groups: Mapping[int, torch.Tensor]) -> dict[int, torch.Tensor]:
        return {e: run_expert(rows, self.weights[(layer, e)]) for e, rows in groups.items()}

    def counters(self) -> dict[str, Any]:
        return {}  # nothing crosses a network in process

    def close(self) -> None:
        pass  # nothing held beyond the weights, which the garbage collector frees
