"""Limits on what one peer may ask (neuro_dask/security/limits.py): the token bucket per key with an
injected clock, the request-size validators, and the model API refusing a call above the limits
before any expert is called."""

from __future__ import annotations

import pickle

import dask
import pytest
from doubles import CountingExecutor

from neuro_dask.errors import InputError, LimitExceededError, NeuroDaskError
from neuro_dask.security.limits import (
    RateLimiter,
    RequestLimits,
    check_batch,
    check_new_tokens,
    check_prompt_tokens,
    check_request_limits,
    default_burst,
)


class Clock:
    def __init__(self, now: float = 1000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


# ---- the rate limiter --------------------------------------------------------------------------------


@pytest.mark.parametrize("rpm, burst", [(0, 1), (1, 1), (5, 1), (6, 1), (12, 2), (60, 10), (600, 100), (601, 100)])
def test_the_default_burst_is_ten_seconds_of_requests_and_at_least_one(rpm, burst):
    assert default_burst(rpm) == burst
    if rpm:
        assert RateLimiter(rpm, Clock()).burst == burst


# (requests per minute, burst, [(seconds since start, expected wait)]): one key, in time order.
SCENARIOS = {
    "a burst then a refusal": (60, 3, [(0, 0), (0, 0), (0, 0), (0, 1.0), (0, 1.0)]),
    "refills at the rate": (60, 3, [(0, 0), (0, 0), (0, 0), (0.5, 0.5), (1.0, 0), (1.0, 1.0)]),
    "never holds more than the burst": (60, 2, [(0, 0), (100, 0), (100, 0), (100, 1.0)]),
    "refusals spend nothing": (6, 1, [(0, 0), (5, 5.0), (9, 1.0), (10, 0), (10, 10.0)]),
    "a slow rate": (3, 1, [(0, 0), (0, 20.0), (19, 1.0), (20, 0)]),
    "steady at the rate": (120, 1, [(0, 0), (0.5, 0), (1.0, 0), (1.25, 0.25), (1.5, 0)]),
}


@pytest.mark.parametrize("name", SCENARIOS)
def test_a_token_bucket_per_key(name):
    rpm, burst, steps = SCENARIOS[name]
    clock = Clock(500.0)
    limiter = RateLimiter(rpm, clock, burst=burst)
    for at, wait in steps:
        clock.now = 500.0 + at
        assert limiter.take("alice") == pytest.approx(wait), (name, at)


def test_allow_is_take_without_the_wait_and_keys_are_independent():
    clock = Clock()
    limiter = RateLimiter(60, clock, burst=1)
    assert [limiter.allow("a"), limiter.allow("a"), limiter.allow("b"), limiter.allow(("ip", "10.0.0.1"))] == [
        True,
        False,
        True,
        True,
    ]
    clock.now += 1.0
    assert limiter.allow("a")


def test_zero_requests_per_minute_is_unlimited_and_remembers_nobody():
    limiter = RateLimiter(0, Clock())
    assert limiter.unlimited
    assert all(limiter.take(f"k{i % 3}") == 0.0 for i in range(1000))
    assert len(limiter) == 0


def test_idle_keys_are_forgotten_once_their_bucket_is_full_again():
    clock = Clock()
    limiter = RateLimiter(60, clock, burst=5)  # 5 s from empty to full
    for i in range(50):
        limiter.take(f"client-{i}")
    assert len(limiter) == 50
    clock.now += 4.9
    limiter.take("late")
    assert len(limiter) == 51  # not yet full: still remembered
    clock.now += 0.2
    limiter.take("later")
    assert len(limiter) == 2  # "late" and "later"
    # a forgotten key starts from a full bucket, as it would have been
    assert [limiter.allow("client-0") for _ in range(6)] == [True] * 5 + [False]


def test_at_most_max_keys_are_kept_under_a_flood_of_keys():
    clock = Clock()
    limiter = RateLimiter(60, clock, burst=2, max_keys=100)
    for i in range(10_000):
        limiter.take(i)
    assert len(limiter) == 100
    assert limiter.take(9_999) == 0  # the most recent keys are the ones kept
    assert limiter.take(9_999) == pytest.approx(1.0)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"requests_per_minute": -1}, "requests_per_minute"),
        ({"requests_per_minute": 60, "burst": 0}, "burst"),
        ({"requests_per_minute": 60, "max_keys": 0}, "max_keys"),
    ],
)
def test_bad_limiter_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RateLimiter(clock=Clock(), **kwargs)


# ---- request sizes -------------------------------------------------------------------------------------

LIMITS = RequestLimits(max_prompt_tokens=8, max_new_tokens=16, max_batch=3)


@pytest.mark.parametrize(
    "lengths, new, batch, refused",
    [
        ([8, 1, 5], 16, None, None),
        ([], None, None, None),
        ([9], 4, None, ("max-prompt-tokens", 8, 9)),
        ([1, 2, 30], 4, None, ("max-prompt-tokens", 8, 30)),
        ([1], 17, None, ("max-new-tokens", 16, 17)),
        ([1, 1, 1, 1], 4, None, ("max-batch", 3, 4)),
        ([1], 4, 5, ("max-batch", 3, 5)),  # an explicit batch wins over the number of lengths
        ([100] * 5, 100, None, ("max-batch", 3, 5)),  # the batch is checked first, then new tokens
        ([100], 100, None, ("max-new-tokens", 16, 100)),
    ],
)
def test_check_request_limits(lengths, new, batch, refused):
    if refused is None:
        assert check_request_limits(LIMITS, lengths, new, batch) is None
        return
    with pytest.raises(LimitExceededError) as err:
        check_request_limits(LIMITS, lengths, new, batch)
    assert (err.value.field, err.value.limit, err.value.got) == refused
    assert f"neuro.security.{refused[0]}" in str(err.value)
    # the limit in its own terms: where it is set, never the request's own size as a new value
    assert f"DASK_NEURO__SECURITY__{refused[0].replace('-', '_').upper()}" in str(err.value)
    assert f"={refused[2]}" not in str(err.value)


@pytest.mark.parametrize(
    "check, args, words",
    [
        (check_prompt_tokens, ([3, 12], 10), ["prompt 1's length in tokens is 12", "shorten the prompt"]),
        (check_prompt_tokens, ([12], 10, 7), ["prompt 7's"]),
        (check_new_tokens, (50, 10), ["max_new_tokens is 50", "ask for fewer tokens"]),
        (check_batch, (5, 4), ["the number of prompts in one call is 5", "send fewer prompts"]),
        (
            check_batch,
            (5, 4, "pass a smaller batch_size"),
            ["limit of 4 (neuro.security.max-batch): pass a smaller batch_size."],
        ),
    ],
)
def test_messages_say_what_was_too_big_and_how_to_fix_it(check, args, words):
    with pytest.raises(LimitExceededError) as err:
        check(*args)
    for word in words:
        assert word in str(err.value)


def test_the_error_is_an_input_error_and_survives_pickling():
    err = LimitExceededError("max-batch", 3, 4)
    assert isinstance(err, InputError) and isinstance(err, NeuroDaskError)
    back = pickle.loads(pickle.dumps(err))
    assert (type(back), back.field, back.limit, back.got, str(back)) == (
        LimitExceededError,
        "max-batch",
        3,
        4,
        str(err),
    )


def test_limits_from_settings():
    from neuro_dask.settings import SecuritySettings

    settings = SecuritySettings.load(max_prompt_tokens=7, max_new_tokens=9, max_batch=2)
    assert RequestLimits.from_settings(settings) == RequestLimits(7, 9, 2)


# ---- the model API -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def adder():
    import neuro_dask as nd
    from neuro_dask.demo.addition import ASSET_DIR

    return nd.load(ASSET_DIR)


@pytest.fixture
def model(adder, monkeypatch):
    monkeypatch.setattr(adder, "executor", CountingExecutor(adder.executor))
    return adder


SMALL = {"neuro.security.max-prompt-tokens": 6, "neuro.security.max-new-tokens": 4, "neuro.security.max-batch": 2}
SHORT, LONG = [1, 4, 5, 13, 6, 14], [1, 4, 5, 13, 4, 5, 14]  # "12+3=", "12+45=": 6 and 7 tokens


@pytest.mark.parametrize(
    "call, field",
    [
        (lambda m: m.generate([LONG], max_new_tokens=2), "max-prompt-tokens"),
        (lambda m: m.generate([SHORT], max_new_tokens=5), "max-new-tokens"),
        (lambda m: m.generate([SHORT] * 3, max_new_tokens=2), "max-batch"),
        (lambda m: m.generate_text(["12+45="], max_new_tokens=2), "max-prompt-tokens"),
        (lambda m: m.stream([SHORT], max_new_tokens=5), "max-new-tokens"),
        (lambda m: m.stream("12+45=", max_new_tokens=2), "max-prompt-tokens"),
        (lambda m: m.stream([SHORT] * 3, max_new_tokens=1), "max-batch"),
        (lambda m: m.score([SHORT, LONG]), "max-prompt-tokens"),
        (lambda m: m.score(["1+1=", "2+2=", "3+3="]), "max-batch"),
        (lambda m: m.forward([LONG]), "max-prompt-tokens"),
        (lambda m: m.map(["1+1="], batch_size=2, max_new_tokens=5, progress=False), "max-new-tokens"),
        (lambda m: m.map(["1+1="] * 5, batch_size=3, progress=False), "max-batch"),
    ],
)
def test_calls_above_the_limits_are_refused_before_any_expert_call(model, call, field):
    with dask.config.set(SMALL), pytest.raises(LimitExceededError) as err:
        call(model)
    assert err.value.field == field
    assert model.executor.calls == 0


def test_calls_within_the_limits_run(model):
    with dask.config.set(SMALL):
        assert model.generate_text(["12+3="], max_new_tokens=4) == ["15"]
        assert len(list(model.stream([SHORT, SHORT], max_new_tokens=2))) == 2
        assert len(model.score([SHORT, SHORT])) == 2
    assert model.executor.calls > 0


def test_map_applies_max_batch_per_batch_and_fails_only_the_long_prompts(model):
    from neuro_dask.model.mapping import MapFailure

    prompts = ["1+1=", "12+45=", "2+2=", "3+3=", "4+4="]
    with dask.config.set(SMALL):
        out = model.map(prompts, batch_size=2, max_new_tokens=3, progress=False)
    assert [out[i] for i in (0, 2, 3, 4)] == ["2", "4", "6", "8"]
    assert isinstance(out[1], MapFailure) and "neuro.security.max-prompt-tokens" in out[1].error
    assert "prompt 1's" in out[1].error
    assert [s["prompts"] for s in model.last_map_stats] == [2, 2]  # more prompts than max-batch, in batches


def test_concurrent_calls_batched_together_may_exceed_max_batch(model):
    """The limit is per call: the continuous batcher's merged batch is not a call."""
    with dask.config.set(SMALL):
        rows = model.batcher.generate((False, 1.0, None, None, None, (), None), [SHORT] * 5, 2)
    assert len(rows) == 5 and model.executor.calls > 0


def test_the_limits_are_read_at_each_call(model):
    with dask.config.set({"neuro.security.max-batch": 1}), pytest.raises(LimitExceededError):
        model.generate([SHORT, SHORT], max_new_tokens=1)
    assert model.generate([SHORT, SHORT], max_new_tokens=1).shape == (2, 7)
