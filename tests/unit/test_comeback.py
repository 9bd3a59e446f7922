"""When a volunteer comes back after its scheduler or relay went away (volunteer/comeback.py)."""

from __future__ import annotations

import json
import random

import pytest

from neuro_dask.volunteer.comeback import (
    MAX_DELAY,
    NOTE_LIFETIME,
    ComebackNote,
    comeback_delays,
    comeback_spread,
    read_comeback,
    reconnect_delay,
    valid_delay,
    worker_file,
)


def test_comeback_delays_spread_volunteers_over_the_window():
    delays = comeback_delays(1000, 30.0, random.Random(1))
    assert len(delays) == 1000 and all(0 <= d <= 30.0 for d in delays)
    per_second = [sum(1 for d in delays if s <= d < s + 1) for s in range(30)]
    assert max(per_second) <= 40  # evenly: about 33 a second, never a stampede
    assert comeback_delays(0, 30.0) == []


def test_the_window_grows_with_the_volunteers_at_the_rate_up_to_the_cap():
    assert comeback_spread(3, rate=20, cap=30) == pytest.approx(0.15)  # three come back at once, nearly
    assert comeback_spread(200, rate=20, cap=30) == pytest.approx(10.0)
    assert comeback_spread(100_000, rate=20, cap=30) == 30.0
    delays = comeback_delays(200, comeback_spread(200, 20, 30), random.Random(3))
    per_second = [sum(1 for d in delays if s <= d < s + 1) for s in range(10)]
    assert max(per_second) <= 22  # about the rate, never the whole crowd


def test_reconnect_backoff_grows_is_capped_and_jittered():
    rng = random.Random(2)
    first = [reconnect_delay(0, rng=rng) for _ in range(100)]
    later = [reconnect_delay(20, rng=rng) for _ in range(100)]
    assert all(0.25 <= d <= 0.5 for d in first)
    assert all(15.0 <= d <= 30.0 for d in later)
    assert len(set(later)) > 50
    assert all(4.0 <= reconnect_delay(9, cap=8.0, rng=rng) <= 8.0 for _ in range(50))


@pytest.mark.parametrize("value", [-1, MAX_DELAY + 1, float("nan"), float("inf"), True, "5", None])
def test_a_delay_is_seconds_within_the_bound(value):
    assert valid_delay(value) is None


def test_a_note_reads_back_and_a_note_that_is_not_one_is_ignored():
    now = 1_000_000.0
    note = ComebackNote("tls://10.0.0.1:8786", now - 5, 12.5)
    assert ComebackNote.from_json(note.to_json(), now) == note
    told_nothing = ComebackNote("tls://10.0.0.1:8786", now - 5)
    assert ComebackNote.from_json(told_nothing.to_json(), now) == told_nothing
    bad = [
        "not json",
        "[]",
        json.dumps({"scheduler": "tcp://a:1", "at": now}),  # a field missing
        json.dumps({"scheduler": "tcp://a:1", "at": now, "after": 1, "extra": 1}),
        json.dumps({"scheduler": "tcp://a:1", "at": now - NOTE_LIFETIME - 1, "after": 1}),  # another day's
        json.dumps({"scheduler": "tcp://a:1", "at": now + 60, "after": 1}),  # from the future
        json.dumps({"scheduler": "tcp://a:1", "at": now, "after": 10**9}),  # sent away for ever
        json.dumps({"scheduler": 7, "at": now, "after": 1}),
        json.dumps({"scheduler": "tcp://a:1", "at": True, "after": 1}),
    ]
    assert [ComebackNote.from_json(text, now) for text in bad] == [None] * len(bad)


def test_each_named_worker_has_its_own_file_and_a_name_cannot_leave_the_folder(tmp_path):
    a = worker_file(tmp_path, "comeback", "alice's laptop", ".json")
    b = worker_file(tmp_path, "comeback", "alice_s laptop", ".json")  # the same label, another name
    evil = worker_file(tmp_path, "comeback", "../../etc/passwd", ".json")
    assert a != b and a.parent == b.parent == evil.parent == tmp_path / "comeback"
    assert worker_file(tmp_path, "comeback", None, ".json") is None
    assert worker_file(tmp_path, "comeback", 7, ".json") == worker_file(tmp_path, "comeback", "7", ".json")


@pytest.mark.parametrize(
    "fields",
    [
        {},
        {"after": -1},
        {"after": 10**9},  # sent away for ever
        {"after": float("nan")},
        {"after": "5"},
        {"after": True},
        {"after": 5, "also": "run this"},  # an unknown field: the whole message is ignored
        ["after", 5],
    ],
)
def test_a_comeback_message_is_read_as_plain_data_and_anything_else_is_ignored(fields):
    assert read_comeback(fields) is None


def test_a_comeback_message_of_its_shape_is_its_delay():
    assert read_comeback({"after": 1.5}) == 1.5 and read_comeback({"after": 0}) == 0.0


def test_a_worker_keeps_only_a_well_formed_delay_for_the_worker_after_it(tmp_path):
    """The stream handler the preload installs (volunteer/reconnect.py), fed hostile messages:
    the note it leaves for the next worker process holds no delay from them."""
    import asyncio
    from types import SimpleNamespace

    from neuro_dask.volunteer.comeback import COMEBACK_OP
    from neuro_dask.volunteer.reconnect import restart_on_scheduler_loss

    closed = []

    async def close(**kwargs):
        closed.append(kwargs)

    worker = SimpleNamespace(
        nanny="tcp://127.0.0.1:1",
        stream_handlers={"close": close},
        scheduler=SimpleNamespace(address="tcp://10.0.0.1:8786"),
        close=close,
    )
    note = tmp_path / "comeback" / "w.json"
    restart_on_scheduler_loss(worker, note)
    handler = worker.stream_handlers[COMEBACK_OP]
    handler(after=2.5)
    handler(after=10**9, extra=1)  # hostile: replaces the good one with nothing
    asyncio.run(worker.stream_handlers["close"](reason="scheduler-close"))
    assert closed and ComebackNote.from_json(note.read_text(), note.stat().st_mtime).after is None
    handler(after=2.5)
    asyncio.run(worker.stream_handlers["close"](reason="scheduler-close"))
    assert ComebackNote.from_json(note.read_text(), note.stat().st_mtime).after == 2.5
