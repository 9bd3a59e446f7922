"""The OpenAI wire protocol, pure: request validation, response and chunk shapes, errors, chat
templates, stop strings and usage counts. No HTTP and no Dask here (server.py does those).

Shapes follow OpenAI's API reference for /v1/completions, /v1/chat/completions and /v1/models,
so that the official `openai` client (and anything built on it) works unchanged.
"""

from __future__ import annotations

import json
import math
import time
import uuid
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from neuro_dask.security.limits import NEW_TOKENS, PROMPT_TOKENS

# ---- errors ---------------------------------------------------------------------------------------

INVALID_REQUEST = "invalid_request_error"
SERVER_ERROR = "server_error"
RATE_LIMIT = "rate_limit_error"


class ProtocolError(Exception):
    """An error the gateway answers in OpenAI's shape: {"error": {message, type, param, code}},
    with `headers` added to the response (Retry-After on a 429)."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = INVALID_REQUEST,
        param: str | None = None,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(
    message: str, type: str = INVALID_REQUEST, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> ProtocolError:
    return ProtocolError(400, message, INVALID_REQUEST, param, code)


def rate_limited(wait_seconds: float, requests_per_minute: int, per: str = "API key") -> ProtocolError:
    """429 in OpenAI's shape, with Retry-After: the whole seconds until the next request may come."""
    wait = max(1, math.ceil(wait_seconds))
    return ProtocolError(
        429,
        f"Rate limit reached: this gateway allows {requests_per_minute} requests per minute per {per} "
        f"(neuro.security.requests-per-minute). Please try again in {wait} s.",
        RATE_LIMIT,
        None,
        "rate_limit_exceeded",
        {"Retry-After": str(wait)},
    )


# The gateway states each limit in its own terms: what the request has, what the gateway accepts,
# and the setting that says so. It never proposes a value for the setting: the request's own size
# (3,000,001 prompt tokens) is no sensible limit, and choosing one is the operator's business.


def prompt_too_long(tokens: int, limit: int, param: str = "prompt", at_least: bool = False) -> ProtocolError:
    """400 context_length_exceeded: a prompt above neuro.security.max-prompt-tokens. `at_least`:
    `tokens` is a lower bound (prompt_bound), the prompt was not tokenized."""
    has = f"at least {tokens}" if at_least else str(tokens)
    return bad_request(
        f"This prompt has {has} tokens; this gateway accepts at most {limit} prompt tokens "
        f"(neuro.security.{PROMPT_TOKENS}). Please shorten the prompt.",
        param,
        "context_length_exceeded",
    )


def too_many_new_tokens(requested: int, limit: int) -> ProtocolError:
    """400 on max_tokens: more than neuro.security.max-new-tokens."""
    return bad_request(
        f"max_tokens is {requested}; this gateway generates at most {limit} tokens per request "
        f"(neuro.security.{NEW_TOKENS}). Please ask for fewer tokens.",
        "max_tokens",
        "invalid_value",
    )


BODY_LIMIT_SETTING = "neuro.gateway.max-body-bytes"


def body_too_large(size: int | None, limit: int) -> ProtocolError:
    """413: a request body above the gateway's limit; `size` None when the body came in chunks and
    was not read to its end."""
    has = f"is {size} bytes" if size is not None else f"has more than {limit} bytes"
    return ProtocolError(
        413,
        f"This request's body {has}; this gateway accepts request bodies of at most "
        f"{limit} bytes ({_size(limit)}, {BODY_LIMIT_SETTING}). Please send a shorter prompt.",
        INVALID_REQUEST,
        None,
        "request_too_large",
    )


def refuse_body_unread(content_length: int | None, expects_continue: bool, limit: int, drain: int) -> bool:
    """Answer 413 before reading a body announced above `limit`? Yes when the client waits for our
    go-ahead (Expect: 100-continue: it then never sends the body) or the body is above `drain`.
    Below `drain` the body is read and dropped first: a client still sending when the server
    answers and closes gets a connection reset, not the answer, so a body of reasonable size is
    better swallowed than cut off."""
    return content_length is not None and content_length > limit and (expects_continue or content_length > drain)


def _size(n: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.4g} {unit}"
    return f"{n} B"


# neuro_dask's own exceptions, by class name (anywhere in the MRO) so that this module imports
# nothing from the model or the dispatch layer: (status, type, code).
_EXCEPTION_MAP: dict[str, tuple[int, str, str | None]] = {
    "PromptTooLongError": (400, INVALID_REQUEST, "context_length_exceeded"),
    "LimitExceededError": (400, INVALID_REQUEST, "invalid_value"),
    "TokenOutOfRangeError": (400, INVALID_REQUEST, "invalid_value"),
    "GenerationOptionError": (400, INVALID_REQUEST, "invalid_value"),
    "InputError": (400, INVALID_REQUEST, None),
    "PaymentRefusedError": (429, "insufficient_quota", "insufficient_quota"),
    "InsufficientFundsError": (429, "insufficient_quota", "insufficient_quota"),
    "ExpertUnavailableError": (503, SERVER_ERROR, "experts_unavailable"),
    "QuorumExhaustedError": (503, SERVER_ERROR, "experts_unavailable"),
    "SchedulerAwayError": (503, SERVER_ERROR, "scheduler_unavailable"),
}


def error_for_exception(exc: BaseException) -> ProtocolError:
    """A ProtocolError as is; a known neuro_dask error with its status; anything else a 500
    whose message names only the exception's type (the details go to the server's log)."""
    if isinstance(exc, ProtocolError):
        return exc
    for cls in type(exc).__mro__:
        if cls.__name__ in _EXCEPTION_MAP:
            status, type_, code = _EXCEPTION_MAP[cls.__name__]
            return ProtocolError(status, str(exc), type_, None, code)
    return ProtocolError(
        500, f"internal error ({type(exc).__name__}); the gateway's log has the details", SERVER_ERROR, None, None
    )


# ---- request parsing ------------------------------------------------------------------------------


def parse_json(body: bytes | str) -> dict[str, Any]:
    """The request body as a JSON object, or a 400."""
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError is a ValueError
        raise bad_request(f"the request body is not valid JSON ({exc})", code="invalid_json") from None
    except RecursionError:
        raise bad_request("the request body is nested too deeply", code="invalid_json") from None
    if not isinstance(data, dict):
        raise bad_request(f"the request body must be a JSON object, not {type(data).__name__}", code="invalid_json")
    return data


def _present(data: Mapping[str, Any], name: str) -> bool:
    return data.get(name) is not None  # JSON null means "not given", as OpenAI treats it


def _integer(data: Mapping[str, Any], name: str, minimum: int | None = None, maximum: int | None = None) -> int | None:
    if not _present(data, name):
        return None
    value = data[name]
    if isinstance(value, bool) or not isinstance(value, int):
        raise bad_request(f"'{name}' must be an integer, got {json.dumps(value)}", name, "invalid_type")
    if minimum is not None and value < minimum:
        raise bad_request(f"'{name}' must be at least {minimum}, got {value}", name, "invalid_value")
    if maximum is not None and value > maximum:
        raise bad_request(f"'{name}' must be at most {maximum}, got {value}", name, "invalid_value")
    return value


def _number(data: Mapping[str, Any], name: str, low: float, high: float) -> float | None:
    if not _present(data, name):
        return None
    value = data[name]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise bad_request(f"'{name}' must be a number, got {json.dumps(value)}", name, "invalid_type")
    if not math.isfinite(value) or not low <= value <= high:
        raise bad_request(f"'{name}' must be between {low:g} and {high:g}, got {value}", name, "invalid_value")
    return float(value)


def _boolean(data: Mapping[str, Any], name: str, default: bool = False) -> bool:
    if not _present(data, name):
        return default
    value = data[name]
    if not isinstance(value, bool):
        raise bad_request(f"'{name}' must be true or false, got {json.dumps(value)}", name, "invalid_type")
    return value


def _unsupported(data: Mapping[str, Any], name: str, neutral: Collection[Any], why: str = "") -> None:
    """A parameter the gateway cannot honour is refused (400), not silently ignored, unless it
    holds its neutral value."""
    if _present(data, name) and data[name] not in neutral:
        raise bad_request(f"'{name}' is not supported by this gateway{why}", name, "unsupported_parameter")


MAX_STOP_STRINGS = 4  # OpenAI's limit
GREEDY_BELOW = 1e-5  # a temperature this small is greedy decoding (logits / 1e-300 would overflow)
INT64 = 2**63


@dataclass(frozen=True)
class SamplingParams:
    """What both endpoints share. max_tokens None means "the endpoint's default" (resolve_max_tokens)."""

    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stream: bool = False
    include_usage: bool = False

    @property
    def do_sample(self) -> bool:
        """temperature 0 (or below 1e-5, as vLLM) or top_p 0 (only the likeliest token survives) is greedy."""
        return self.temperature >= GREEDY_BELOW and self.top_p != 0

    def model_options(self) -> dict[str, Any]:
        """Keyword arguments of MoEModel.stream/generate (besides the ids and max_new_tokens)."""
        if not self.do_sample:
            return {"do_sample": False, "seed": self.seed}
        return {
            "do_sample": True,
            "temperature": self.temperature,
            "top_p": None if self.top_p in (None, 1.0) else self.top_p,
            "top_k": self.top_k,
            "seed": self.seed,
        }


def parse_sampling(data: Mapping[str, Any], max_tokens_names: Sequence[str] = ("max_tokens",)) -> SamplingParams:
    max_tokens = None
    for name in max_tokens_names:  # the first one given wins (chat: max_completion_tokens, max_tokens)
        value = _integer(data, name, minimum=1)
        if value is not None and max_tokens is None:
            max_tokens = value
    temperature = _number(data, "temperature", 0.0, 2.0)
    top_p = _number(data, "top_p", 0.0, 1.0)
    top_k = _integer(data, "top_k", minimum=1)  # not OpenAI's, but vLLM and others accept it
    seed = _integer(data, "seed", -INT64, INT64 - 1)
    n = _integer(data, "n")
    if n is not None and n != 1:
        raise bad_request(
            f"'n' must be 1: this gateway returns one choice per request, got {n}", "n", "unsupported_value"
        )
    stream = _boolean(data, "stream")
    include_usage = False
    options = data.get("stream_options")
    if options is not None:
        if not isinstance(options, dict):
            raise bad_request("'stream_options' must be an object", "stream_options", "invalid_type")
        include_usage = _boolean(options, "include_usage")
    for name in ("presence_penalty", "frequency_penalty"):
        _unsupported(data, name, (0, 0.0))
    _unsupported(data, "logit_bias", ({},))
    return SamplingParams(
        max_tokens,
        1.0 if temperature is None else temperature,
        top_p,
        top_k,
        seed,
        parse_stop(data.get("stop")),
        stream,
        include_usage,
    )


def parse_stop(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise bad_request("'stop' must be a string or a list of strings", "stop", "invalid_type")
    if len(stops) > MAX_STOP_STRINGS:
        raise bad_request(f"'stop' holds at most {MAX_STOP_STRINGS} strings, got {len(stops)}", "stop", "invalid_value")
    if any(s == "" for s in stops):
        raise bad_request("'stop' strings must not be empty", "stop", "invalid_value")
    return tuple(dict.fromkeys(stops))


def check_model(data: Mapping[str, Any], model_ids: Collection[str]) -> str:
    model = data.get("model")
    if not isinstance(model, str) or not model:
        raise bad_request("'model' is required: a model id from GET /v1/models", "model", "missing_required_parameter")
    if model not in model_ids:
        raise ProtocolError(
            404,
            f"The model '{model}' does not exist; this gateway serves {', '.join(sorted(model_ids))}",
            INVALID_REQUEST,
            "model",
            "model_not_found",
        )
    return model


@dataclass(frozen=True)
class CompletionRequest:
    model: str
    prompt: str | tuple[int, ...]  # text, or token ids as given
    params: SamplingParams


def parse_completion(data: Mapping[str, Any], model_ids: Collection[str]) -> CompletionRequest:
    model = check_model(data, model_ids)
    prompt = data.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        prompt = tuple(prompt)
    elif isinstance(prompt, list) and len(prompt) > 1:
        raise bad_request(
            "'prompt' must be one prompt (a string or a list of token ids): send one request "
            "per prompt; they share decode steps on the server anyway",
            "prompt",
            "unsupported_value",
        )
    elif not isinstance(prompt, str):
        raise bad_request(
            "'prompt' is required: a string or a list of token ids",
            "prompt",
            "missing_required_parameter" if prompt is None else "invalid_type",
        )
    _unsupported(data, "echo", (False,))
    _unsupported(data, "best_of", (1,))
    _unsupported(data, "logprobs", (False, 0), ": token log-probabilities are not returned")
    _unsupported(data, "suffix", ("",))
    return CompletionRequest(model, prompt, parse_sampling(data))


CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")


@dataclass(frozen=True)
class ChatRequest:
    model: str
    messages: tuple[dict[str, str], ...]  # each {"role", "content"} (+ "name" when given), content text
    params: SamplingParams


def parse_chat(data: Mapping[str, Any], model_ids: Collection[str]) -> ChatRequest:
    model = check_model(data, model_ids)
    raw = data.get("messages")
    if not isinstance(raw, list) or not raw:
        raise bad_request(
            "'messages' must be a non-empty list of {role, content} objects",
            "messages",
            "missing_required_parameter" if raw is None else "invalid_type",
        )
    messages = tuple(_message(m, i) for i, m in enumerate(raw))
    _unsupported(data, "tools", ([],), ": no tool calls")
    _unsupported(data, "functions", ([],), ": no function calls")
    _unsupported(data, "logprobs", (False,), ": token log-probabilities are not returned")
    _unsupported(data, "top_logprobs", (0,))
    return ChatRequest(model, messages, parse_sampling(data, ("max_completion_tokens", "max_tokens")))


def _message(raw: Any, index: int) -> dict[str, str]:
    param = f"messages[{index}]"
    if not isinstance(raw, dict):
        raise bad_request(f"{param} must be an object with 'role' and 'content'", param, "invalid_type")
    role = raw.get("role")
    if role not in CHAT_ROLES:
        raise bad_request(
            f"{param}.role must be one of {', '.join(CHAT_ROLES)}, got {json.dumps(role)}",
            f"{param}.role",
            "invalid_value",
        )
    content = raw.get("content")
    if content is None:
        text = ""  # an assistant turn that only called tools
    elif isinstance(content, str):
        text = content
    elif isinstance(content, list):
        parts = []
        for j, part in enumerate(content):
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                raise bad_request(
                    f'{param}.content[{j}]: only text parts ({{"type": "text", "text": ...}}) are supported',
                    f"{param}.content",
                    "unsupported_value",
                )
            parts.append(part["text"])
        text = "".join(parts)
    else:
        raise bad_request(
            f"{param}.content must be a string or a list of text parts", f"{param}.content", "invalid_type"
        )
    message = {"role": role, "content": text}
    if isinstance(raw.get("name"), str):
        message["name"] = raw["name"]
    return message


def check_prompt_ids(ids: Sequence[int], vocab_size: int, param: str = "prompt") -> None:
    if not ids:
        raise bad_request("the prompt is empty after tokenization: give at least one token", param, "invalid_value")
    bad = [t for t in ids if not 0 <= t < vocab_size]
    if bad:
        raise bad_request(
            f"token id {bad[0]} is outside the model's vocabulary [0, {vocab_size})", param, "invalid_value"
        )


def resolve_max_tokens(
    requested: int | None, prompt_tokens: int, context: int, default: int | None, limit: int | None = None
) -> int:
    """How many tokens to generate: `requested`, else `default` (None: all the context left),
    capped by what the context leaves and by `limit` (neuro.security.max-new-tokens). A request
    that cannot fit is a 400 context_length_exceeded; one that asks for more than `limit`, a 400
    on max_tokens."""
    room = context - prompt_tokens
    if requested is None:
        if room < 1:
            raise _too_long(context, prompt_tokens, 1)
        chosen = room if default is None else min(default, room)
        return chosen if limit is None else min(chosen, limit)
    if limit is not None and requested > limit:
        raise too_many_new_tokens(requested, limit)
    if requested > room:
        raise _too_long(context, prompt_tokens, requested)
    return requested


def check_prompt_limit(prompt_tokens: int, limit: int, param: str = "prompt") -> None:
    """A prompt longer than neuro.security.max-prompt-tokens: 400 context_length_exceeded."""
    if prompt_tokens > limit:
        raise prompt_too_long(prompt_tokens, limit, param)


def _too_long(context: int, prompt_tokens: int, completion: int) -> ProtocolError:
    return bad_request(
        f"This model's maximum context length is {context} tokens. However, you requested "
        f"{prompt_tokens + completion} tokens ({prompt_tokens} in the prompt, {completion} in the completion). "
        "Please reduce the length of the prompt or of max_tokens.",
        "max_tokens",
        "context_length_exceeded",
    )


# ---- chat templates -------------------------------------------------------------------------------

# Each message as "role: content" on its own line, then "assistant:" for the model to go on.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


def _token_text(value: Any) -> str | None:
    """tokenizer_config.json writes special tokens as a string or as {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


@dataclass
class ChatTemplate:
    """A Jinja chat template as transformers renders it: sandboxed, trim_blocks and lstrip_blocks,
    `messages`, `add_generation_prompt`, the special tokens, `raise_exception` and `strftime_now`."""

    source: str = DEFAULT_CHAT_TEMPLATE
    special_tokens: dict[str, str] = field(default_factory=dict)
    origin: str = "default"  # where the template came from, for logs and docs

    def __post_init__(self) -> None:
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True)
        env.globals["raise_exception"] = _raise_template_error
        env.globals["strftime_now"] = lambda fmt: time.strftime(fmt)
        env.filters["tojson"] = lambda value, indent=None: json.dumps(value, ensure_ascii=False, indent=indent)
        self._template = env.from_string(self.source)

    @classmethod
    def from_tokenizer_config(cls, config: Mapping[str, Any], origin: str = "tokenizer_config.json") -> ChatTemplate:
        """The config's `chat_template` (a string, or a list of {name, template}: the "default" one),
        or the default template when it has none."""
        template = config.get("chat_template")
        if isinstance(template, list):
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default")
        tokens = {
            name: text
            for name in ("bos_token", "eos_token", "unk_token", "pad_token")
            if (text := _token_text(config.get(name))) is not None
        }
        if not isinstance(template, str) or not template:
            return cls(special_tokens=tokens)
        return cls(template, tokens, origin)

    def render(self, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool = True) -> str:
        try:
            return self._template.render(
                messages=[dict(m) for m in messages],
                add_generation_prompt=add_generation_prompt,
                tools=None,
                **self.special_tokens,
            )
        except _TemplateRefusal as exc:
            raise bad_request(
                f"the model's chat template refused these messages: {exc}", "messages", "invalid_value"
            ) from None
        except Exception as exc:  # jinja2's errors, a sandbox refusal, or a template's own TypeError
            raise bad_request(
                f"the model's chat template ({self.origin}) failed on these messages: {exc}",
                "messages",
                "invalid_value",
            ) from None


class _TemplateRefusal(Exception):
    pass


def _raise_template_error(message: str) -> None:
    raise _TemplateRefusal(message)


def load_chat_template(folder: str | Path | None) -> ChatTemplate:
    """The chat template of a model folder: `chat_template.jinja` (what newer transformers write)
    or tokenizer_config.json's `chat_template`; the default template when neither has one."""
    if folder is None:
        return ChatTemplate()
    folder = Path(folder)
    config: dict[str, Any] = {}
    config_path = folder / "tokenizer_config.json"
    if config_path.is_file():
        try:
            loaded = json.loads(config_path.read_text())
            config = loaded if isinstance(loaded, dict) else {}
        except ValueError:
            config = {}
    jinja_path = folder / "chat_template.jinja"
    if jinja_path.is_file():
        config = {**config, "chat_template": jinja_path.read_text()}
        return ChatTemplate.from_tokenizer_config(config, str(jinja_path.name))
    return ChatTemplate.from_tokenizer_config(config, str(config_path.name))


def drop_duplicate_bos(ids: list[int], bos_id: int | None) -> list[int]:
    """A template that writes the BOS token itself, encoded by a tokenizer that adds one too,
    starts with two: keep one (transformers' templates assume add_special_tokens=False)."""
    if bos_id is not None and len(ids) >= 2 and ids[0] == ids[1] == bos_id:
        return ids[1:]
    return ids


# ---- output text: incremental decoding and stop strings -------------------------------------------

CONTEXT_TOKENS = 5  # prompt tokens a first decode sees, so that e.g. a leading space comes out right


class TextAssembler:
    """Token ids in, text deltas out, cut at the first stop string.

    Decoding is incremental, as vLLM's: each new token is decoded together with the token(s)
    decoded last (and, at first, the prompt's last few tokens) and only the difference is new
    text, so a long answer costs O(tokens), and a tokenizer that strips a leading space at the
    start of a sequence (SentencePiece) still gets it right. A token that leaves an incomplete
    UTF-8 character (U+FFFD at the end) adds nothing until the character is complete.

    push() returns only text that is safe to send: never a tail that could still grow into a stop
    string, so a streamed text never shows a stop string or part of one, and the streamed deltas
    join to exactly the non-streamed text.
    """

    def __init__(self, decode: Callable[[list[int]], str], stops: Sequence[str] = (), context: Sequence[int] = ()):
        self.decode = decode
        self.stops = tuple(stops)
        self._longest_stop = max((len(s) for s in self.stops), default=0)
        self._window: list[int] = [int(t) for t in context][-CONTEXT_TOKENS:] if CONTEXT_TOKENS else []
        self._read = len(self._window)  # the window's ids up to here are already text
        self._searched = 0  # text[:_searched] holds no complete stop string
        self.text = ""  # the answer's text so far, up to the first stop string once found
        self.sent = 0  # characters of self.text already returned
        self.stopped = False  # a stop string was found: generation should end

    def push(self, token_id: int) -> str:
        if self.stopped:
            return ""
        self._window.append(int(token_id))
        if self._decode_new(final=False):
            cut = self._first_stop()
            if cut is not None:
                self.text = self.text[:cut]
                self.stopped = True
                return self._take(len(self.text))
        return self._take(len(self.text) - _partial_stop(self.text, self.stops))

    def finish(self) -> str:
        """Generation ended (EOS or length): an incomplete character as U+FFFD, and whatever was
        held back."""
        if not self.stopped and self._decode_new(final=True):
            cut = self._first_stop()
            if cut is not None:
                self.text = self.text[:cut]
                self.stopped = True
        return self._take(len(self.text))

    def _decode_new(self, final: bool) -> bool:
        if self._read == len(self._window):
            return False
        before = self.decode(self._window[: self._read]) if self._read else ""
        after = self.decode(self._window)
        if len(after) <= len(before) or (after.endswith("\ufffd") and not final):
            return False  # nothing yet: a special token, or half a character
        self.text += after[len(before) :]
        self._window = self._window[self._read :]  # what was just decoded is the next one's context
        self._read = len(self._window)
        return True

    def _first_stop(self) -> int | None:
        start = max(0, self._searched - self._longest_stop + 1)
        found = [i for i in (self.text.find(s, start) for s in self.stops) if i >= 0]
        self._searched = len(self.text)
        return min(found) if found else None

    def _take(self, upto: int) -> str:
        if upto <= self.sent:
            return ""
        delta, self.sent = self.text[self.sent : upto], upto
        return delta


def _partial_stop(text: str, stops: Sequence[str]) -> int:
    """Length of the longest tail of `text` that is a proper prefix of a stop string."""
    held = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), held, -1):
            if text.endswith(stop[:k]):
                held = k
                break
    return held


# ---- responses ------------------------------------------------------------------------------------


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def models_list(model_ids: Sequence[str], created: int, owned_by: str = "neuro-dask") -> dict[str, Any]:
    return {"object": "list", "data": [model_card(m, created, owned_by) for m in model_ids]}


def model_card(model_id: str, created: int, owned_by: str = "neuro-dask") -> dict[str, Any]:
    return {"id": model_id, "object": "model", "created": created, "owned_by": owned_by}


def completion_response(
    id: str, created: int, model: str, text: str, finish_reason: str, usage_: Mapping[str, int]
) -> dict[str, Any]:
    return {
        "id": id,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}],
        "usage": dict(usage_),
        "system_fingerprint": None,
    }


def completion_chunk(id: str, created: int, model: str, text: str, finish_reason: str | None = None) -> dict[str, Any]:
    return {
        "id": id,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}],
        "system_fingerprint": None,
    }


def chat_response(
    id: str, created: int, model: str, text: str, finish_reason: str, usage_: Mapping[str, int]
) -> dict[str, Any]:
    return {
        "id": id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text, "refusal": None},
                "logprobs": None,
                "finish_reason": finish_reason,
            }
        ],
        "usage": dict(usage_),
        "system_fingerprint": None,
    }


def chat_chunk(
    id: str, created: int, model: str, delta: Mapping[str, str], finish_reason: str | None = None
) -> dict[str, Any]:
    return {
        "id": id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "delta": dict(delta), "logprobs": None, "finish_reason": finish_reason}],
        "system_fingerprint": None,
    }


def usage_chunk(id: str, created: int, model: str, object: str, usage_: Mapping[str, int]) -> dict[str, Any]:
    """The last chunk when stream_options.include_usage is set: no choices, the usage."""
    return {
        "id": id,
        "object": object,
        "created": created,
        "model": model,
        "choices": [],
        "usage": dict(usage_),
        "system_fingerprint": None,
    }


def sse(payload: Mapping[str, Any]) -> bytes:
    """One server-sent event."""
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"


SSE_DONE = b"data: [DONE]\n\n"
