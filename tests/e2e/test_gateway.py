"""The OpenAI-compatible gateway end to end: the official `openai` client against a gateway in this
process, whose experts run on an in-process Dask cluster with the bundled addition model."""

from __future__ import annotations

import concurrent.futures
import http.client
import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
from polling import poll_until

openai = pytest.importorskip("openai")

from neuro_dask.demo.addition import ASSET_DIR, sample_problems  # noqa: E402

PROBLEMS = sample_problems(48, random.Random(7), held_out=True)
KEYS = {"sk-alice": "alice", "sk-bob": None}


@pytest.fixture(scope="module")
def cluster_model():
    from distributed import Client

    import neuro_dask as nd
    from neuro_dask.client.cluster import local_cluster

    cluster = local_cluster(2, processes=False, worker_args=["--neuro-no-benchmark"], dashboard_address=None)
    client = Client(cluster)
    client.wait_for_workers(2, timeout=60)
    model = nd.load(ASSET_DIR, client=client)
    yield cluster, model
    model.close()
    client.close()
    cluster.close()


@pytest.fixture(scope="module")
def model(cluster_model):
    return cluster_model[1]


def start(model, **options):
    from neuro_dask.gateway import Gateway, GatewayServer

    gateway = Gateway(model, **options)
    return gateway, GatewayServer(gateway, "127.0.0.1", 0).start()


@pytest.fixture(scope="module")
def server(model):
    gateway, server = start(model)
    yield server
    server.stop()
    gateway.close()


@pytest.fixture(scope="module")
def keyed(model):
    gateway, server = start(model, api_keys=KEYS)
    yield server
    server.stop()
    gateway.close()


@pytest.fixture(scope="module")
def api(server):
    return openai.OpenAI(base_url=server.url, api_key="unused", max_retries=0, timeout=60)


def raw(server, method: str, path: str, body: bytes | str | None = None, headers: dict | None = None):
    """(status, headers, parsed JSON or text) of one plain HTTP request."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    try:
        conn.request(method, path, body=body, headers={"Content-Type": "application/json", **(headers or {})})
        resp = conn.getresponse()
        data = resp.read().decode()
        try:
            data = json.loads(data)
        except ValueError:
            pass
        return resp.status, resp.headers, data
    finally:
        conn.close()


def assert_error_shape(body, code=None):
    assert set(body) == {"error"}, body
    assert set(body["error"]) == {"message", "type", "param", "code"}, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    if code is not None:
        assert body["error"]["code"] == code, body


def answer(api, problem, **options):
    options = {"max_tokens": 5, "temperature": 0, **options}
    return api.completions.create(model="adder", prompt=problem.prompt, **options)


# ---- answers ------------------------------------------------------------------------------------------


def test_models_lists_the_bundled_model(api):
    assert [m.id for m in api.models.list().data] == ["adder"]
    assert api.models.retrieve("adder").id == "adder"


def test_completions_answer_addition_problems(api, model):
    answer(api, PROBLEMS[0])  # warm
    started = time.perf_counter()
    first = answer(api, PROBLEMS[0])
    latency = time.perf_counter() - started
    print(f"\none completion ({PROBLEMS[0].prompt}{first.choices[0].text}): {latency * 1000:.0f} ms")
    correct = 0
    for problem in PROBLEMS[:8]:
        out = answer(api, problem)
        choice = out.choices[0]
        correct += choice.text.strip() == problem.answer
        assert out.object == "text_completion" and out.model == "adder" and out.id.startswith("cmpl-")
        assert choice.finish_reason == "stop" and choice.index == 0
        prompt_tokens = len(model.tokenizer.encode(problem.prompt))
        assert out.usage.prompt_tokens == prompt_tokens == len(problem.prompt) + 1  # BOS + one per character
        assert out.usage.completion_tokens == len(choice.text) + 1  # the digits and the EOS
        assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens
    assert correct >= 7, "the demo scores >= 95% on held-out problems"


def test_chat_completions_answer_addition_problems(api):
    correct = 0
    for problem in PROBLEMS[8:16]:
        out = api.chat.completions.create(
            model="adder",
            temperature=0,
            messages=[{"role": "system", "content": "You add numbers."}, {"role": "user", "content": problem.prompt}],
        )
        message = out.choices[0].message
        assert out.object == "chat.completion" and message.role == "assistant"
        assert out.choices[0].finish_reason == "stop"
        assert out.usage.prompt_tokens == len(problem.prompt) + 1  # the template asks the last user problem
        correct += message.content.strip() == problem.answer
    assert correct >= 7


def test_streamed_chunks_reassemble_to_the_same_text(api):
    for problem in PROBLEMS[16:20]:
        whole = answer(api, problem).choices[0].text
        chunks = list(
            api.completions.create(
                model="adder",
                prompt=problem.prompt,
                max_tokens=5,
                temperature=0,
                stream=True,
                stream_options={"include_usage": True},
            )
        )
        assert all(c.object == "text_completion" for c in chunks)
        assert len({c.id for c in chunks}) == 1
        assert "".join(c.choices[0].text for c in chunks if c.choices) == whole
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
        assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(whole) + 1

        chat_whole = (
            api.chat.completions.create(
                model="adder", temperature=0, messages=[{"role": "user", "content": problem.prompt}]
            )
            .choices[0]
            .message.content
        )
        chat_chunks = list(
            api.chat.completions.create(
                model="adder", temperature=0, stream=True, messages=[{"role": "user", "content": problem.prompt}]
            )
        )
        assert chat_chunks[0].choices[0].delta.role == "assistant"
        assert all(c.object == "chat.completion.chunk" for c in chat_chunks)
        assert "".join(c.choices[0].delta.content or "" for c in chat_chunks) == chat_whole == whole
        assert chat_chunks[-1].choices[0].finish_reason == "stop"


def test_32_concurrent_streams_all_finish_correctly(api):
    problems = PROBLEMS[16:48]

    def one(i_problem):
        i, problem = i_problem
        if i % 2:
            stream = api.chat.completions.create(
                model="adder", temperature=0, stream=True, messages=[{"role": "user", "content": problem.prompt}]
            )
            return "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        stream = api.completions.create(model="adder", prompt=problem.prompt, max_tokens=5, temperature=0, stream=True)
        return "".join(c.choices[0].text for c in stream if c.choices)

    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        texts = list(pool.map(one, enumerate(problems)))
    wall = time.perf_counter() - started
    print(f"\n32 concurrent streams: {wall:.2f} s wall")
    correct = sum(t.strip() == p.answer for t, p in zip(texts, problems))
    assert correct >= 30, list(zip(texts, (p.answer for p in problems)))


def test_stop_strings_cut_the_text(api):
    problem = next(p for p in PROBLEMS if len(p.answer) >= 3)
    cut = problem.answer[1]
    out = answer(api, problem, stop=[cut, "never"])
    assert out.choices[0].text == problem.answer[: problem.answer.index(cut)]
    assert out.choices[0].finish_reason == "stop"
    streamed = list(
        api.completions.create(model="adder", prompt=problem.prompt, max_tokens=5, temperature=0, stream=True, stop=cut)
    )
    assert "".join(c.choices[0].text for c in streamed) == out.choices[0].text


def test_max_tokens_ends_with_length(api):
    problem = next(p for p in PROBLEMS if len(p.answer) >= 3)
    out = answer(api, problem, max_tokens=1)
    assert out.choices[0].finish_reason == "length" and out.choices[0].text == problem.answer[0]
    assert out.usage.completion_tokens == 1


def test_sampling_with_a_seed(api):
    out = api.completions.create(model="adder", prompt="12+30=", max_tokens=5, temperature=0.7, top_p=0.9, seed=3)
    assert out.choices[0].finish_reason in ("stop", "length") and out.usage.completion_tokens >= 1


def test_token_id_prompts(api, model):
    ids = model.tokenizer.encode("12+30=")
    out = api.completions.create(model="adder", prompt=ids, max_tokens=5, temperature=0)
    assert out.choices[0].text == "42" and out.usage.prompt_tokens == len(ids)


# ---- errors -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "options, error, param, code",
    [
        ({"model": "gpt-4"}, "NotFoundError", "model", "model_not_found"),
        ({"n": 2}, "BadRequestError", "n", None),
        ({"max_tokens": -1}, "BadRequestError", "max_tokens", None),
        ({"max_tokens": 2.5}, "BadRequestError", "max_tokens", None),
        ({"temperature": 3}, "BadRequestError", "temperature", None),
        ({"temperature": -1}, "BadRequestError", "temperature", None),
        ({"top_p": 1.5}, "BadRequestError", "top_p", None),
        ({"max_tokens": 60}, "BadRequestError", "max_tokens", "context_length_exceeded"),
        ({"prompt": "1+" * 40}, "BadRequestError", "max_tokens", "context_length_exceeded"),
        ({"prompt": [3, 99]}, "BadRequestError", "prompt", None),
        ({"stop": ["a", "b", "c", "d", "e"]}, "BadRequestError", "stop", None),
    ],
)
@pytest.mark.parametrize("stream", [False, True])
def test_bad_completion_requests_are_4xx_in_openai_shape(api, options, error, param, code, stream):
    body = {"model": "adder", "prompt": "12+30=", "max_tokens": 5, **options}
    model = body.pop("model")
    with pytest.raises(getattr(openai, error)) as info:
        api.completions.create(model=model, stream=stream, **body)
    assert_error_shape(info.value.response.json(), code)  # the client's .body is the inner "error"
    assert info.value.body["param"] == param


@pytest.mark.parametrize(
    "options, param",
    [
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "wizard", "content": "1+1="}]}, "messages[0].role"),
        ({"max_completion_tokens": 0}, "max_completion_tokens"),
        ({"n": 3}, "n"),
    ],
)
def test_bad_chat_requests_are_400(api, options, param):
    body = {"messages": [{"role": "user", "content": "1+1="}], **options}
    with pytest.raises(openai.BadRequestError) as info:
        api.chat.completions.create(model="adder", **body)
    assert info.value.status_code == 400 and info.value.body["param"] == param


@pytest.mark.parametrize("body", [b"{not json", b"", b"[1, 2, 3]", b"\xff\xfe\x00"])
def test_malformed_json_is_400(server, body):
    status, headers, data = raw(server, "POST", "/v1/completions", body)
    assert status == 400 and headers["Content-Type"].startswith("application/json")
    assert_error_shape(data, "invalid_json")


def test_unknown_routes_and_wrong_methods(server):
    status, _, data = raw(server, "GET", "/v1/nothing")
    assert status == 404
    assert_error_shape(data, "unknown_url")
    status, _, data = raw(server, "POST", "/v2/completions", b"{}")
    assert status == 404
    assert_error_shape(data)
    for method, path in [
        ("GET", "/v1/completions"),
        ("GET", "/v1/chat/completions"),
        ("DELETE", "/v1/models"),
        ("PUT", "/v1/chat/completions"),
    ]:
        status, _, data = raw(server, method, path)
        assert status == 405, (method, path)
        assert_error_shape(data, "method_not_allowed")
    status, _, data = raw(server, "GET", "/v1/models/gpt-4")
    assert status == 404
    assert_error_shape(data, "model_not_found")
    assert raw(server, "GET", "/health")[0] == 200


def test_api_keys(keyed):
    request = json.dumps({"model": "adder", "prompt": "12+30=", "max_tokens": 5, "temperature": 0})
    for headers in [
        {},
        {"Authorization": "Bearer sk-mallory"},
        {"Authorization": "Basic sk-alice"},
        {"Authorization": "Bearer "},
    ]:
        status, response_headers, data = raw(keyed, "POST", "/v1/completions", request, headers)
        assert status == 401, headers
        assert_error_shape(data, "invalid_api_key")
        assert response_headers.get("WWW-Authenticate") == "Bearer"
    assert raw(keyed, "GET", "/v1/models")[0] == 401
    status, _, data = raw(keyed, "POST", "/v1/completions", request, {"Authorization": "Bearer sk-alice"})
    assert status == 200 and data["choices"][0]["text"] == "42"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=keyed.url, api_key="sk-wrong", max_retries=0).models.list()
    good = openai.OpenAI(base_url=keyed.url, api_key="sk-bob", max_retries=0)
    assert (
        good.chat.completions.create(model="adder", temperature=0, messages=[{"role": "user", "content": "999+1="}])
        .choices[0]
        .message.content
        == "1000"
    )


def test_an_internal_error_is_a_logged_500_in_shape(server, api, monkeypatch, caplog):
    def broken(*args, **kwargs):
        raise RuntimeError("boom at /secret/path")

    monkeypatch.setattr(server.gateway, "run", broken)
    for stream in (False, True):
        with pytest.raises(openai.InternalServerError) as info:
            api.completions.create(model="adder", prompt="1+1=", max_tokens=3, stream=stream)
        assert info.value.status_code == 500
        assert "secret" not in info.value.message and info.value.body["type"] == "server_error"
    assert "boom at /secret/path" in caplog.text  # the details are in the server's log


class SlowModel:
    """Stands in for the model: one digit at once, the next ones only when `release()` says so
    (a model still computing while the client does something), then as fast as asked; never an
    EOS; says when it was closed."""

    def __init__(self, model, release=lambda: True):
        self.model = model
        self.release = release
        self.produced = 0
        self.closed = False

    def stream(self, ids, max_new_tokens, **options):
        import torch

        try:
            for i in range(max_new_tokens):
                deadline = time.monotonic() + 10
                while i == 1 and not self.release() and time.monotonic() < deadline:
                    time.sleep(0.01)  # poll
                self.produced += 1
                yield torch.tensor([5])  # "2"
        finally:
            self.closed = True


def test_a_client_that_goes_away_mid_stream_stops_its_generation(server, api, monkeypatch):
    # The second token comes only once the server has noticed the client is gone.
    slow = SlowModel(server.gateway.model, release=lambda: server.gateway.cancelled() > 0)
    monkeypatch.setattr(server.gateway, "model", slow)
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    conn.request(
        "POST",
        "/v1/completions",
        json.dumps({"model": "adder", "prompt": "1+1=", "max_tokens": 55, "stream": True}),
        {"Content-Type": "application/json"},
    )
    resp = conn.getresponse()
    assert resp.status == 200 and resp.getheader("Content-Type") == "text/event-stream"
    assert resp.read(6) == b"data: "
    conn.close()  # mid-stream
    poll_until(
        lambda: slow.closed and not server.gateway.in_flight,
        30,
        "the gateway to end the abandoned generation",
        interval=0.02,
    )
    assert slow.closed and slow.produced < 45, slow.produced
    assert not server.gateway.in_flight
    monkeypatch.undo()
    assert answer(api, PROBLEMS[0]).choices[0].text.strip() == PROBLEMS[0].answer  # still serving


def test_an_error_mid_stream_is_an_error_event(server, api, monkeypatch):
    slow = SlowModel(server.gateway.model)
    healthy = slow.stream

    def failing(ids, max_new_tokens, **options):
        steps = healthy(ids, max_new_tokens, **options)
        yield next(steps)
        raise RuntimeError("a worker fell over")

    monkeypatch.setattr(slow, "stream", failing)
    monkeypatch.setattr(server.gateway, "model", slow)
    stream = api.completions.create(model="adder", prompt="1+1=", max_tokens=5, stream=True)
    with pytest.raises(openai.APIError) as info:
        for _ in stream:
            pass
    assert "internal error" in info.value.message and "RuntimeError" in info.value.message


def test_the_server_shuts_down_cleanly(model):
    gateway, server = start(model)
    port, thread = server.port, server._thread
    assert raw(server, "GET", "/health")[0] == 200
    server.stop()
    gateway.close()
    assert not thread.is_alive()
    with pytest.raises(ConnectionError):
        http.client.HTTPConnection("127.0.0.1", port, timeout=5).request("GET", "/health")


def test_a_taken_port_is_refused_at_start(server):
    from neuro_dask.gateway import GatewayServer

    with pytest.raises(OSError):
        GatewayServer(server.gateway, "127.0.0.1", server.port).start()
    assert raw(server, "GET", "/health")[0] == 200


def test_neuro_dask_serve_prints_url_model_and_curl(cluster_model, tmp_path):
    cluster = cluster_model[0]
    keys = tmp_path / "keys.json"
    keys.write_text(json.dumps({"sk-cli": "carol"}))
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "neuro_dask.cli.main",
            "serve",
            "--scheduler",
            cluster.scheduler_address,
            "--port",
            "0",
            "--api-keys",
            str(keys),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        lines = []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not any(line.startswith("  curl") for line in lines):
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
        banner = "".join(lines)
        assert "serving model 'adder' at http://127.0.0.1:" in banner, banner + proc.stderr.read()
        assert "Authorization: Bearer" in banner and '"prompt": "123+456="' in banner
        url = banner.split(" at ")[1].split()[0]
        client = openai.OpenAI(base_url=url, api_key="sk-cli", max_retries=0, timeout=30)
        assert (
            client.completions.create(model="adder", prompt="12+30=", max_tokens=5, temperature=0).choices[0].text
            == "42"
        )
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "Traceback" not in err


def test_a_gateway_serving_a_speculating_model_answers_the_same(api, model):
    import neuro_dask as nd
    from neuro_dask.demo.train import DRAFT_ASSET_DIR

    plain = api.completions.create(model="adder", prompt="123+456=", max_tokens=6, temperature=0)
    model.speculate("draft-model", draft_model=nd.load(DRAFT_ASSET_DIR))
    try:
        before = model.speculation.snapshot()["passes"]
        fast = api.completions.create(model="adder", prompt="123+456=", max_tokens=6, temperature=0)
        stream = api.completions.create(model="adder", prompt="908+97=", max_tokens=6, temperature=0, stream=True)
        streamed = "".join(chunk.choices[0].text for chunk in stream)
        assert model.speculation.snapshot()["passes"] > before  # the gateway's generations speculated
    finally:
        model.speculate(None)
    assert fast.choices[0].text == plain.choices[0].text == "579"
    assert streamed == "1005"
    assert fast.usage.completion_tokens == plain.usage.completion_tokens
