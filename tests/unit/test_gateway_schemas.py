"""Request validation, sampling defaults and response shapes of the OpenAI gateway."""

from __future__ import annotations

import json
from typing import Any

import pytest
from pydantic import ValidationError
from starlette.responses import JSONResponse

import switchyard.router.gateway as gateway
from switchyard.errors import ContextLengthError, InvalidRequestError
from switchyard.router.gateway.responses import DONE, ChunkEncoder, CompactJSONResponse, json_bytes
from switchyard.router.gateway.schemas import (
    IGNORED_FIELDS,
    ChatCompletionRequest,
    CompletionRequest,
    parse_request,
)


def completion(**fields: Any) -> CompletionRequest:
    body = {"model": "m", "prompt": "hi", **fields}
    return parse_request(CompletionRequest, json.dumps(body).encode(), max_stop_strings=4)


def chat(**fields: Any) -> ChatCompletionRequest:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], **fields}
    return parse_request(ChatCompletionRequest, json.dumps(body).encode(), max_stop_strings=4)


def rejected(fn: Any, **fields: Any) -> InvalidRequestError:
    with pytest.raises(InvalidRequestError) as info:
        fn(**fields)
    return info.value


def test_package_all_is_sorted() -> None:
    assert gateway.__all__ == sorted(gateway.__all__)


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [("text", "text"), (["text"], "text"), ([1, 2, 3], [1, 2, 3])],
)
def test_prompt_forms(prompt: Any, expected: Any) -> None:
    """A string, a one-string list and a token-ID list are accepted."""
    assert completion(prompt=prompt).prompt == expected


@pytest.mark.parametrize(
    ("fields", "param", "fragment"),
    [
        ({"prompt": ["a", "b"]}, "prompt", "batched prompts are not supported"),
        ({"prompt": []}, "prompt", "prompt must be"),
        ({"prompt": [1, "a"]}, "prompt", "prompt must be"),
        ({"prompt": 5}, "prompt", "prompt must be"),
        ({"max_tokens": 0}, "max_tokens", "greater than or equal to 1"),
        ({"max_tokens": "16"}, "max_tokens", "valid integer"),
        ({"temperature": -0.5}, "temperature", "greater than or equal to 0"),
        ({"temperature": 2.5}, "temperature", "less than or equal to 2"),
        ({"top_p": 0}, "top_p", "greater than 0"),
        ({"top_k": -2}, "top_k", "greater than or equal to -1"),
        ({"n": 2}, "n", "n > 1 is not supported"),
        ({"logprobs": 1}, "logprobs", "logprobs is not supported"),
        ({"echo": True}, "echo", "echo is not supported"),
        ({"best_of": 3}, "best_of", "best_of is not supported"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop", "at most 4 stop strings"),
        ({"stop": [""]}, "stop", "must not be empty"),
        ({"stop": 3}, "stop", "string or a list of strings"),
        ({"stream_options": {"include_usage": True}}, "", "only allowed when stream is true"),
        ({"stream": True, "stream_options": {"bogus": 1}}, "stream_options.bogus", "unrecognized"),
        ({"tools": [], "functions": []}, "tools", "unrecognized request argument(s): tools, functions"),
        ({"repetition_penalty": 0}, "repetition_penalty", "greater than 0"),
        ({"seed": 2**64}, "seed", "less than"),
    ],
)
def test_completion_rejections_name_the_field(fields: dict[str, Any], param: str, fragment: str) -> None:
    """Each invalid input is one 400 whose message says what is wrong and whose param names the field."""
    err = rejected(completion, **fields)
    assert fragment in err.message
    assert (err.param or "") == param


def test_missing_required_field_is_named() -> None:
    err = rejected(lambda: parse_request(CompletionRequest, b'{"model": "m"}', max_stop_strings=4))
    assert err.message == "missing required parameter: 'prompt'"
    assert err.param == "prompt"


@pytest.mark.parametrize(
    ("body", "fragment"),
    [(b"{not json", "malformed JSON body"), (b"[1, 2]", "must be a JSON object"), (b"", "malformed JSON")],
)
def test_malformed_bodies(body: bytes, fragment: str) -> None:
    err = rejected(lambda: parse_request(CompletionRequest, body, max_stop_strings=4))
    assert fragment in err.message


def test_harmless_openai_fields_are_ignored() -> None:
    """Bookkeeping fields such as metadata or store are accepted and dropped."""
    req = completion(**{name: None for name in IGNORED_FIELDS}, user="u1")
    assert req.user == "u1"


def test_off_values_of_unsupported_features_pass() -> None:
    """Clients that send n=1, logprobs=null, echo=false or best_of=1 are not punished."""
    completion(n=1, logprobs=None, echo=False, best_of=1, suffix=None)
    chat(n=1, logprobs=False, top_logprobs=None)


def test_chat_content_parts_are_joined_and_developer_maps_to_system() -> None:
    parts = [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]
    req = chat(messages=[{"role": "developer", "content": "be brief"}, {"role": "user", "content": parts}])
    assert [m.for_template() for m in req.messages] == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "a\nb"},
    ]


@pytest.mark.parametrize(
    ("messages", "param", "fragment"),
    [
        ([], "messages", "at least 1 item"),
        (
            [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}],
            "messages.0.content",
            "only text",
        ),
        ([{"role": "robot", "content": "x"}], "messages.0.role", "Input should be"),
        ([{"role": "user"}], "messages.0.content", "missing required parameter"),
    ],
)
def test_chat_message_rejections(messages: list[Any], param: str, fragment: str) -> None:
    err = rejected(chat, messages=messages)
    assert fragment in err.message
    assert err.param == param


def test_message_count_is_capped_before_messages_are_validated() -> None:
    messages = [{"role": "user", "content": "hi"}] * 5
    body = json.dumps({"model": "m", "messages": messages}).encode()
    with pytest.raises(InvalidRequestError, match="at most 4 messages are allowed, got 5") as err:
        parse_request(ChatCompletionRequest, body, max_stop_strings=4, max_chat_messages=4)
    assert err.value.param == "messages"
    assert len(parse_request(ChatCompletionRequest, body, max_stop_strings=4).messages) == 5  # no cap given


def test_bad_messages_stop_validation_at_the_first() -> None:
    """The first bad message ends it: 20,000 empty objects cost 40,000 error records before."""
    body = json.dumps({"model": "m", "messages": [{}] * 20_000}).encode()
    with pytest.raises(InvalidRequestError, match=r"messages\.0\.role") as err:
        parse_request(ChatCompletionRequest, body, max_stop_strings=4)
    cause = err.value.__cause__
    assert isinstance(cause, ValidationError) and cause.error_count() == 2  # the first message's two


def test_chat_logprobs_rejected() -> None:
    assert "logprobs is not supported" in rejected(chat, logprobs=True).message


def test_sampling_defaults() -> None:
    """Unset fields get the engine defaults; -1 top_k means disabled (0)."""
    s = completion(top_k=-1).sampling_options(prompt_len=10, context=100)
    assert (s.max_tokens, s.temperature, s.top_p, s.top_k, s.seed, s.ignore_eos) == (
        16,
        1.0,
        1.0,
        0,
        None,
        False,
    )
    assert (s.presence_penalty, s.frequency_penalty, s.repetition_penalty, s.min_tokens) == (0.0, 0.0, 1.0, 0)


def test_default_max_tokens_is_the_room_left_for_chat_and_16_for_completions() -> None:
    assert chat().sampling_options(prompt_len=30, context=100).max_tokens == 70
    assert completion().sampling_options(prompt_len=30, context=100).max_tokens == 16
    assert completion().sampling_options(prompt_len=90, context=100).max_tokens == 10


def test_max_completion_tokens_wins_over_max_tokens() -> None:
    assert (
        chat(max_tokens=5, max_completion_tokens=7).sampling_options(prompt_len=1, context=100).max_tokens
        == 7
    )


def test_prompt_filling_the_context_states_both_lengths() -> None:
    with pytest.raises(ContextLengthError) as info:
        chat().sampling_options(prompt_len=120, context=100)
    assert "100 tokens" in info.value.message and "120 tokens" in info.value.message
    assert info.value.param == "messages"


def test_explicit_max_tokens_that_does_not_fit_is_rejected_not_clamped() -> None:
    with pytest.raises(ContextLengthError) as info:
        completion(max_tokens=50).sampling_options(prompt_len=60, context=100)
    msg = info.value.message
    assert "100 tokens" in msg and "110 were requested" in msg and "60 in the prompt" in msg
    assert info.value.param == "max_tokens"


def test_min_tokens_above_max_tokens_is_rejected() -> None:
    with pytest.raises(InvalidRequestError, match="min_tokens"):
        completion(max_tokens=4, min_tokens=5).sampling_options(prompt_len=1, context=100)


# -- response shapes ------------------------------------------------------------------------


def sse_json(chunk: bytes) -> dict[str, Any]:
    assert chunk.startswith(b"data: ") and chunk.endswith(b"\n\n")
    parsed: dict[str, Any] = json.loads(chunk[6:])
    return parsed


def test_chat_chunks_have_openai_shape() -> None:
    enc = ChunkEncoder(chat=True, request_id="chatcmpl-1", model="m", created=7, include_usage=True)
    role, delta, finish = sse_json(enc.role()), sse_json(enc.delta('é"\n')), sse_json(enc.finish("stop"))
    assert role["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert delta == {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "created": 7,
        "model": "m",
        "choices": [{"index": 0, "delta": {"content": 'é"\n'}, "logprobs": None, "finish_reason": None}],
        "usage": None,
    }
    assert finish["choices"][0] == {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}
    usage = sse_json(enc.usage({"prompt_tokens": 1}))
    assert usage["choices"] == [] and usage["usage"] == {"prompt_tokens": 1}
    assert DONE == b"data: [DONE]\n\n"


def test_completion_chunks_have_openai_shape() -> None:
    enc = ChunkEncoder(chat=False, request_id="cmpl-1", model="m", created=7, include_usage=False)
    assert enc.role() == b""
    delta = sse_json(enc.delta("hi"))
    assert delta["object"] == "text_completion" and "usage" not in delta
    assert delta["choices"] == [{"index": 0, "text": "hi", "logprobs": None, "finish_reason": None}]
    assert sse_json(enc.finish("length"))["choices"][0]["finish_reason"] == "length"


def test_json_bytes_are_what_starlette_would_write() -> None:
    """msgspec encodes the responses (a tenth of the cost); the bytes must not change."""
    texts = ["", "plain", 'quote " and \\ slash /', "tab\tnl\ncr\r\x00\x1f\x7f", "é你🎉"]
    texts.append("\u2028\u2029\ufeff")
    for text in texts:
        body = {"id": "x", "choices": [{"text": text, "logprobs": None, "index": 0}], "n": 3, "ok": True}
        assert json_bytes(body) == JSONResponse(body).body
        assert json_bytes(text) == json.dumps(text, ensure_ascii=False).encode()
        assert CompactJSONResponse(body).body == JSONResponse(body).body
