"""The gateway's HTTP side: a tornado application on its own thread and event loop, and a pool of
threads in which each request's generation runs (docs/gateway.md).

The event loop only reads, authenticates and writes; parsing a body, tokenizing and generating
happen in the pool, so that many requests generate at once and none stalls the others.
MoEModel.stream may be called from many threads: concurrent requests share the model (and, with
continuous batching, its decode steps).

Holding the GIL stalls the loop as surely as running on it, so the pool's work must not hold it
long either: tokenizing goes through `encode_batch` (tokenizers releases the GIL there, not in
`encode`), and a prompt whose length alone proves it too long is refused without tokenizing
(prompt_bound.py). Bodies are read by the handlers themselves (stream_request_body), so that a
body over the limit gets our 413 in OpenAI's shape, not tornado's empty 400.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import hmac
import json
import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tornado.httpserver
import tornado.iostream
import tornado.netutil
import tornado.web

from neuro_dask.errors import ConfigError
from neuro_dask.gateway.prompt_bound import PromptBound, prompt_bound
from neuro_dask.gateway.protocol import (
    BODY_LIMIT_SETTING,
    SSE_DONE,
    ChatRequest,
    ChatTemplate,
    CompletionRequest,
    ProtocolError,
    SamplingParams,
    TextAssembler,
    body_too_large,
    chat_chunk,
    chat_response,
    check_prompt_ids,
    check_prompt_limit,
    completion_chunk,
    completion_response,
    drop_duplicate_bos,
    error_for_exception,
    load_chat_template,
    model_card,
    models_list,
    new_id,
    parse_chat,
    parse_completion,
    parse_json,
    prompt_too_long,
    rate_limited,
    refuse_body_unread,
    resolve_max_tokens,
    sse,
    usage,
    usage_chunk,
)
from neuro_dask.security.limits import RateLimiter, RequestLimits
from neuro_dask.security.redact import redact_url
from neuro_dask.settings import SecuritySettings, parse_bytes

log = logging.getLogger(__name__)

COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions; chat defaults to the context left
MAX_BODY_BYTES = 4 * 2**20  # default of neuro.gateway.max-body-bytes
# A body announced above the limit but below this many times it is read (and dropped) before the
# 413, so that the client, still sending, reads the answer instead of a reset (refuse_body_unread).
DRAIN_FACTOR = 4


class GatewayConfigError(ConfigError):
    def __init__(self, where: str, problem: str):
        self.where, self.problem = where, problem
        super().__init__(f"{where}: {problem}")


def load_api_keys(source: str | Path | Mapping[str, Any] | None) -> dict[str, str | None]:
    """API keys -> the ledger account each pays with: a JSON file {"key": "account" or null}
    (or a list of keys, accounts unset), or such a mapping as is (Dask config neuro.gateway.api-keys)."""
    if source is None:
        return {}
    where = "neuro.gateway.api-keys"
    raw: Any = source
    if isinstance(source, (str, Path)):
        where = str(source)
        try:
            raw = json.loads(Path(source).read_text())
        except OSError as exc:
            raise GatewayConfigError(where, f"cannot read the API key file ({exc.strerror})") from None
        except ValueError as exc:
            raise GatewayConfigError(where, f"is not valid JSON ({exc})") from None
    if isinstance(raw, list):
        raw = {key: None for key in raw}
    if not isinstance(raw, Mapping):
        raise GatewayConfigError(where, 'must be a JSON object {"API key": "ledger account"}')
    keys: dict[str, str | None] = {}
    for key, account in raw.items():
        if not isinstance(key, str) or not key.strip():
            raise GatewayConfigError(where, "API keys must be non-empty strings")
        if account is not None and not isinstance(account, str):
            raise GatewayConfigError(where, f"the account of a key must be a string or null, got {account!r}")
        keys[key] = account
    return keys


def configured_api_keys(path: str | Path | None) -> dict[str, str | None]:
    """--api-keys FILE, else Dask config neuro.gateway.api-keys (a file path or a mapping), else none."""
    if path is not None:
        return load_api_keys(path)
    import dask.config

    return load_api_keys(dask.config.get("neuro.gateway.api-keys", default=None))


def configured_max_body_bytes() -> int:
    """Dask config neuro.gateway.max-body-bytes (a size such as "4 MiB"), else 4 MiB."""
    import dask.config

    return parse_bytes(dask.config.get(BODY_LIMIT_SETTING, default=MAX_BODY_BYTES), "max-body-bytes")


def tokenizer_bound(tokenizer) -> PromptBound | None:
    """The length bound of a neuro_dask Tokenizer's tokenizer.json; None for any other tokenizer."""
    pipeline = getattr(tokenizer, "pipeline", None)
    if pipeline is None:
        return None
    try:
        return prompt_bound(pipeline())
    except (ValueError, TypeError, AttributeError):  # a pipeline this tokenizers version writes otherwise
        return None


def default_model_id(source: str) -> str:
    """The model's name as clients ask for it: the last part of its folder or URL ("adder")."""
    return Path(str(source).rstrip("/")).name or "model"


@dataclass(frozen=True)
class Job:
    """One request's generation, ready to run."""

    prompt_ids: list[int]
    max_tokens: int
    params: SamplingParams
    # The ledger account of the request's API key: it pays for this request (model.charging).
    account: str | None = None


@dataclass(frozen=True)
class Result:
    text: str
    finish_reason: str  # "stop" (EOS or a stop string), "length" (max_tokens) or "cancelled"
    prompt_tokens: int
    completion_tokens: int  # every token the model produced, the EOS that ended the text included

    @property
    def usage(self) -> dict[str, int]:
        return usage(self.prompt_tokens, self.completion_tokens)


class Gateway:
    """What the handlers serve: one model under one id, the API keys, the chat template, the
    limits on what one client may ask (neuro.security: prompt tokens, max_tokens, requests per
    minute per API key, or per client address when no keys are configured), and the threads that
    run generation."""

    def __init__(
        self,
        model,
        model_id: str | None = None,
        api_keys: Mapping[str, str | None] | None = None,
        chat_template: ChatTemplate | None = None,
        threads: int = 64,
        security: SecuritySettings | None = None,
        clock: Callable[[], float] = time.monotonic,
        max_body_bytes: int | None = None,
    ):
        self.model = model
        self.tokenizer = model.require_tokenizer()  # text in and out: a model without one cannot be served
        self.prompt_bound = tokenizer_bound(self.tokenizer)
        self.model_id = model_id or default_model_id(model.source)
        self.api_keys = dict(api_keys or {})
        folder = Path(model.source)
        self.chat_template = chat_template or load_chat_template(folder if folder.is_dir() else None)
        self.context = int(model.config.max_position_embeddings)
        self.vocab_size = int(model.config.vocab_size)
        self.eos_ids = frozenset(model.generation.eos_token_ids)
        self.created = int(time.time())
        self.pool = concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="gateway-generate")
        self._active: set[threading.Event] = set()  # cancel flags of requests in flight
        self._lock = threading.Lock()
        security = security or SecuritySettings.load()
        self.limits = RequestLimits.from_settings(security)
        self.max_body_bytes = configured_max_body_bytes() if max_body_bytes is None else int(max_body_bytes)
        # Used on the event loop's thread only (admit), so it needs no lock.
        self.rate = RateLimiter(security.requests_per_minute, clock)
        if not self.api_keys:
            log.warning(
                "no API keys configured: the gateway serves anyone who can reach it "
                "(give --api-keys FILE to require Authorization: Bearer KEY)"
            )
        log.info(
            "serving %s as %r; chat template: %s; limits: %d prompt tokens, %d new tokens, %s requests "
            "per minute per %s, %d-byte bodies; long prompts refused %s",
            redact_url(model.source),
            self.model_id,
            self.chat_template.origin,
            self.limits.max_prompt_tokens,
            self.limits.max_new_tokens,
            security.requests_per_minute or "unlimited",
            "API key" if self.api_keys else "client address",
            self.max_body_bytes,
            f"from their length (<= {self.prompt_bound.per_token} characters a token)"
            if self.prompt_bound
            else "after tokenizing",
        )

    # ---- requests -------------------------------------------------------------------------------

    def authenticate(self, authorization: str | None) -> str | None:
        """The account of the request's key (None: no keys configured, or the key has none)."""
        if not self.api_keys:
            return None
        scheme, _, key = (authorization or "").partition(" ")
        key = key.strip()
        if scheme.lower() != "bearer" or not key:
            raise ProtocolError(
                401,
                "Missing API key: send the header 'Authorization: Bearer YOUR_KEY'",
                "invalid_request_error",
                None,
                "invalid_api_key",
            )
        found = None
        for candidate, account in self.api_keys.items():  # compare every key in constant time
            if hmac.compare_digest(candidate.encode(), key.encode()):
                found = (account,)
        if found is None:
            raise ProtocolError(401, "Incorrect API key provided", "invalid_request_error", None, "invalid_api_key")
        return found[0]

    def admit(self, authorization: str | None, remote_ip: str | None) -> None:
        """Count one request against its API key's budget (its address's, with no keys configured):
        a 429 with Retry-After when the budget is spent. Call after authenticate()."""
        if self.rate.unlimited:
            return
        if self.api_keys:
            key, per = ("key", (authorization or "").partition(" ")[2].strip()), "API key"
        else:
            key, per = ("ip", remote_ip or ""), "client address"
        wait = self.rate.take(key)
        if wait > 0:
            raise rate_limited(wait, self.rate.requests_per_minute, per)

    # Called in the pool (GenerationHandler.prepare_request): tokenizing is the one costly step.

    def prepare_completion(self, request: CompletionRequest, account: str | None) -> Job:
        if isinstance(request.prompt, tuple):
            ids = list(request.prompt)
        else:
            ids = self.encode(request.prompt, "prompt")
        return self._job(ids, request.params, account, COMPLETION_DEFAULT_MAX_TOKENS, "prompt")

    def prepare_chat(self, request: ChatRequest, account: str | None) -> Job:
        text = self.chat_template.render(request.messages)
        # drop_duplicate_bos may remove one token of the text's own (a template that writes two BOS)
        ids = drop_duplicate_bos(self.encode(text, "messages", slack=1), self.model.generation.bos_token_id)
        return self._job(ids, request.params, account, None, "messages")

    def encode(self, text: str, param: str, slack: int = 0) -> list[int]:
        """The text's ids; a text that cannot fit in max-prompt-tokens (`slack` tokens may still be
        removed afterwards) is refused from its length alone, without tokenizing it."""
        limit = self.limits.max_prompt_tokens
        if self.prompt_bound is not None:
            at_least = self.prompt_bound.min_tokens(text) - slack
            if at_least > limit:
                raise prompt_too_long(at_least, limit, param, at_least=True)
        # encode_batch runs with the GIL released; encode holds it for the whole text
        return self.tokenizer.encode_batch([text])[0]

    def _job(self, ids: list[int], params: SamplingParams, account: str | None, default: int | None, param: str) -> Job:
        check_prompt_limit(len(ids), self.limits.max_prompt_tokens, param)  # first: O(1), the next is O(ids)
        check_prompt_ids(ids, self.vocab_size, param)
        max_tokens = resolve_max_tokens(params.max_tokens, len(ids), self.context, default, self.limits.max_new_tokens)
        return Job(ids, max_tokens, params, account)

    def run(
        self,
        job: Job,
        on_delta: Callable[[str], None] | None = None,
        on_first_token: Callable[[], None] | None = None,
        cancelled: threading.Event | None = None,
    ) -> Result:
        """Generate (in the calling thread): text deltas to `on_delta` as they become safe to send,
        ending at EOS, a stop string, max_tokens, or `cancelled` (checked after every token)."""
        assembler = TextAssembler(self.tokenizer.decode, job.params.stop, context=job.prompt_ids)
        charging = getattr(self.model, "charging", None)  # models without a ledger hook pay nothing
        with charging(job.account) if charging is not None else contextlib.nullcontext():
            return self._run(job, assembler, on_delta, on_first_token, cancelled)

    def _run(self, job: Job, assembler, on_delta, on_first_token, cancelled) -> Result:
        steps = self.model.stream([job.prompt_ids], max_new_tokens=job.max_tokens, **job.params.model_options())
        produced, finish = 0, "length"
        try:
            for step in steps:
                produced += 1
                if produced == 1 and on_first_token is not None:
                    on_first_token()
                token = int(step[0])
                if token in self.eos_ids:
                    finish = "stop"
                    break
                delta = assembler.push(token)
                if delta and on_delta is not None:
                    on_delta(delta)
                if assembler.stopped:
                    finish = "stop"
                    break
                if cancelled is not None and cancelled.is_set():
                    finish = "cancelled"
                    break
        finally:
            close = getattr(steps, "close", None)
            if close is not None:
                close()  # ends the model's request (and its ledger hold) when we stop early
        tail = assembler.finish()
        if tail and on_delta is not None:
            on_delta(tail)
        return Result(assembler.text, finish, len(job.prompt_ids), produced)

    def cancel_flag(self) -> threading.Event:
        flag = threading.Event()
        with self._lock:
            self._active.add(flag)
        return flag

    def release(self, flag: threading.Event) -> None:
        with self._lock:
            self._active.discard(flag)

    @property
    def in_flight(self) -> int:
        """Generations running now (each holds a cancel flag until it ends)."""
        with self._lock:
            return len(self._active)

    def cancelled(self) -> int:
        """Generations in flight told to stop (a client went away, or the server closes)."""
        with self._lock:
            return sum(flag.is_set() for flag in self._active)

    def cancel_all(self) -> None:
        with self._lock:
            for flag in self._active:
                flag.set()

    def close(self) -> None:
        """Stop every generation in flight (at its next token) and the threads."""
        self.cancel_all()
        self.pool.shutdown(wait=True, cancel_futures=True)

    def application(self) -> tornado.web.Application:
        return tornado.web.Application(
            [
                (r"/v1/models", ModelsHandler, {"gateway": self}),
                (r"/v1/models/(.+)", ModelHandler, {"gateway": self}),
                (r"/v1/completions", CompletionsHandler, {"gateway": self}),
                (r"/v1/chat/completions", ChatCompletionsHandler, {"gateway": self}),
                (r"/health", HealthHandler, {"gateway": self}),
            ],
            default_handler_class=NotFoundHandler,
            default_handler_args={"gateway": self},
        )


# ---- handlers ---------------------------------------------------------------------------------------


@tornado.web.stream_request_body
class BaseHandler(tornado.web.RequestHandler):
    """Every error, tornado's own 404 and 405 included, in OpenAI's shape.

    Each handler reads its body itself (data_received), up to the gateway's max_body_bytes: tornado
    would refuse a larger one with an empty 400 before any handler runs, so its own limit is
    lifted per request, and a body over ours is answered 413 here."""

    def initialize(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self.cancelled: threading.Event | None = None
        self.body_chunks: list[bytes] = []
        self.body_size = 0  # bytes received, kept or not
        self.cut_off = False  # answered 413 while the body was still coming

    def prepare(self) -> None:
        limit = self.gateway.max_body_bytes
        connection = self.request.connection
        # Ours is the only limit: tornado reads (and, once we have answered, drops) what comes.
        connection.set_max_body_size(2**63 - 1)
        length = _content_length(self.request.headers)
        expects_continue = self.request.headers.get("Expect", "").lower() == "100-continue"
        if refuse_body_unread(length, expects_continue, limit, DRAIN_FACTOR * limit):
            raise body_too_large(length, limit)

    def data_received(self, chunk: bytes) -> None:
        self.body_size += len(chunk)
        limit = self.gateway.max_body_bytes
        if self.body_size <= limit:
            self.body_chunks.append(chunk)
            return
        self.body_chunks = []  # over the limit: nothing more is kept; post() answers 413
        if self.body_size > DRAIN_FACTOR * limit and not self.cut_off:
            # a chunked body with no end in sight: answer now (tornado drops the rest, then closes)
            self.cut_off = True
            self.answer_error(body_too_large(None, limit))

    def body(self) -> bytes:
        if self.body_size > self.gateway.max_body_bytes:
            raise body_too_large(self.body_size, self.gateway.max_body_bytes)
        return b"".join(self.body_chunks)

    def set_default_headers(self) -> None:
        self.set_header("Content-Type", "application/json")

    def check_xsrf_cookie(self) -> None:  # an API: bearer keys, no cookies
        pass

    def write_json(self, payload: Mapping[str, Any]) -> None:
        self.finish(json.dumps(payload))

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        exc = kwargs.get("exc_info", (None, None, None))[1]
        if isinstance(exc, tornado.web.HTTPError) or exc is None:
            status = exc.status_code if isinstance(exc, tornado.web.HTTPError) else status_code
            err = _http_error(status, self.request.method, self.request.path)
        else:
            err = error_for_exception(exc)
        self.answer_error(err)

    def answer_error(self, err: ProtocolError) -> None:
        self.clear()
        self.set_status(err.status)
        if err.status == 401:
            self.set_header("WWW-Authenticate", "Bearer")
        for name, value in err.headers.items():
            self.set_header(name, value)
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps(err.body()))

    def log_exception(self, typ, value, tb) -> None:
        if isinstance(value, tornado.web.HTTPError):
            return super().log_exception(typ, value, tb)
        err = error_for_exception(value)
        if err.status >= 500 and not isinstance(value, ProtocolError) and err.code is None:
            log.error("internal error on %s %s", self.request.method, self.request.path, exc_info=(typ, value, tb))
        else:
            log.info("%s %s -> %d: %s", self.request.method, self.request.path, err.status, err.message)

    def authenticate(self) -> str | None:
        return self.gateway.authenticate(self.request.headers.get("Authorization"))

    def on_connection_close(self) -> None:  # the client went away: stop generating for it
        super().on_connection_close()  # ends the wait for a body that will never come
        if self.cancelled is not None:
            self.cancelled.set()

    async def in_pool(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.gateway.pool, fn, *args)


def _content_length(headers) -> int | None:
    """The announced body size; None when absent or unreadable (tornado itself refuses the latter)."""
    try:
        return int(headers["Content-Length"].split(",")[0])
    except (KeyError, ValueError):
        return None


def _http_error(status: int, method: str, path: str) -> ProtocolError:
    if status == 404:
        return ProtocolError(
            404,
            f"Unknown route: {method} {path} (this gateway serves GET /v1/models, "
            "POST /v1/completions and POST /v1/chat/completions)",
            "invalid_request_error",
            None,
            "unknown_url",
        )
    if status == 405:
        return ProtocolError(
            405, f"Method {method} is not allowed on {path}", "invalid_request_error", None, "method_not_allowed"
        )
    if status < 500:
        return ProtocolError(status, f"bad request ({status})", "invalid_request_error", None, None)
    return ProtocolError(status, f"internal error ({status})", "server_error", None, None)


class NotFoundHandler(BaseHandler):
    def unknown(self, *args: Any) -> None:  # after the body is read, as every answer (see prepare)
        raise tornado.web.HTTPError(404)

    get = post = put = patch = delete = head = options = unknown


class HealthHandler(BaseHandler):
    def get(self) -> None:
        self.write_json({"status": "ok", "model": self.gateway.model_id})


class ModelsHandler(BaseHandler):
    def get(self) -> None:
        self.authenticate()
        self.write_json(models_list([self.gateway.model_id], self.gateway.created))


class ModelHandler(BaseHandler):
    def get(self, model_id: str) -> None:
        self.authenticate()
        if model_id != self.gateway.model_id:
            raise ProtocolError(
                404, f"The model '{model_id}' does not exist", "invalid_request_error", "model", "model_not_found"
            )
        self.write_json(model_card(model_id, self.gateway.created))


class GenerationHandler(BaseHandler):
    """POST: authenticate, then parse and tokenize (in the pool), then answer whole or as server-sent
    events."""

    object_name = ""
    id_prefix = ""

    def parse(self, data: dict[str, Any]) -> Any:
        raise NotImplementedError

    def prepare_job(self, request: Any, account: str | None) -> Job:
        raise NotImplementedError

    def prepare_request(self, body: bytes, account: str | None) -> Job:
        """In the pool: a body of megabytes is milliseconds of json.loads and validation."""
        return self.prepare_job(self.parse(parse_json(body)), account)

    def response(self, id: str, created: int, result: Result) -> dict[str, Any]:
        raise NotImplementedError

    def chunk(self, id: str, created: int, delta: str | None, finish_reason: str | None = None) -> dict[str, Any]:
        """delta None: the opening chunk (chat sends the role first); "" with a finish_reason: the last."""
        raise NotImplementedError

    async def post(self) -> None:
        account = self.authenticate()
        self.gateway.admit(self.request.headers.get("Authorization"), self.request.remote_ip)
        job = await self.in_pool(self.prepare_request, self.body(), account)
        self.cancelled = self.gateway.cancel_flag()
        try:
            if self.request.connection.stream.closed():
                return
            if job.params.stream:
                await self.stream(job)
            else:
                result = await self.in_pool(self.gateway.run, job, None, None, self.cancelled)
                if result.finish_reason != "cancelled":
                    self.write_json(self.response(new_id(self.id_prefix), int(time.time()), result))
        finally:
            self.gateway.release(self.cancelled)

    async def stream(self, job: Job) -> None:
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        cancelled = self.cancelled

        def put(kind: str, payload: Any = None) -> None:
            try:
                loop.call_soon_threadsafe(events.put_nowait, (kind, payload))
            except RuntimeError:  # the event loop is gone (server stopped): stop generating
                cancelled.set()

        def work() -> None:
            try:
                result = self.gateway.run(job, lambda d: put("delta", d), lambda: put("started"), cancelled)
            except BaseException as exc:  # reported to the handler, which logs and answers it
                put("error", exc)
            else:
                put("done", result)

        self.gateway.pool.submit(work)
        kind, payload = await events.get()
        if kind == "error":
            raise payload  # nothing sent yet: an ordinary error response with its status
        id, created = new_id(self.id_prefix), int(time.time())
        self.set_header("Content-Type", "text/event-stream")
        self.set_header("Cache-Control", "no-cache")
        self.set_header("X-Accel-Buffering", "no")
        opening = self.chunk(id, created, None)
        if opening:
            self.write(sse(opening))
        try:
            while True:
                if kind == "delta":
                    self.write(sse(self.chunk(id, created, payload)))
                elif kind == "done":
                    result: Result = payload
                    if result.finish_reason == "cancelled":
                        return
                    self.write(sse(self.chunk(id, created, "", result.finish_reason)))
                    if job.params.include_usage:
                        self.write(sse(usage_chunk(id, created, self.gateway.model_id, self.object_name, result.usage)))
                    self.write(SSE_DONE)
                    await self.flush()
                    self.finish()
                    return
                elif kind == "error":
                    self.log_exception(type(payload), payload, payload.__traceback__)
                    self.write(sse(error_for_exception(payload).body()))
                    await self.flush()
                    self.finish()
                    return
                if events.empty():
                    await self.flush()  # backpressure: one flush per batch of events
                kind, payload = await events.get()
        except tornado.iostream.StreamClosedError:
            cancelled.set()  # the client went away mid-stream


class CompletionsHandler(GenerationHandler):
    object_name = "text_completion"
    id_prefix = "cmpl"

    def parse(self, data: dict[str, Any]) -> CompletionRequest:
        return parse_completion(data, [self.gateway.model_id])

    def prepare_job(self, request: CompletionRequest, account: str | None) -> Job:
        return self.gateway.prepare_completion(request, account)

    def response(self, id: str, created: int, result: Result) -> dict[str, Any]:
        return completion_response(id, created, self.gateway.model_id, result.text, result.finish_reason, result.usage)

    def chunk(self, id: str, created: int, delta: str | None, finish_reason: str | None = None):
        if delta is None:
            return None
        return completion_chunk(id, created, self.gateway.model_id, delta, finish_reason)


class ChatCompletionsHandler(GenerationHandler):
    object_name = "chat.completion.chunk"
    id_prefix = "chatcmpl"

    def parse(self, data: dict[str, Any]) -> ChatRequest:
        return parse_chat(data, [self.gateway.model_id])

    def prepare_job(self, request: ChatRequest, account: str | None) -> Job:
        return self.gateway.prepare_chat(request, account)

    def response(self, id: str, created: int, result: Result) -> dict[str, Any]:
        return chat_response(id, created, self.gateway.model_id, result.text, result.finish_reason, result.usage)

    def chunk(self, id: str, created: int, delta: str | None, finish_reason: str | None = None):
        if delta is None:
            body = {"role": "assistant", "content": ""}
        elif finish_reason is not None:
            body = {}
        else:
            body = {"content": delta}
        return chat_chunk(id, created, self.gateway.model_id, body, finish_reason)


# ---- the server -------------------------------------------------------------------------------------


class GatewayServer:
    """The gateway's tornado server on its own thread and event loop: start(), then stop().

    port 0 picks a free port (see .port after start). The socket is bound in start(), so a port
    already in use raises there.
    """

    def __init__(self, gateway: Gateway, host: str = "127.0.0.1", port: int = 8000):
        self.gateway = gateway
        self.host = host
        self.port = port
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.host in ("", "0.0.0.0") else self.host
        return f"http://{host}:{self.port}/v1"

    def start(self, timeout: float = 10.0) -> GatewayServer:
        sockets = tornado.netutil.bind_sockets(self.port, self.host or None)
        self.port = sockets[0].getsockname()[1]
        self._thread = threading.Thread(target=self._run, args=(sockets,), name="neuro-gateway", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            raise RuntimeError("the gateway's event loop did not start")
        if self._error is not None:
            raise self._error
        return self

    def _run(self, sockets) -> None:
        try:
            asyncio.run(self._serve(sockets))
        except BaseException as exc:  # surfaced by start() when it happens there
            self._error = exc
            self._ready.set()
            log.exception("the gateway's event loop stopped")

    async def _serve(self, sockets) -> None:
        self._loop = asyncio.get_running_loop()
        self._stopping = asyncio.Event()
        # Only for what no handler reads (an unsupported method): each handler sets its own.
        server = tornado.httpserver.HTTPServer(
            self.gateway.application(),
            max_body_size=DRAIN_FACTOR * self.gateway.max_body_bytes,
            idle_connection_timeout=300,
        )
        server.add_sockets(sockets)
        self._ready.set()
        await self._stopping.wait()
        server.stop()  # no new connections
        self.gateway.cancel_all()  # generations in flight end at their next token
        try:
            await asyncio.wait_for(server.close_all_connections(), 10)
        except TimeoutError:
            log.warning("some gateway connections did not close within 10 s")

    def stop(self, timeout: float = 15.0) -> None:
        if self._thread is None:
            return
        if self._loop is not None and self._stopping is not None and not self._loop.is_closed():
            try:
                self._loop.call_soon_threadsafe(self._stopping.set)
            except RuntimeError:  # the loop already closed
                pass
        self._thread.join(timeout)
        self._thread = None

    def __enter__(self) -> GatewayServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


# ---- `neuro-dask serve` -------------------------------------------------------------------------------
