"""The gateway's limits on what one client may ask (neuro.security.*): prompts, max_tokens and n
above the limits are 400s, and requests past requests-per-minute (per API key, or per client
address with no keys) are 429s with Retry-After, all in OpenAI's error shape.

The gateway runs in this process in front of the bundled adder with its experts in-process (the
limits sit in front of the model, so no cluster is needed); its rate limiter's clock is a fake
one that the tests move, so no test waits for a bucket to refill."""

from __future__ import annotations

import json

import dask
import pytest
from doubles import CountingExecutor
from test_gateway import assert_error_shape, raw

from neuro_dask.gateway.protocol import ProtocolError, check_prompt_limit, rate_limited, resolve_max_tokens

LIMITS = {"neuro.security.max-prompt-tokens": 8, "neuro.security.max-new-tokens": 4,
          "neuro.security.max-batch": 2, "neuro.security.requests-per-minute": 0}
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

@pytest.mark.parametrize("path, body, param, code, setting", [
    ("/v1/completions", completion("12+45+678="), "prompt", "context_length_exceeded", "max-prompt-tokens"),
    ("/v1/completions", completion([1, 4, 5, 13, 4, 5, 13, 4, 14]), "prompt", "context_length_exceeded",
     "max-prompt-tokens"),
    ("/v1/chat/completions", chat("12+45+678="), "messages", "context_length_exceeded", "max-prompt-tokens"),
    ("/v1/completions", completion(max_tokens=5), "max_tokens", "invalid_value", "max-new-tokens"),
    ("/v1/chat/completions", chat(max_tokens=5), "max_tokens", "invalid_value", "max-new-tokens"),
    ("/v1/chat/completions", chat(max_completion_tokens=50), "max_tokens", "invalid_value", "max-new-tokens"),
])
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


@pytest.mark.parametrize("body, param", [
    (completion(n=5), "n"),
    (completion(["1+1=", "2+2=", "3+3="]), "prompt"),
])
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
    assert (err.status, err.type, err.code, err.headers) == (429, "rate_limit_error", "rate_limit_exceeded",
                                                             {"Retry-After": "1"})
    assert rate_limited(19.01, 3).headers == {"Retry-After": "20"}
