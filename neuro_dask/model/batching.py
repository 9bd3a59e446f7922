"""Continuous batching at the experts: concurrent generations share every expert call.

Each generation (`MoEModel.generate` or `stream`, in any thread) is a *participant* while it
runs. When a participant reaches an MoE layer it leaves its rows at the coalescer; once every
running participant is waiting at some layer, the last one to arrive runs one expert call per
layer for all of them (rows of the same expert concatenated, so each call carries the tokens of
every active sequence) and hands each participant its own rows back. A generation paused at a
`yield` (a stream whose reader is busy) is not running and holds nobody up. Calls from threads
that are not participants (`forward`, scoring) go straight through.

The expert executor is therefore called by one thread at a time for the participants; a
waiting participant that sees no progress for `patience` seconds runs the pending calls itself,
so a stuck peer can slow the others but never block them.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field

import torch

RunLayer = Callable[[int, Mapping[int, torch.Tensor]], dict[int, torch.Tensor]]


@dataclass
class _Ticket:
    layer: int
    groups: Mapping[int, torch.Tensor]
    result: dict[int, torch.Tensor] | None = None
    error: BaseException | None = None
    taken: bool = False  # a flush has it (done when that flush ends)
    done: bool = False
    sizes: dict[int, int] = field(default_factory=dict)


class StepCoalescer:
    def __init__(self, run_layer: RunLayer, patience: float = 1.0):
        self._run = run_layer
        self._cv = threading.Condition()
        self._running = 0  # participants not paused
        self._pending: list[_Ticket] = []
        self._local = threading.local()
        self.patience = patience
        self.merged_calls = 0  # expert calls that carried more than one participant's rows
        self.calls = 0

    @contextlib.contextmanager
    def participant(self) -> Iterator[None]:
        """A generation in this thread, for as long as the block runs."""
        if getattr(self._local, "depth", 0):
            self._local.depth += 1  # nested (generate -> stream): already one
            try:
                yield
            finally:
                self._local.depth -= 1
            return
        self._local.depth = 1
        with self._cv:
            self._running += 1
        try:
            yield
        finally:
            self._local.depth = 0
            self._leave()

    @contextlib.contextmanager
    def idle(self) -> Iterator[None]:
        """The participant is paused (at a yield): the others need not wait for it."""
        if not getattr(self._local, "depth", 0):
            yield
            return
        self._leave()
        try:
            yield
        finally:
            with self._cv:
                self._running += 1

    def _leave(self) -> None:
        with self._cv:
            self._running -= 1
            ready = self._ready()
        if ready:
            self._flush()

    def _ready(self) -> bool:
        return bool(self._pending) and len(self._pending) >= self._running

    def run_layer(self, layer: int, groups: Mapping[int, torch.Tensor]) -> dict[int, torch.Tensor]:
        if not getattr(self._local, "depth", 0):
            self.calls += 1
            return self._run(layer, groups)
        ticket = _Ticket(layer, groups)
        with self._cv:
            self._pending.append(ticket)
            ready = self._ready()
        if ready:
            self._flush()
        while True:
            with self._cv:
                if (
                    not ticket.done
                    and not self._cv.wait_for(lambda: ticket.done, timeout=self.patience)
                    and not ticket.taken
                ):
                    stuck = True  # nobody ran it in time: run what is pending ourselves
                else:
                    stuck = False
            if stuck:
                self._flush()
            if ticket.done:
                break
        if ticket.error is not None:
            raise ticket.error
        return ticket.result

    def _flush(self) -> None:
        with self._cv:
            tickets, self._pending = self._pending, []
            for t in tickets:
                t.taken = True
        if not tickets:
            return
        by_layer: dict[int, list[_Ticket]] = {}
        for t in tickets:
            by_layer.setdefault(t.layer, []).append(t)
        try:
            for layer, group in by_layer.items():
                self._run_merged(layer, group)
        finally:
            with self._cv:
                for t in tickets:
                    t.done = True
                self._cv.notify_all()

    def _run_merged(self, layer: int, tickets: list[_Ticket]) -> None:
        merged: dict[int, list[torch.Tensor]] = {}
        for t in tickets:
            for expert, rows in t.groups.items():
                merged.setdefault(expert, []).append(rows)
                t.sizes[expert] = rows.shape[0]
        self.calls += 1
        self.merged_calls += len(tickets) > 1
        try:
            out = self._run(layer, {e: torch.cat(parts) if len(parts) > 1 else parts[0] for e, parts in merged.items()})
        except BaseException as exc:  # every participant of the call sees its failure
            for t in tickets:
                t.error = exc
            return
        offsets = dict.fromkeys(merged, 0)
        for t in tickets:
            t.result = {}
            for expert, n in t.sizes.items():
                t.result[expert] = out[expert][offsets[expert] : offsets[expert] + n]
                offsets[expert] += n


@dataclass
class _Request:
    key: tuple
    rows: list[list[int]]
    max_new_tokens: int
    result: list[torch.Tensor] | None = None  # per row: its new tokens
    error: BaseException | None = None
    done: bool = False


class GenerationBatcher:
    """Concurrent `generate` calls with the same decoding options run as one batch.

    No timers: a call that finds no batch running starts one with every compatible call queued
    so far (itself first); calls that arrive meanwhile queue and form the next batch when it
    ends. Under sustained concurrency batches form by themselves; a lone call runs at once.
    `run(key, rows, max_new_tokens)` generates for all rows together and returns each row's new
    tokens (pad after its stop); each caller gets its own rows' tokens back.
    """

    def __init__(self, run: Callable[[tuple, list[list[int]], int], list[torch.Tensor]]):
        self._run = run
        self._cv = threading.Condition()
        self._queue: list[_Request] = []
        self._busy = False
        self.batches = 0
        self.requests = 0

    def generate(self, key: tuple, rows: list[list[int]], max_new_tokens: int) -> list[torch.Tensor]:
        me = _Request(key, rows, max_new_tokens)
        with self._cv:
            self._queue.append(me)
            while not me.done and (self._busy or self._queue[0] is not me):
                self._cv.wait()
            if me.done:  # an earlier leader took us along
                return self._result(me)
            batch = [r for r in self._queue if r.key == key]
            self._queue = [r for r in self._queue if r.key != key]
            self._busy = True
        try:
            self._run_batch(batch)
        finally:
            with self._cv:
                self._busy = False
                for r in batch:
                    r.done = True
                self._cv.notify_all()
        return self._result(me)

    @staticmethod
    def _result(me: _Request) -> list[torch.Tensor]:
        if me.error is not None:
            raise me.error
        return me.result

    def _run_batch(self, batch: list[_Request]) -> None:
        self.batches += 1
        self.requests += len(batch)
        rows = [row for r in batch for row in r.rows]
        try:
            new = self._run(batch[0].key, rows, max(r.max_new_tokens for r in batch))
        except BaseException as exc:
            for r in batch:
                r.error = exc
            return
        i = 0
        for r in batch:
            r.result = [t[: r.max_new_tokens] for t in new[i : i + len(r.rows)]]
            i += len(r.rows)
