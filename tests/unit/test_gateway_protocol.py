"""The gateway's protocol module, pure: validation, shapes, chat templates, stop strings, usage."""

from __future__ import annotations

import json

import pytest

from neuro_dask.gateway.protocol import (
    DEFAULT_CHAT_TEMPLATE,
    SSE_DONE,
    ChatTemplate,
    ProtocolError,
    TextAssembler,
    chat_chunk,
    chat_response,
    check_prompt_ids,
    completion_chunk,
    completion_response,
    drop_duplicate_bos,
    error_body,
    error_for_exception,
    load_chat_template,
    models_list,
    parse_chat,
    parse_completion,
    parse_json,
    resolve_max_tokens,
    sse,
    usage,
    usage_chunk,
)

MODELS = ["adder"]


def completion(**fields):
    return parse_completion({"model": "adder", "prompt": "1+2=", **fields}, MODELS)


def chat(**fields):
    return parse_chat({"model": "adder", "messages": [{"role": "user", "content": "1+2="}], **fields}, MODELS)


def refused(fn, *args, **kwargs) -> ProtocolError:
    with pytest.raises(ProtocolError) as info:
        fn(*args, **kwargs)
    err = info.value
    body = err.body()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    return err


# ---- parsing and validation -----------------------------------------------------------------------


def test_a_completion_request_with_defaults():
    req = completion()
    assert req.model == "adder" and req.prompt == "1+2="
    p = req.params
    assert (p.max_tokens, p.temperature, p.top_p, p.seed, p.stop, p.stream, p.include_usage) == (
        None,
        1.0,
        None,
        None,
        (),
        False,
        False,
    )
    assert p.do_sample  # OpenAI's default temperature is 1


def test_every_sampling_field_is_read():
    p = completion(
        max_tokens=7,
        temperature=0.5,
        top_p=0.9,
        top_k=3,
        seed=11,
        stop=["\n", "x"],
        stream=True,
        stream_options={"include_usage": True},
        n=1,
        user="me",
        presence_penalty=0,
    ).params
    assert (p.max_tokens, p.temperature, p.top_p, p.top_k, p.seed, p.stop, p.stream, p.include_usage) == (
        7,
        0.5,
        0.9,
        3,
        11,
        ("\n", "x"),
        True,
        True,
    )
    assert p.model_options() == {"do_sample": True, "temperature": 0.5, "top_p": 0.9, "top_k": 3, "seed": 11}


@pytest.mark.parametrize(
    "fields", [{"temperature": 0}, {"temperature": 0.0, "top_p": 0.5}, {"top_p": 0}, {"temperature": 1e-300}]
)
def test_temperature_zero_or_top_p_zero_is_greedy(fields):
    p = completion(**fields).params
    assert not p.do_sample
    assert p.model_options() == {"do_sample": False, "seed": None}


def test_top_p_one_means_no_nucleus_filter():
    assert completion(top_p=1, temperature=1).params.model_options()["top_p"] is None


def test_null_fields_mean_not_given():
    p = completion(max_tokens=None, temperature=None, stop=None, seed=None, n=None, stream=None).params
    assert (p.max_tokens, p.temperature, p.stop, p.stream) == (None, 1.0, (), False)


@pytest.mark.parametrize(
    "prompt, expected",
    [
        ("abc", "abc"),
        (["abc"], "abc"),
        ([1, 5, 6], (1, 5, 6)),
        ([[1, 5]], (1, 5)),
        ("", ""),
    ],
)
def test_prompt_forms(prompt, expected):
    assert completion(prompt=prompt).prompt == expected


@pytest.mark.parametrize(
    "field, value, param",
    [
        ("max_tokens", -1, "max_tokens"),
        ("max_tokens", 0, "max_tokens"),
        ("max_tokens", 2.5, "max_tokens"),
        ("max_tokens", 3.0, "max_tokens"),
        ("max_tokens", "5", "max_tokens"),
        ("max_tokens", True, "max_tokens"),
        ("temperature", -0.1, "temperature"),
        ("temperature", 2.5, "temperature"),
        ("temperature", "hot", "temperature"),
        ("temperature", float("nan"), "temperature"),
        ("top_p", 1.5, "top_p"),
        ("top_p", -0.5, "top_p"),
        ("top_k", 0, "top_k"),
        ("seed", 1.5, "seed"),
        ("seed", 2**64, "seed"),
        ("n", 2, "n"),
        ("n", 0, "n"),
        ("stream", "yes", "stream"),
        ("stop", 5, "stop"),
        ("stop", ["a", 1], "stop"),
        ("stop", ["a", "b", "c", "d", "e"], "stop"),
        ("stop", "", "stop"),
        ("stream_options", [], "stream_options"),
        ("presence_penalty", 0.5, "presence_penalty"),
        ("frequency_penalty", 1, "frequency_penalty"),
        ("logit_bias", {"5": 1}, "logit_bias"),
        ("echo", True, "echo"),
        ("best_of", 3, "best_of"),
        ("logprobs", 2, "logprobs"),
        ("prompt", ["a", "b"], "prompt"),
        ("prompt", 5, "prompt"),
        ("prompt", None, "prompt"),
        ("prompt", [1, "a"], "prompt"),
    ],
)
def test_bad_completion_fields_are_400_naming_the_field(field, value, param):
    err = refused(completion, **{field: value})
    assert err.status == 400 and err.type == "invalid_request_error" and err.param == param


@pytest.mark.parametrize("data", [{"prompt": "x"}, {"model": "", "prompt": "x"}, {"model": 5, "prompt": "x"}])
def test_a_missing_model_is_400(data):
    err = refused(parse_completion, data, MODELS)
    assert (err.status, err.param) == (400, "model")


def test_an_unknown_model_is_404_model_not_found():
    err = refused(parse_completion, {"model": "gpt-4", "prompt": "x"}, MODELS)
    assert (err.status, err.param, err.code) == (404, "model", "model_not_found")
    assert "adder" in err.message
    err = refused(parse_chat, {"model": "gpt-4", "messages": [{"role": "user", "content": "x"}]}, MODELS)
    assert err.status == 404


def test_chat_messages_are_normalized_to_text():
    req = parse_chat(
        {
            "model": "adder",
            "messages": [
                {"role": "system", "content": "be brief"},
                {
                    "role": "user",
                    "content": [{"type": "text", "text": "1+"}, {"type": "text", "text": "2="}],
                    "name": "ann",
                },
                {"role": "assistant", "content": None},
            ],
        },
        MODELS,
    )
    assert req.messages == (
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "1+2=", "name": "ann"},
        {"role": "assistant", "content": ""},
    )


def test_chat_prefers_max_completion_tokens():
    assert chat(max_tokens=3).params.max_tokens == 3
    assert chat(max_completion_tokens=4, max_tokens=3).params.max_tokens == 4
    assert refused(chat, max_completion_tokens=-2).param == "max_completion_tokens"


@pytest.mark.parametrize(
    "messages, param",
    [
        (None, "messages"),
        ([], "messages"),
        ("hi", "messages"),
        (["hi"], "messages[0]"),
        ([{"role": "wizard", "content": "x"}], "messages[0].role"),
        ([{"content": "x"}], "messages[0].role"),
        ([{"role": "user", "content": 5}], "messages[0].content"),
        ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}], "messages[0].content"),
    ],
)
def test_bad_chat_messages_are_400(messages, param):
    err = refused(parse_chat, {"model": "adder", "messages": messages}, MODELS)
    assert (err.status, err.param) == (400, param)


@pytest.mark.parametrize("field, value", [("tools", [{"type": "function"}]), ("logprobs", True), ("n", 3)])
def test_unsupported_chat_features_are_refused(field, value):
    assert refused(chat, **{field: value}).status == 400


@pytest.mark.parametrize(
    "body",
    [
        b"{",
        b"not json",
        b"",
        b"\xff\xfe",
        b"[1, 2]",
        b'"text"',
        b"null",
        pytest.param(b"[" * 100_000 + b"]" * 100_000, id="deeply-nested"),
    ],
)
def test_malformed_json_is_400(body):
    err = refused(parse_json, body)
    assert (err.status, err.code) == (400, "invalid_json")


def test_parse_json_reads_an_object():
    assert parse_json(b'{"a": 1}') == {"a": 1}


def test_prompt_ids_must_be_in_the_vocabulary_and_not_empty():
    check_prompt_ids([1, 2, 14], 15)
    assert refused(check_prompt_ids, [], 15).status == 400
    err = refused(check_prompt_ids, [1, 15], 15)
    assert err.status == 400 and "15" in err.message


# ---- context length -------------------------------------------------------------------------------


def test_max_tokens_resolution():
    assert resolve_max_tokens(5, 10, 64, 16) == 5
    assert resolve_max_tokens(54, 10, 64, 16) == 54  # exactly fills the context
    assert resolve_max_tokens(None, 10, 64, 16) == 16  # the endpoint's default
    assert resolve_max_tokens(None, 60, 64, 16) == 4  # ... capped by the room left
    assert resolve_max_tokens(None, 10, 64, None) == 54  # chat: all the room left


@pytest.mark.parametrize("requested, prompt", [(55, 10), (1, 64), (None, 64), (None, 70)])
def test_over_long_requests_are_context_length_exceeded(requested, prompt):
    err = refused(resolve_max_tokens, requested, prompt, 64, 16)
    assert (err.status, err.code) == (400, "context_length_exceeded")
    assert "64" in err.message


# ---- errors from the model ------------------------------------------------------------------------


def test_neuro_dask_errors_map_to_statuses():
    from neuro_dask.errors import GenerationOptionError, InputError, PromptTooLongError

    assert error_for_exception(PromptTooLongError(70, 64, 0)).code == "context_length_exceeded"
    assert error_for_exception(GenerationOptionError("top_k", 0, "bad")).status == 400
    assert error_for_exception(InputError("bad")).status == 400

    class PaymentRefusedError(Exception):  # matched by name, as the executor's own is
        pass

    err = error_for_exception(PaymentRefusedError("no funds"))
    assert (err.status, err.code, err.message) == (429, "insufficient_quota", "no funds")

    from neuro_dask.client.dispatch.scheduler_away import SchedulerAwayError

    away = error_for_exception(SchedulerAwayError("request begin", "tcp://s:1", 120.0, OSError("refused")))
    assert (away.status, away.code) == (503, "scheduler_unavailable") and "tcp://s:1" in away.message


def test_an_unexpected_error_is_a_500_that_hides_its_details():
    err = error_for_exception(KeyError("secret path /etc/x"))
    assert err.status == 500 and err.type == "server_error"
    assert "secret" not in err.message and "KeyError" in err.message
    same = ProtocolError(418, "teapot")
    assert error_for_exception(same) is same


def test_error_body_shape():
    assert error_body("m", param="p", code="c") == {
        "error": {"message": "m", "type": "invalid_request_error", "param": "p", "code": "c"}
    }


# ---- chat templates -------------------------------------------------------------------------------

MESSAGES = [{"role": "system", "content": "add"}, {"role": "user", "content": "1+2="}]


def test_the_default_template_writes_role_colon_content_lines():
    assert ChatTemplate().render(MESSAGES) == "system: add\nuser: 1+2=\nassistant:"
    assert ChatTemplate().render(MESSAGES, add_generation_prompt=False) == "system: add\nuser: 1+2=\n"
    assert ChatTemplate().source == DEFAULT_CHAT_TEMPLATE


def test_a_tokenizer_config_template_with_special_tokens():
    config = {
        "chat_template": "{{ bos_token }}{% for m in messages %}<{{ m.role }}>{{ m.content }}{{ eos_token }}"
        "{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}",
        "bos_token": {"content": "<s>", "lstrip": False},
        "eos_token": "</s>",
    }
    template = ChatTemplate.from_tokenizer_config(config)
    assert template.origin == "tokenizer_config.json"
    assert template.render(MESSAGES) == "<s><system>add</s><user>1+2=</s><assistant>"


def test_a_list_of_named_templates_uses_the_default_one():
    config = {"chat_template": [{"name": "tool_use", "template": "TOOLS"}, {"name": "default", "template": "D"}]}
    assert ChatTemplate.from_tokenizer_config(config).render(MESSAGES) == "D"


def test_a_config_without_a_template_gets_the_default():
    assert ChatTemplate.from_tokenizer_config({"bos_token": "<s>"}).origin == "default"


def test_raise_exception_in_a_template_is_a_400():
    template = ChatTemplate("{% if messages[0].role != 'user' %}{{ raise_exception('user first') }}{% endif %}x")
    err = refused(template.render, MESSAGES)
    assert err.status == 400 and "user first" in err.message


def test_a_template_is_sandboxed():
    sneaky = ChatTemplate("{{ ''.__class__.__mro__[1].__subclasses__() }}")
    assert refused(sneaky.render, MESSAGES).status == 400
    immutable = ChatTemplate("{% set _ = messages.append({'role': 'user', 'content': 'x'}) %}{{ messages|length }}")
    assert refused(immutable.render, MESSAGES).status == 400


def test_load_chat_template_from_a_folder(tmp_path):
    assert load_chat_template(tmp_path).origin == "default"
    assert load_chat_template(None).origin == "default"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "T{{ messages|length }}"}))
    assert load_chat_template(tmp_path).render(MESSAGES) == "T2"
    (tmp_path / "chat_template.jinja").write_text("J")  # what newer transformers write: it wins
    assert load_chat_template(tmp_path).render(MESSAGES) == "J"
    (tmp_path / "chat_template.jinja").unlink()
    (tmp_path / "tokenizer_config.json").write_text("{broken")
    assert load_chat_template(tmp_path).origin == "default"


def test_the_bundled_model_has_a_template_that_asks_the_last_user_problem():
    from neuro_dask.demo.addition import ASSET_DIR

    template = load_chat_template(ASSET_DIR)
    assert template.origin == "tokenizer_config.json"
    messages = [
        {"role": "system", "content": "You add."},
        {"role": "user", "content": "1+1="},
        {"role": "assistant", "content": "2"},
        {"role": "user", "content": " 12+30=\n"},
    ]
    assert template.render(messages) == "<s>12+30="


def test_a_duplicate_bos_is_dropped():
    assert drop_duplicate_bos([1, 1, 5], 1) == [1, 5]
    assert drop_duplicate_bos([1, 5], 1) == [1, 5]
    assert drop_duplicate_bos([1, 1, 5], None) == [1, 1, 5]
    assert drop_duplicate_bos([1], 1) == [1]


# ---- stop strings and incremental text ------------------------------------------------------------


def char_decode(vocab):
    return lambda ids: "".join(vocab[i] for i in ids)


def run_assembler(pieces, stops):
    vocab = dict(enumerate(pieces))
    assembler = TextAssembler(char_decode(vocab), stops)
    deltas = []
    for i in range(len(pieces)):
        deltas.append(assembler.push(i))
        if assembler.stopped:
            break
    deltas.append(assembler.finish())
    return assembler, deltas


def test_text_without_stops_streams_as_it_comes():
    assembler, deltas = run_assembler(["5", "7", "9"], ())
    assert deltas == ["5", "7", "9", ""] and assembler.text == "579" and not assembler.stopped


def test_the_text_is_cut_at_the_first_stop_string():
    assembler, deltas = run_assembler(["ab", "c\nd", "ef"], ["\n"])
    assert assembler.stopped and assembler.text == "abc"
    assert "".join(deltas) == "abc"


def test_the_earliest_of_several_stops_wins():
    assembler, _ = run_assembler(["xx", "END", "yy", "STOP"], ["STOP", "END"])
    assert assembler.text == "xx"


def test_a_possible_stop_prefix_is_held_back_then_released():
    assembler, deltas = run_assembler(["a", "E", "N", "b", "c"], ["END"])
    assert deltas[:4] == ["a", "", "", "ENb"]  # "E", "EN" could have become "END"
    assert assembler.text == "aENbc" and not assembler.stopped


def test_a_stop_split_over_tokens_never_leaks():
    assembler, deltas = run_assembler(["12", "3E", "N", "D4"], ["END"])
    assert deltas == ["12", "3", "", "", ""] and assembler.text == "123" and assembler.stopped


def test_a_held_back_tail_is_flushed_at_the_end():
    assembler, deltas = run_assembler(["a", "E"], ["END"])
    assert deltas == ["a", "", "E"] and assembler.text == "aE"


def byte_decode(vocab):
    return lambda ids: b"".join(vocab[i] for i in ids).decode("utf-8", errors="replace")


def test_an_incomplete_character_is_held_back():
    vocab = {0: b"a", 1: b"\xc3", 2: b"\xa9", 3: b"!"}  # "é" is two bytes, two tokens
    assembler = TextAssembler(byte_decode(vocab))
    assert [assembler.push(t) for t in (0, 1, 2, 3)] == ["a", "", "\u00e9", "!"]
    assert assembler.text == "a\u00e9!"


def test_an_incomplete_character_at_the_end_comes_out_as_a_replacement():
    assembler = TextAssembler(byte_decode({0: b"a", 1: b"\xc3"}))
    assert [assembler.push(0), assembler.push(1), assembler.finish()] == ["a", "", "\ufffd"]


def test_the_prompt_gives_the_first_token_its_context():
    # SentencePiece drops the leading space of a sequence's first word: "_world" alone is "world".
    vocab = {0: "_Hello", 1: "_world", 2: "!"}

    def decode(ids):
        return "".join(vocab[i] for i in ids).replace("_", " ").removeprefix(" ")

    assembler = TextAssembler(decode, context=[0])
    assert [assembler.push(1), assembler.push(2)] == [" world", "!"]
    assert TextAssembler(decode).push(1) == "world"  # without the prompt's context


def test_decoding_is_incremental():
    calls = []

    def decode(ids):
        calls.append(len(ids))
        return "x" * len(ids)

    assembler = TextAssembler(decode, ["yy"], context=list(range(100)))
    for t in range(500):
        assembler.push(t)
    assert assembler.text == "x" * 500
    assert max(calls) <= 6  # each decode sees a window of a few tokens, not all 500


def test_the_bundled_tokenizer_streams_what_it_decodes():
    from neuro_dask.demo.addition import build_tokenizer
    from neuro_dask.model.tokenizer import Tokenizer

    tok = Tokenizer(build_tokenizer())
    prompt, answer = tok.encode("123+456="), tok.encode("579")[1:]  # without the BOS
    assembler = TextAssembler(tok.decode, context=prompt)
    assert [assembler.push(t) for t in answer] == ["5", "7", "9"]
    assert assembler.finish() == "" and assembler.text == tok.decode(answer) == "579"


def test_deltas_join_to_the_text_for_random_cuts():
    import random

    rng = random.Random(0)
    for _ in range(300):
        pieces = ["".join(rng.choice("ab\n") for _ in range(rng.randint(1, 3))) for _ in range(rng.randint(1, 8))]
        stops = rng.sample(["a\n", "bb", "\n\n", "aba"], rng.randint(0, 2))
        assembler, deltas = run_assembler(pieces, stops)
        full = "".join(pieces)
        cuts = [i for i in (full.find(s) for s in stops) if i >= 0]
        assert "".join(deltas) == assembler.text == (full[: min(cuts)] if cuts else full)
        assert not any(s in assembler.text for s in stops)


# ---- responses ------------------------------------------------------------------------------------


def test_usage_counts():
    assert usage(9, 4) == {"prompt_tokens": 9, "completion_tokens": 4, "total_tokens": 13}


def test_completion_shapes():
    body = completion_response("cmpl-1", 5, "adder", "579", "stop", usage(9, 4))
    assert body == {
        "id": "cmpl-1",
        "object": "text_completion",
        "created": 5,
        "model": "adder",
        "choices": [{"index": 0, "text": "579", "logprobs": None, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 9, "completion_tokens": 4, "total_tokens": 13},
        "system_fingerprint": None,
    }
    chunk = completion_chunk("cmpl-1", 5, "adder", "5")
    assert chunk["object"] == "text_completion" and chunk["choices"][0] == {
        "index": 0,
        "text": "5",
        "logprobs": None,
        "finish_reason": None,
    }
    assert "usage" not in chunk


def test_chat_shapes():
    body = chat_response("chatcmpl-1", 5, "adder", "42", "length", usage(7, 3))
    assert body["object"] == "chat.completion"
    assert body["choices"] == [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "42", "refusal": None},
            "logprobs": None,
            "finish_reason": "length",
        }
    ]
    chunk = chat_chunk("chatcmpl-1", 5, "adder", {"content": "4"})
    assert chunk["object"] == "chat.completion.chunk"
    assert chunk["choices"] == [{"index": 0, "delta": {"content": "4"}, "logprobs": None, "finish_reason": None}]
    last = usage_chunk("chatcmpl-1", 5, "adder", "chat.completion.chunk", usage(7, 3))
    assert last["choices"] == [] and last["usage"]["total_tokens"] == 10


def test_models_list_shape():
    assert models_list(["adder"], 5) == {
        "object": "list",
        "data": [{"id": "adder", "object": "model", "created": 5, "owned_by": "neuro-dask"}],
    }


def test_server_sent_events():
    assert sse({"a": 1}) == b'data: {"a":1}\n\n'
    assert SSE_DONE == b"data: [DONE]\n\n"
    assert json.loads(sse({"text": "ü\n"})[6:]) == {"text": "ü\n"}
