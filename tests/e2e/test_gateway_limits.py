"""The gateway's limits on what one client may ask (neuro.security.*): prompts, max_tokens and n
above the limits are 400s, and requests past requests-per-minute (per API key, or per client
address with no keys) are 429s with Retry-After, bodies over neuro.gateway.max-body-bytes are
413s, all in OpenAI's error shape; a huge prompt is refused from its length without stalling the
streams of other clients.

The gateway runs in this process in front of the bundled adder with its experts in-process (the
limits sit in front of the model, so no cluster is needed); its rate limiter's clock is a fake
one that the tests move, so no test waits for a bucket to refill."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import http.client
import json
import socket
import threading
import time

import dask
import pytest
from doubles import CountingExecutor
from polling import PollTimeout, poll_until
from test_gateway import assert_error_shape, raw

from neuro_dask.gateway.protocol import (
    ProtocolError,
    check_prompt_limit,
    rate_limited,
    refuse_body_unread,
    resolve_max_tokens,
)

LIMITS = {
    "neuro.security.max-prompt-tokens": 8,
    "neuro.security.max-new-tokens": 4,
    "neuro.security.max-batch": 2,
    "neuro.security.requests-per-minute": 0,
}
KEYS = {"sk-alice": "alice", "sk-bob": None}


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def model():
    import neuro_dask as nd
    from neuro_dask.demo.addition import ASSET_DIR

    local = nd.load(ASSET_DIR)
    local.executor = CountingExecutor(local.executor)
    return local


@pytest.fixture
def serve(model):
    """serve(config, **gateway options) -> (server, clock): a gateway built under that config."""
    from neuro_dask.gateway import Gateway, GatewayServer

    running = []

    def start(config: dict, **options):
        clock = Clock()
        with dask.config.set(config):
            gateway = Gateway(model, model_id="adder", clock=clock, **options)
        server = GatewayServer(gateway, "127.0.0.1", 0).start()
        running.append((gateway, server))
        return server, clock

    yield start
    for gateway, server in running:
        server.stop()
        gateway.close()


def post(server, path: str, body: dict, key: str | None = None):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return raw(server, "POST", path, json.dumps(body), headers)


def completion(prompt="12+3=", **options):
    return {"model": "adder", "prompt": prompt, "temperature": 0, **options}


def chat(content="12+3=", **options):
    return {"model": "adder", "messages": [{"role": "user", "content": content}], "temperature": 0, **options}


# ---- sizes: 400 before any work -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path, body, param, code, setting",
    [
        ("/v1/completions", completion("12+45+678="), "prompt", "context_length_exceeded", "max-prompt-tokens"),
        (
            "/v1/completions",
            completion([1, 4, 5, 13, 4, 5, 13, 4, 14]),
            "prompt",
            "context_length_exceeded",
            "max-prompt-tokens",
        ),
        ("/v1/chat/completions", chat("12+45+678="), "messages", "context_length_exceeded", "max-prompt-tokens"),
        ("/v1/completions", completion(max_tokens=5), "max_tokens", "invalid_value", "max-new-tokens"),
        ("/v1/chat/completions", chat(max_tokens=5), "max_tokens", "invalid_value", "max-new-tokens"),
        ("/v1/chat/completions", chat(max_completion_tokens=50), "max_tokens", "invalid_value", "max-new-tokens"),
    ],
)
def test_requests_above_the_size_limits_are_400_in_openai_shape(serve, model, path, body, param, code, setting):
    server, _ = serve(LIMITS)
    before = model.executor.calls
    for stream in (False, True):
        status, _, reply = post(server, path, {**body, "stream": stream})
        assert status == 400, reply
        assert_error_shape(reply, code)
        assert reply["error"]["type"] == "invalid_request_error" and reply["error"]["param"] == param
        assert f"neuro.security.{setting}" in reply["error"]["message"]
    assert model.executor.calls == before  # refused before any expert was called


@pytest.mark.parametrize(
    "body, param",
    [
        (completion(n=5), "n"),
        (completion(["1+1=", "2+2=", "3+3="]), "prompt"),
    ],
)
def test_more_than_one_choice_or_prompt_is_400(serve, body, param):
    """The gateway answers one prompt with one choice per request, within any max-batch."""
    server, _ = serve(LIMITS)
    status, _, reply = post(server, "/v1/completions", body)
    assert status == 400 and reply["error"]["param"] == param
    assert_error_shape(reply)


def test_requests_within_the_limits_are_answered(serve):
    server, _ = serve(LIMITS)
    status, _, reply = post(server, "/v1/completions", completion(max_tokens=4))
    assert status == 200 and reply["choices"][0]["text"] == "15"
    status, _, reply = post(server, "/v1/chat/completions", chat("1+2="))  # no max_tokens: capped, not refused
    assert status == 200 and reply["usage"]["completion_tokens"] <= 4


def test_max_tokens_defaults_are_capped_by_the_limit_and_requests_above_it_refused():
    assert resolve_max_tokens(None, 10, 100, None, limit=4) == 4  # chat: the context left, capped
    assert resolve_max_tokens(None, 10, 100, 16, limit=4) == 4  # completions' default of 16, capped
    assert resolve_max_tokens(None, 10, 100, 16, limit=None) == 16
    assert resolve_max_tokens(4, 10, 100, 16, limit=4) == 4
    with pytest.raises(ProtocolError) as err:
        resolve_max_tokens(5, 10, 100, 16, limit=4)
    assert (err.value.status, err.value.param) == (400, "max_tokens")
    check_prompt_limit(8, 8)
    with pytest.raises(ProtocolError) as err:
        check_prompt_limit(9, 8, "messages")
    assert (err.value.status, err.value.param, err.value.code) == (400, "messages", "context_length_exceeded")


# ---- rate: 429 with Retry-After ------------------------------------------------------------------------


def assert_rate_limited(status, headers, reply, wait: int):
    assert status == 429, reply
    assert_error_shape(reply, "rate_limit_exceeded")
    assert reply["error"]["type"] == "rate_limit_error"
    assert "neuro.security.requests-per-minute" in reply["error"]["message"]
    assert headers["Retry-After"] == str(wait)


def test_requests_per_minute_per_client_address_without_keys(serve, model):
    server, clock = serve({**LIMITS, "neuro.security.requests-per-minute": 3})  # burst 1, one per 20 s
    assert post(server, "/v1/completions", completion())[0] == 200
    before = model.executor.calls
    assert_rate_limited(*post(server, "/v1/completions", completion()), wait=20)
    assert_rate_limited(*post(server, "/v1/chat/completions", chat()), wait=20)
    assert model.executor.calls == before
    assert raw(server, "GET", "/v1/models")[0] == 200  # listing models is not a generation
    clock.now += 15
    assert_rate_limited(*post(server, "/v1/completions", completion()), wait=5)
    clock.now += 5
    assert post(server, "/v1/completions", completion())[0] == 200


def test_requests_per_minute_per_api_key(serve):
    server, clock = serve({**LIMITS, "neuro.security.requests-per-minute": 3}, api_keys=KEYS)
    assert post(server, "/v1/completions", completion(), "sk-alice")[0] == 200
    assert_rate_limited(*post(server, "/v1/completions", completion(), "sk-alice"), wait=20)
    assert post(server, "/v1/completions", completion(), "sk-bob")[0] == 200  # bob has his own budget
    for _ in range(3):  # wrong keys are refused before they count against anyone
        assert post(server, "/v1/completions", completion(), "sk-mallory")[0] == 401
    clock.now += 20
    assert post(server, "/v1/completions", completion(), "sk-alice")[0] == 200


def test_the_openai_client_sees_a_rate_limit_error(serve):
    openai = pytest.importorskip("openai")
    server, clock = serve({**LIMITS, "neuro.security.requests-per-minute": 3})
    api = openai.OpenAI(base_url=server.url, api_key="unused", max_retries=0, timeout=30)
    api.completions.create(model="adder", prompt="1+1=", max_tokens=3, temperature=0)
    with pytest.raises(openai.RateLimitError) as err:
        api.completions.create(model="adder", prompt="1+1=", max_tokens=3, temperature=0)
    assert err.value.response.headers["retry-after"] == "20"
    clock.now += 20
    with pytest.raises(openai.BadRequestError, match="max-new-tokens"):
        api.chat.completions.create(model="adder", messages=[{"role": "user", "content": "1+1="}], max_tokens=9)


def test_unlimited_when_requests_per_minute_is_0(serve):
    server, _ = serve(LIMITS)
    assert all(post(server, "/v1/completions", completion(max_tokens=1))[0] == 200 for _ in range(12))


def test_rate_limited_is_a_429_with_whole_seconds():
    err = rate_limited(0.2, 600)
    assert (err.status, err.type, err.code, err.headers) == (
        429,
        "rate_limit_error",
        "rate_limit_exceeded",
        {"Retry-After": "1"},
    )
    assert rate_limited(19.01, 3).headers == {"Retry-After": "20"}


# ---- long prompts and large bodies: refused cheaply, in OpenAI's shape, without stalling anyone --------

STREAMS = 16
STALL = 0.2  # seconds: the longest pause a stream (or /health) may see while a huge prompt is refused
ATTEMPTS = 3


@pytest.fixture
def one_torch_thread():
    """One intra-op thread while 16 requests generate at once: two threads per request spin-wait
    for each other on a busy 2-core machine (stalls of 100s of ms, gateway or not)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def request_bytes(path: str, body: str) -> bytes:
    data = body.encode()
    return (
        f"POST {path} HTTP/1.1\r\nHost: gateway\r\nContent-Type: application/json\r\n"
        f"Connection: close\r\nContent-Length: {len(data)}\r\n\r\n"
    ).encode() + data


async def stream_until(port: int, request: bytes, stop: threading.Event, responses: list) -> None:
    """Streaming completions one after another until `stop`: for each, the time it was sent, then
    the time each server-sent event arrived."""
    while not stop.is_set():
        times = [time.perf_counter()]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(request)
        status = await reader.readline()
        assert b" 200 " in status, status + await reader.read()
        while line := await reader.readline():
            if line.startswith(b"data:"):
                times.append(time.perf_counter())
        writer.close()
        responses.append(times)


def run_streams(port: int, body: str, responses: list[list], stop: threading.Event, errors: list) -> None:
    """One asyncio thread for all the streams: 16 client threads would fight the gateway for the GIL."""

    async def main():
        request = request_bytes("/v1/completions", body)
        results = await asyncio.gather(
            *(stream_until(port, request, stop, r) for r in responses), return_exceptions=True
        )
        errors.extend(r for r in results if isinstance(r, BaseException))

    asyncio.run(main())


def timed(fn, *args):
    started = time.perf_counter()
    out = fn(*args)
    return out, started, time.perf_counter()


def poll_health(server, until: concurrent.futures.Future) -> list[float]:
    """GET /health again and again until `until` is done (once at least): each one's time."""
    took = []
    while not took or not until.done():
        (status, _, _), started, ended = timed(raw, server, "GET", "/health")
        assert status == 200
        took.append(ended - started)
    return took


def longest_silence(responses: list[list[list[float]]], start: float, end: float) -> float:
    """The longest time within [start, end] that a stream went without news: between sending a
    request and its first event, or between two events."""
    return max(
        (
            min(b, end) - max(a, start)
            for stream in responses
            for times in stream
            for a, b in zip(times, times[1:])
            if a < end and b > start
        ),
        default=end - start,
    )


def test_a_huge_prompt_is_refused_while_16_streams_keep_flowing(serve, one_torch_thread):
    """3 MB of prompt against max-prompt-tokens 4096 is refused from its length (the adder's tokens
    cover at most 5 characters, so it has at least 600,000 tokens) in OpenAI's shape: never
    tokenized, its body parsed off the event loop, so no stream falls silent and /health answers
    while it is refused.

    Silence counts only within a refusal (the streams' own pace on a busy machine is not the
    gateway's doing). The refusal is done three times and the median is judged: a gateway that
    blocks its loop (tokenizing 3 MB holds the GIL for seconds) is silent through all three, while
    a machine busy with other work may starve this process once."""
    server, _ = serve({**LIMITS, "neuro.security.max-prompt-tokens": 4096, "neuro.security.max-new-tokens": 16})
    huge = json.dumps(completion("1" * 3_000_000))
    small = json.dumps(completion("99999+99999=", max_tokens=8, stream=True))  # "199998": 8 events
    stop, errors = threading.Event(), []
    responses: list[list] = [[] for _ in range(STREAMS)]
    client = threading.Thread(target=run_streams, args=(server.port, small, responses, stop, errors))
    client.start()
    refusals = []
    try:
        # every stream has run twice: warm, and all 16 running at once (the assertions below judge a timeout)
        with contextlib.suppress(PollTimeout):
            poll_until(lambda: errors or min(map(len, responses)) >= 2, 60, "every stream to run twice")
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            for _ in range(ATTEMPTS):
                refusal = pool.submit(timed, raw, server, "POST", "/v1/completions", huge)
                health = pool.submit(poll_health, server, refusal)
                refusals.append((*refusal.result(), health.result()))
                answered = refusals[-1][2]
                with contextlib.suppress(PollTimeout):  # the assertions below judge a timeout
                    poll_until(
                        lambda answered=answered: (
                            errors
                            or all(any(t > answered for times in stream for t in times[1:]) for stream in responses)
                        ),
                        60,
                        "every stream to go on after the refusal",
                    )
    finally:
        stop.set()
        client.join(60)
    assert not errors, errors
    judged = [
        (longest_silence(responses, sent, answered), max(health), answered - sent)
        for _, sent, answered, health in refusals
    ]
    print(
        "\n"
        + "\n".join(
            f"refused in {took * 1000:.0f} ms; longest silence of a stream meanwhile "
            f"{silence * 1000:.0f} ms; slowest /health {health * 1000:.0f} ms"
            for silence, health, took in judged
        )
    )
    for (status, _, reply), _, _, _ in refusals:
        assert status == 400, reply
        assert_error_shape(reply, "context_length_exceeded")
        assert reply["error"]["param"] == "prompt"
        assert reply["error"]["message"].startswith(
            "This prompt has at least 600000 tokens; this gateway accepts "
            "at most 4096 prompt tokens (neuro.security.max-prompt-tokens)"
        )
    assert all(len([t for times in stream for t in times[1:] if t > refusals[-1][2]]) for stream in responses)
    median = ATTEMPTS // 2
    assert sorted(silence for silence, _, _ in judged)[median] < STALL
    assert sorted(health for _, health, _ in judged)[median] < STALL


def test_a_body_over_the_limit_is_a_413_in_openai_shape(serve, model):
    """10 MB: tornado would answer an empty 400 before any handler ran; the gateway reads and drops
    it (so that the client, still sending, reads the answer) and answers 413 itself."""
    server, _ = serve(LIMITS)
    before = model.executor.calls
    for path, body in (
        ("/v1/completions", completion("1" * 10_000_000)),
        ("/v1/chat/completions", chat("1" * 10_000_000)),
    ):
        status, headers, reply = post(server, path, body)
        assert status == 413, reply
        assert headers["Content-Type"].startswith("application/json")
        assert_error_shape(reply, "request_too_large")
        assert reply["error"]["type"] == "invalid_request_error"
        assert reply["error"]["message"].startswith(
            f"This request's body is {len(json.dumps(body))} bytes; this gateway accepts request bodies of "
            "at most 4194304 bytes (4 MiB, neuro.gateway.max-body-bytes)"
        )
    assert model.executor.calls == before
    assert post(server, "/v1/completions", completion())[0] == 200  # and the gateway goes on


def test_the_body_limit_is_configurable_and_refused_unread_when_announced_far_above_it(serve):
    with dask.config.set({"neuro.gateway.max-body-bytes": "1 KiB"}):
        server, _ = serve(LIMITS)
    status, _, reply = post(server, "/v1/completions", completion("1" * 1100))
    assert status == 413 and "at most 1024 bytes (1 KiB, neuro.gateway.max-body-bytes)" in reply["error"]["message"]
    assert post(server, "/v1/completions", completion("1" * 5))[0] == 200
    # A client that waits for "100 Continue", or one announcing far more than the limit, is answered
    # at once, before it sends a byte of the body.
    for extra in ("Expect: 100-continue\r\n", ""):
        with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
            sock.sendall(
                f"POST /v1/completions HTTP/1.1\r\nHost: gateway\r\nContent-Length: 10000000\r\n{extra}\r\n".encode()
            )
            answer = b"".join(iter(lambda: sock.recv(65536), b""))
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 413 "), answer
        assert_error_shape(json.loads(body), "request_too_large")


def test_a_chunked_body_over_the_limit_is_a_413(serve):
    with dask.config.set({"neuro.gateway.max-body-bytes": "64 KiB"}):
        server, _ = serve(LIMITS)
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    try:
        conn.request(
            "POST",
            "/v1/completions",
            body=iter([b"x" * 50_000] * 4),
            encode_chunked=True,
            headers={"Content-Type": "application/json", "Transfer-Encoding": "chunked"},
        )
        resp = conn.getresponse()
        assert resp.status == 413
        assert_error_shape(json.loads(resp.read()), "request_too_large")
    finally:
        conn.close()


@pytest.mark.parametrize(
    "path, body, param",
    [
        ("/v1/completions", completion("1" * 9), "prompt"),
        ("/v1/completions", completion([1] + [4] * 9), "prompt"),
        ("/v1/chat/completions", chat("1" * 9), "messages"),
    ],
)
def test_prompt_limits_are_stated_in_their_own_terms(serve, path, body, param):
    """What the prompt has, what the gateway accepts and the setting: never a value to raise the
    setting to (the prompt's own length is no sensible limit)."""
    server, _ = serve(LIMITS)
    status, _, reply = post(server, path, body)
    assert status == 400 and reply["error"]["param"] == param
    assert reply["error"]["message"] == (
        "This prompt has 10 tokens; this gateway accepts at most 8 prompt tokens "
        "(neuro.security.max-prompt-tokens). Please shorten the prompt."
    )
    status, _, reply = post(
        server, path, completion(max_tokens=3_000_000) if param == "prompt" else chat(max_completion_tokens=3_000_000)
    )
    assert status == 400 and reply["error"]["message"] == (
        "max_tokens is 3000000; this gateway generates at most 4 tokens per request "
        "(neuro.security.max-new-tokens). Please ask for fewer tokens."
    )


def test_a_prompt_the_length_bound_cannot_judge_is_tokenized(serve):
    """Line breaks may tokenize as one token per run (the adder's "." does not match them): a long
    run of them is no proof of a long prompt, so it is tokenized, and fits."""
    server, _ = serve({**LIMITS, "neuro.security.max-prompt-tokens": 4096})
    status, _, reply = post(server, "/v1/completions", completion("\n" * 100_000 + "1+2=", max_tokens=3))
    assert status == 200, reply
    assert reply["usage"]["prompt_tokens"] == 1 + 1 + 4  # BOS, the run of line breaks, "1+2="


def test_a_body_is_refused_unread_only_when_the_client_waits_or_it_is_far_too_large():
    assert not refuse_body_unread(None, False, 100, 400)  # chunked: counted as it comes
    assert not refuse_body_unread(100, True, 100, 400)
    assert not refuse_body_unread(300, False, 100, 400)  # read and dropped, then answered
    assert refuse_body_unread(300, True, 100, 400)  # the client sends nothing before our answer
    assert refuse_body_unread(401, False, 100, 400)
