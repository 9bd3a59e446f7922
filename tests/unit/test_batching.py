"""Continuous batching: concurrent generations share expert calls and decode batches."""

from __future__ import annotations

import threading

import pytest
import torch

import neuro_dask as nd
from neuro_dask.model.batching import GenerationBatcher, StepCoalescer


class Recorder:
    """An expert executor that doubles rows and remembers how many rows each call carried."""

    def __init__(self, fail_on_layer: int | None = None):
        self.calls: list[tuple[int, dict[int, int]]] = []
        self.fail_on_layer = fail_on_layer
        self.lock = threading.Lock()

    def __call__(self, layer, groups):
        with self.lock:
            self.calls.append((layer, {e: r.shape[0] for e, r in groups.items()}))
        if layer == self.fail_on_layer:
            raise RuntimeError("worker gone")
        return {e: r * 2 for e, r in groups.items()}


def participants(coalescer: StepCoalescer, n: int, layers: int = 3):
    """n threads, each a participant running `layers` layers with its own rows."""
    results, errors, start = [None] * n, [None] * n, threading.Barrier(n)

    def run(k):
        rows = {0: torch.full((1, 2), float(k)), k % 2 + 1: torch.full((2, 2), float(k))}
        with coalescer.participant():
            start.wait()
            try:
                out = [coalescer.run_layer(layer, rows) for layer in range(layers)]
                results[k] = out
            except RuntimeError as exc:
                errors[k] = exc

    threads = [threading.Thread(target=run, args=(k,)) for k in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results, errors


def test_participants_share_one_call_per_layer_and_get_their_own_rows_back():
    rec = Recorder()
    coalescer = StepCoalescer(rec, patience=30.0)
    results, errors = participants(coalescer, 4)
    assert errors == [None] * 4
    assert len(rec.calls) == 3  # one merged call per layer, not 12
    assert all(sizes == {0: 4, 1: 4, 2: 4} for _, sizes in rec.calls)
    for k, out in enumerate(results):
        for layer_out in out:
            assert torch.equal(layer_out[0], torch.full((1, 2), 2.0 * k))
            assert torch.equal(layer_out[k % 2 + 1], torch.full((2, 2), 2.0 * k))


def test_a_failed_merged_call_fails_every_participant_in_it():
    coalescer = StepCoalescer(Recorder(fail_on_layer=1), patience=30.0)
    _, errors = participants(coalescer, 3)
    assert all(isinstance(e, RuntimeError) for e in errors)


def test_a_paused_participant_holds_nobody_up():
    rec = Recorder()
    coalescer = StepCoalescer(rec, patience=30.0)
    paused, resume = threading.Event(), threading.Event()

    def sleeper():
        with coalescer.participant():
            with coalescer.idle():  # a stream whose reader is away
                paused.set()
                resume.wait()

    t = threading.Thread(target=sleeper)
    t.start()
    paused.wait()
    results, errors = participants(coalescer, 2, layers=2)  # would wait forever if the sleeper counted
    resume.set()
    t.join()
    assert errors == [None, None] and len(rec.calls) == 2


def test_calls_outside_a_generation_go_straight_through():
    rec = Recorder()
    coalescer = StepCoalescer(rec)
    out = coalescer.run_layer(0, {3: torch.ones(1, 2)})
    assert torch.equal(out[3], torch.full((1, 2), 2.0)) and len(rec.calls) == 1


def test_the_generation_batcher_batches_queued_calls_with_the_same_options():
    seen: list[int] = []
    gate = threading.Event()

    def run(key, rows, n):
        seen.append(len(rows))
        if len(seen) == 1:
            gate.wait()  # the first batch runs until every other caller has queued
        return [torch.tensor([row[0]] * n) for row in rows]

    batcher = GenerationBatcher(run)
    out = [None] * 6

    def call(k):
        out[k] = batcher.generate(("greedy",), [[k], [k + 10]], 3)

    first = threading.Thread(target=call, args=(0,))
    first.start()
    while not seen:
        threading.Event().wait(0.01)  # poll: until the first batch is running
    rest = [threading.Thread(target=call, args=(k,)) for k in range(1, 6)]
    for t in rest:
        t.start()
    while len(batcher._queue) < 5:
        threading.Event().wait(0.01)  # poll: until the other five have queued
    gate.set()
    for t in [first, *rest]:
        t.join()
    assert seen == [2, 10]  # one lone call, then the five queued ones together
    for k in range(6):
        assert [t.tolist() for t in out[k]] == [[k] * 3, [k + 10] * 3]


def test_concurrent_generate_calls_return_exactly_what_each_would_alone():
    from neuro_dask.demo.addition import ASSET_DIR

    model = nd.load(ASSET_DIR)
    prompts = [[3 + k % 9, 5, 6 + k % 3] for k in range(12)]  # ids inside the adder's 15-token vocabulary
    alone = [model.generate([p], max_new_tokens=6) for p in prompts]
    mixed = [model.generate([p, prompts[0]], max_new_tokens=4) for p in prompts[:3]]
    out: list = [None] * 12

    def call(k):
        out[k] = model.generate([prompts[k]], max_new_tokens=6)

    threads = [threading.Thread(target=call, args=(k,)) for k in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(torch.equal(out[k], alone[k]) for k in range(12))
    assert model.batcher.requests == 12 + 12 + 3 and model.batcher.batches <= 12 + 3 + 12
    assert torch.equal(mixed[0][0], model.generate([prompts[0], prompts[0]], max_new_tokens=4)[0])


def test_seeded_sampling_is_never_batched_with_others():
    from neuro_dask.demo.addition import ASSET_DIR

    model = nd.load(ASSET_DIR)
    before = model.batcher.requests
    a = model.generate([[5, 6, 7]], max_new_tokens=5, do_sample=True, seed=3, temperature=0.8)
    b = model.generate([[5, 6, 7]], max_new_tokens=5, do_sample=True, seed=3, temperature=0.8)
    assert torch.equal(a, b) and model.batcher.requests == before


def test_bad_options_are_refused_before_queueing():
    from neuro_dask.demo.addition import ASSET_DIR
    from neuro_dask.errors import GenerationOptionError

    model = nd.load(ASSET_DIR)
    with pytest.raises(GenerationOptionError):
        model.generate([[5, 6]], max_new_tokens=-1)
    assert model.batcher.requests == 0
