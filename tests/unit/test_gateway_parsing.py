"""``BodyParser``: small bodies parsed inline, large ones in the helper process, which restarts.

The helper is a real process (about a second to start); each test starts at most two.
"""

from __future__ import annotations

import asyncio
import json
import signal
from collections.abc import AsyncIterator

import pytest

from switchyard.errors import CapacityError, InvalidRequestError
from switchyard.router.gateway.parsing import INLINE_PARSE_BYTES, BodyParser
from switchyard.router.gateway.schemas import ChatCompletionRequest, CompletionRequest


@pytest.fixture
async def parser() -> AsyncIterator[BodyParser]:
    p = BodyParser(max_stop_strings=2, max_chat_messages=3)
    yield p
    await p.aclose()


def padded(body: object) -> bytes:
    """``body`` as JSON with whitespace after it: large enough for the helper, same content."""
    return json.dumps(body).encode() + b" " * (INLINE_PARSE_BYTES + 1)


async def test_small_bodies_never_start_the_helper(parser: BodyParser) -> None:
    req = await parser.parse(CompletionRequest, json.dumps({"model": "m", "prompt": "hi"}).encode())
    assert req.prompt == "hi" and parser._helper is None


async def test_large_bodies_are_parsed_in_the_helper_with_the_same_limits(parser: BodyParser) -> None:
    chat = {"model": "m", "messages": [{"role": "user", "content": [{"type": "text", "text": "a"}]}]}
    req = await parser.parse(ChatCompletionRequest, padded(chat))
    assert isinstance(req, ChatCompletionRequest) and req.messages[0].content == "a"
    assert parser._helper is not None and parser._helper.proc.returncode is None
    with pytest.raises(InvalidRequestError, match="at most 3 messages are allowed, got 4") as err:
        await parser.parse(ChatCompletionRequest, padded({**chat, "messages": chat["messages"] * 4}))
    assert err.value.param == "messages"
    with pytest.raises(InvalidRequestError, match="at most 2 stop strings"):
        await parser.parse(CompletionRequest, padded({"model": "m", "prompt": "x", "stop": ["a", "b", "c"]}))
    many = await asyncio.gather(
        *(parser.parse(CompletionRequest, padded({"model": "m", "prompt": [i + 1]})) for i in range(20))
    )
    assert [r.prompt for r in many] == [[i + 1] for i in range(20)]  # replies matched in order


async def test_a_dead_helper_fails_its_waiters_and_is_replaced(parser: BodyParser) -> None:
    body = padded({"model": "m", "prompt": "hi"})
    await parser.parse(CompletionRequest, body)
    helper = parser._helper
    assert helper is not None
    helper.proc.kill()
    with pytest.raises(CapacityError, match="retry"):
        await parser.parse(CompletionRequest, body)
    req = await parser.parse(CompletionRequest, body)
    assert req.prompt == "hi" and parser._helper is not helper
    replacement = parser._helper
    assert replacement is not None
    await parser.aclose()
    assert replacement.proc.returncode is not None  # aclose() ended it


async def test_the_helper_outlasts_a_group_signal_until_the_gateway_closes_it(parser: BodyParser) -> None:
    """SIGINT and SIGTERM sent to the whole process group (Ctrl-C; systemd's control-group
    stop) start the gateway's graceful stop; the helper keeps parsing large bodies for the
    requests in their grace period, and ends when the gateway closes it."""
    body = padded({"model": "m", "prompt": "hi"})
    await parser.parse(CompletionRequest, body)
    helper = parser._helper
    assert helper is not None
    for sig in (signal.SIGINT, signal.SIGTERM):
        helper.proc.send_signal(sig)
    await asyncio.sleep(0.3)
    assert helper.proc.returncode is None
    req = await parser.parse(CompletionRequest, body)
    assert req.prompt == "hi" and parser._helper is helper
    await parser.aclose()
    assert helper.proc.returncode == 0
