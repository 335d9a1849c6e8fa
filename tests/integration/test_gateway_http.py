"""The OpenAI gateway for real: uvicorn on port 0, the official ``openai`` client and raw httpx.

The router core is a ``FakeCore`` that implements ``RouterCoreLike`` over a scripted token
source (text pieces tokenized by the tiny model's tokenizer, one engine delta per piece), and
records how each request's stream ended: ``finished`` when the gateway drained it, ``aborted``
when the gateway closed it early (stop string, disconnect), which is what the real core turns
into an engine abort.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import socket
import time
import tracemalloc
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from switchyard import metrics
from switchyard.config import GatewayConfig
from switchyard.errors import CapacityError, EngineDeadError
from switchyard.messages import EngineOutput, FinishReason, InstanceInfo, Membership, RoutingRequest
from switchyard.router.gateway import TokenizerAdapter, build_gateway_app, serve_gateway, stop_gateway

MODEL = "tiny"
CONTEXT = 256


@dataclass
class Script:
    """What the fake engine emits: one delta per text piece, then EOS unless ``eos`` is False."""

    pieces: list[str] = field(default_factory=lambda: ["Hello", " world", "!"])
    eos: bool = True
    repeat: bool = False  # cycle the pieces until max_tokens (long-running requests)
    delay_s: float = 0.0
    fail_after: int | None = None  # raise EngineDeadError before this delta


class FakeCore:
    """A ``RouterCoreLike`` backed by a scripted token source."""

    def __init__(self, tok: TokenizerAdapter) -> None:
        self.tok = tok
        self.info = InstanceInfo("fake-0", "127.0.0.1:1", MODEL, max_model_len=CONTEXT)
        self.unready_reason: str | None = None
        self.membership = Membership(version=3, instances=(self.info,))
        self.script = Script()
        self.raise_on_generate: Exception | None = None
        self.requests: list[RoutingRequest] = []
        self.ended: dict[str, str] = {}
        self._ended_event = asyncio.Event()
        self._started_event = asyncio.Event()

    def served_models(self) -> dict[str, InstanceInfo]:
        return {MODEL: self.info}

    def recent_decisions(self) -> list[dict[str, Any]]:
        return [{"request_id": r.request_id, "instance": "fake-0", "outcome": "load"} for r in self.requests]

    def generate(self, req: RoutingRequest) -> AsyncIterator[EngineOutput]:
        if self.raise_on_generate is not None:
            raise self.raise_on_generate
        self.requests.append(req)
        self._started_event.set()
        return self._stream(req, self.script)

    async def _stream(self, req: RoutingRequest, script: Script) -> AsyncIterator[EngineOutput]:
        deltas = [self.tok.encode(p, add_special_tokens=False) for p in script.pieces]
        if script.eos:
            deltas.append([self.tok.eos_token_id or 2])
        emitted, i, outcome = 0, 0, "aborted"
        try:
            while i < len(deltas) or script.repeat:
                if i == script.fail_after:
                    raise EngineDeadError("instance fake-0 died")
                await asyncio.sleep(script.delay_s)
                ids = deltas[i % len(deltas)][: req.sampling.max_tokens - emitted]
                emitted += len(ids)
                i += 1
                reason = None
                if emitted >= req.sampling.max_tokens:
                    reason = FinishReason.LENGTH
                elif i == len(deltas) and not script.repeat:
                    reason = FinishReason.STOP if script.eos else FinishReason.LENGTH
                prompt_len = len(req.prompt_token_ids)
                yield EngineOutput(req.request_id, ids, reason is not None, reason, prompt_len, 2, "fake-0")
                if reason is not None:
                    outcome = "finished"
                    return
        finally:
            self.ended[req.request_id] = outcome
            self._ended_event.set()

    async def wait_ended(self, n: int = 1, *, within_s: float = 5.0) -> list[str]:
        """How the first ``n`` core streams ended, once they have."""
        async with asyncio.timeout(within_s):
            while len(self.ended) < n:
                self._ended_event.clear()
                await self._ended_event.wait()
        return list(self.ended.values())

    async def wait_started(self, *, within_s: float = 5.0) -> None:
        async with asyncio.timeout(within_s):
            await self._started_event.wait()


@dataclass
class Gateway:
    core: FakeCore
    url: str
    server: tuple[Any, asyncio.Task[None]]
    clients: list[openai.AsyncOpenAI] = field(default_factory=list)

    def client(self, api_key: str = "unused") -> openai.AsyncOpenAI:
        """An official client on this gateway, closed by the fixture."""
        client = openai.AsyncOpenAI(base_url=f"{self.url}/v1", api_key=api_key, max_retries=0)
        self.clients.append(client)
        return client


StartGateway = Callable[..., Awaitable[Gateway]]


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir: Path) -> TokenizerAdapter:
    return TokenizerAdapter.from_model_dir(tiny_model_dir)


@pytest.fixture
async def start_gateway(tokenizer: TokenizerAdapter) -> AsyncIterator[StartGateway]:
    """Start gateways with config overrides; stop them after the test, with no request left open."""
    running: list[tuple[Any, asyncio.Task[None], Gateway]] = []

    async def start(**config: Any) -> Gateway:
        core = FakeCore(tokenizer)
        cfg = GatewayConfig(host="127.0.0.1", port=0, **config)
        app = build_gateway_app(core, tokenizers={MODEL: tokenizer}, config=cfg)
        server, task, port = await serve_gateway(app, cfg, graceful_shutdown_s=1)
        gateway = Gateway(core, f"http://127.0.0.1:{port}", (server, task))
        running.append((server, task, gateway))
        return gateway

    yield start
    for server, task, gateway in running:
        for client in gateway.clients:
            await client.close()
        await stop_gateway(server, task)
        ended, requests = gateway.core.ended, gateway.core.requests
        assert set(ended) == {r.request_id for r in requests}, "a core stream was left open"


@pytest.fixture
async def gw(start_gateway: StartGateway) -> Gateway:
    return await start_gateway()


# -- the official client --------------------------------------------------------------------


async def test_completion_via_openai_client(gw: Gateway, tokenizer: TokenizerAdapter) -> None:
    """A non-streamed completion returns the scripted text, EOS stripped, with exact usage."""
    resp = await gw.client().completions.create(model=MODEL, prompt="the quick brown fox", max_tokens=20)
    assert resp.id.startswith("cmpl-") and resp.object == "text_completion"
    assert resp.choices[0].text == "Hello world!"
    assert resp.choices[0].finish_reason == "stop"
    prompt_len = len(tokenizer.encode("the quick brown fox"))
    completion_len = (
        len(tokenizer.encode("Hello", add_special_tokens=False))
        + len(tokenizer.encode(" world", add_special_tokens=False))
        + len(tokenizer.encode("!", add_special_tokens=False))
        + 1
    )  # + EOS
    assert resp.usage is not None
    assert (resp.usage.prompt_tokens, resp.usage.completion_tokens) == (prompt_len, completion_len)
    assert resp.usage.total_tokens == prompt_len + completion_len
    (req,) = gw.core.requests
    assert req.request_id == resp.id and list(req.prompt_token_ids) == tokenizer.encode("the quick brown fox")
    assert req.sampling.max_tokens == 20


async def test_streamed_completion_with_usage(gw: Gateway) -> None:
    stream = await gw.client().completions.create(
        model=MODEL, prompt="hi", stream=True, stream_options={"include_usage": True}
    )
    chunks = [c async for c in stream]
    assert "".join(c.choices[0].text for c in chunks if c.choices) == "Hello world!"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert (
        chunks[-1].usage.total_tokens == chunks[-1].usage.prompt_tokens + chunks[-1].usage.completion_tokens
    )
    assert gw.core.requests[0].sampling.max_tokens == 16  # the legacy-completions default


async def test_chat_completion_applies_template_once(gw: Gateway, tokenizer: TokenizerAdapter) -> None:
    """The core receives the chat template's token IDs; default max_tokens is the room left."""
    messages: Any = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}]
    resp = await gw.client().chat.completions.create(model=MODEL, messages=messages)
    assert resp.id.startswith("chatcmpl-") and resp.object == "chat.completion"
    assert resp.choices[0].message.role == "assistant"
    assert resp.choices[0].message.content == "Hello world!"
    expected = tokenizer.encode_chat(messages)
    (req,) = gw.core.requests
    assert list(req.prompt_token_ids) == expected
    assert req.sampling.max_tokens == CONTEXT - len(expected)
    assert resp.usage is not None and resp.usage.prompt_tokens == len(expected)


async def test_streamed_chat_completion(gw: Gateway) -> None:
    gw.core.script = Script(pieces=["héllo", " 你", "好", " 🎉"])
    stream = await gw.client().chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], stream=True, temperature=0, seed=1
    )
    chunks = [c async for c in stream]
    assert chunks[0].choices[0].delta.role == "assistant"
    contents = [c.choices[0].delta.content for c in chunks if c.choices[0].delta.content]
    assert "".join(contents) == "héllo 你好 🎉"
    assert not any("\ufffd" in c for c in contents)
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert gw.core.requests[0].sampling.temperature == 0 and gw.core.requests[0].sampling.seed == 1


async def test_stop_string_across_chunks_truncates_and_aborts(gw: Gateway) -> None:
    """'STOP' split over two deltas ends the stream before it, and the engine request is aborted."""
    gw.core.script = Script(pieces=["Hello wo", "rld! ST", "OP and more", " never sent"])
    stream = await gw.client().completions.create(
        model=MODEL, prompt="hi", stop=["STOP"], stream=True, max_tokens=100
    )
    chunks = [c async for c in stream]
    texts = [c.choices[0].text for c in chunks if c.choices[0].text]
    assert texts == ["Hello wo", "rld! "]  # only the partial 'ST' was held back
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert await gw.core.wait_ended() == ["aborted"]


async def test_stop_string_in_non_streamed_chat(gw: Gateway) -> None:
    gw.core.script = Script(pieces=["one\ntwo", "\nthree"])
    resp = await gw.client().chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "count"}], stop="\nthree"
    )
    assert resp.choices[0].message.content == "one\ntwo"
    assert resp.choices[0].finish_reason == "stop"
    assert await gw.core.wait_ended() == ["aborted"]  # EOS was still to come


async def test_max_tokens_ends_with_length(gw: Gateway) -> None:
    gw.core.script = Script(pieces=["a b"], repeat=True)
    resp = await gw.client().completions.create(model=MODEL, prompt="hi", max_tokens=5)
    assert resp.choices[0].finish_reason == "length"
    assert resp.usage is not None and resp.usage.completion_tokens == 5


async def test_error_mid_stream_is_an_sse_error_event(gw: Gateway) -> None:
    """An engine dying after the stream began ends it with a data: {"error": ...} event."""
    gw.core.script = Script(pieces=["a", "b", "c"], fail_after=2)
    async with (
        httpx.AsyncClient() as http,
        http.stream(
            "POST", f"{gw.url}/v1/completions", json={"model": MODEL, "prompt": "x", "stream": True}
        ) as r,
    ):
        assert r.status_code == 200
        events = [line.removeprefix("data: ") async for line in r.aiter_lines() if line]
    assert [json.loads(e)["choices"][0]["text"] for e in events[:2]] == ["a", "b"]
    error = json.loads(events[-1])["error"]
    assert error["message"] == "instance fake-0 died" and error["type"] == "service_unavailable"
    assert set(error) == {"message", "type", "param", "code"}
    assert "[DONE]" not in events
    with pytest.raises(openai.APIError, match="died"):
        gw.core.script = Script(pieces=["a", "b"], fail_after=1)
        stream = await gw.client().completions.create(model=MODEL, prompt="x", stream=True)
        async for _ in stream:
            pass


# -- disconnects ----------------------------------------------------------------------------


async def test_client_disconnect_mid_stream_aborts_the_engine_request(gw: Gateway) -> None:
    """Closing the HTTP connection mid-stream closes the core stream (an engine abort)."""
    gw.core.script = Script(pieces=["tok "], repeat=True, delay_s=0.01)
    body = {"model": MODEL, "prompt": "x", "stream": True, "max_tokens": 200}
    async with httpx.AsyncClient() as http:
        async with http.stream("POST", f"{gw.url}/v1/completions", json=body) as r:
            lines = r.aiter_lines()
            assert (await anext(lines)).startswith("data: ")
        # leaving the block closes the unfinished response, hence the connection
        assert await gw.core.wait_ended() == ["aborted"]


async def test_client_disconnect_during_non_streamed_request_aborts(gw: Gateway) -> None:
    gw.core.script = Script(pieces=["tok "], repeat=True, delay_s=0.01)
    async with httpx.AsyncClient() as http:
        body = {"model": MODEL, "prompt": "x", "max_tokens": 200}
        task = asyncio.create_task(http.post(f"{gw.url}/v1/completions", json=body))
        await gw.core.wait_started()
        task.cancel()
        assert await gw.core.wait_ended() == ["aborted"]


async def test_shutdown_ends_open_requests_after_the_grace_period(start_gateway: StartGateway) -> None:
    """stop_gateway waits the grace period, then ends open requests with errors and aborts them."""
    gw = await start_gateway()
    gw.core.script = Script(pieces=["tok "], repeat=True, delay_s=0.01)
    body = {"model": MODEL, "prompt": "x", "max_tokens": 250}
    async with httpx.AsyncClient() as http:
        plain = asyncio.create_task(http.post(f"{gw.url}/v1/completions", json=body))
        async with http.stream("POST", f"{gw.url}/v1/completions", json={**body, "stream": True}) as r:
            lines = r.aiter_lines()
            assert (await anext(lines)).startswith("data: ")
            async with asyncio.timeout(5):
                await stop_gateway(*gw.server)
            events = [line async for line in lines if line]
        resp = await plain
    assert json.loads(events[-1].removeprefix("data: "))["error"]["message"].startswith(
        "the gateway is shutting"
    )
    assert resp.status_code == 503 and "shutting down" in error_of(resp)["message"]
    assert await gw.core.wait_ended(2) == ["aborted", "aborted"]


# -- bad input: one raw request each --------------------------------------------------------


def error_of(resp: httpx.Response) -> dict[str, Any]:
    body = resp.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    err: dict[str, Any] = body["error"]
    return err


COMPLETION = {"model": MODEL, "prompt": "hi"}
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}


@pytest.mark.parametrize(
    ("path", "body", "status", "fragment", "param"),
    [
        ("/v1/completions", b"{oops", 400, "malformed JSON body", None),
        ("/v1/completions", {"prompt": "hi"}, 400, "missing required parameter: 'model'", "model"),
        ("/v1/completions", {**COMPLETION, "max_tokens": 0}, 400, "greater than or equal to 1", "max_tokens"),
        (
            "/v1/completions",
            {**COMPLETION, "temperature": -1},
            400,
            "greater than or equal to 0",
            "temperature",
        ),
        ("/v1/completions", {**COMPLETION, "n": 3}, 400, "n > 1 is not supported", "n"),
        ("/v1/completions", {**COMPLETION, "logprobs": 2}, 400, "logprobs is not supported", "logprobs"),
        ("/v1/completions", {**COMPLETION, "echo": True}, 400, "echo is not supported", "echo"),
        (
            "/v1/completions",
            {**COMPLETION, "frobnicate": 1},
            400,
            "unrecognized request argument(s): frobnicate",
            "frobnicate",
        ),
        (
            "/v1/completions",
            {**COMPLETION, "prompt": [1, 99999]},
            400,
            "token ID 99999 is out of range",
            "prompt",
        ),
        (
            "/v1/completions",
            {**COMPLETION, "model": "gpt-9"},
            404,
            "the model 'gpt-9' does not exist",
            "model",
        ),
        (
            "/v1/completions",
            {**COMPLETION, "prompt": "x " * 300},
            400,
            "maximum context length is 256 tokens",
            "prompt",
        ),
        (
            "/v1/completions",
            {**COMPLETION, "max_tokens": 300},
            400,
            "(2 in the prompt, 300 for the completion)",
            "max_tokens",
        ),
        ("/v1/chat/completions", {**CHAT, "messages": []}, 400, "at least 1 item", "messages"),
        (
            "/v1/chat/completions",
            {**CHAT, "stop": list("abcdefghijklmnopq")},
            400,
            "at most 16 stop strings",
            "stop",
        ),
        (
            "/v1/chat/completions",
            {**CHAT, "tools": [{"type": "function"}]},
            400,
            "unrecognized request argument",
            "tools",
        ),
        ("/v1/chat/completions", {**CHAT, "logprobs": True}, 400, "logprobs is not supported", "logprobs"),
    ],
)
async def test_bad_input_gets_openai_error(
    gw: Gateway, path: str, body: Any, status: int, fragment: str, param: str | None
) -> None:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    async with httpx.AsyncClient() as http:
        resp = await http.post(gw.url + path, content=content, headers={"Content-Type": "application/json"})
    assert resp.status_code == status
    err = error_of(resp)
    assert fragment in err["message"]
    assert err["param"] == param
    assert gw.core.requests == []


async def test_prompt_too_long_states_both_lengths(gw: Gateway, tokenizer: TokenizerAdapter) -> None:
    prompt = "the quick brown fox " * 80
    n = len(tokenizer.encode(prompt))
    async with httpx.AsyncClient() as http:
        resp = await http.post(f"{gw.url}/v1/completions", json={"model": MODEL, "prompt": prompt})
    err = error_of(resp)
    assert resp.status_code == 400 and err["code"] == "context_length_exceeded"
    assert f"{CONTEXT} tokens" in err["message"] and f"{n} tokens" in err["message"]


async def test_large_token_id_body_is_parsed_off_the_loop_and_checked(gw: Gateway) -> None:
    """A body past the offload threshold is validated the same way (here: too long for the context)."""
    body = {"model": MODEL, "prompt": [7] * 30_000}
    async with httpx.AsyncClient() as http:
        resp = await http.post(f"{gw.url}/v1/completions", json=body)
    assert resp.status_code == 400 and "the prompt has 30000 tokens" in error_of(resp)["message"]


async def test_hostile_prompts_do_not_stall_open_streams(gw: Gateway) -> None:
    """A 4 MB prompt and a 110,000-message chat get precise 400s while a stream keeps flowing:
    its inter-chunk gaps, and the lag of a ticker task on the shared loop, stay under 50 ms
    (they were 2.5-5 s when both were tokenized and parsed on the loop or in a GIL-holding thread)."""
    huge_prompt = json.dumps({"model": MODEL, "prompt": "the quick brown fox " * 199_990}).encode()
    many_messages = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}] * 110_000})
    padded = json.dumps(COMPLETION).encode() + b" " * 100_000  # legit, and large: parsed in the helper
    gw.core.script = Script(pieces=["tok "], repeat=True, delay_s=0.005)
    lags: list[float] = []
    gaps: list[float] = []

    async def ticker() -> None:
        while True:
            start = time.perf_counter()
            await asyncio.sleep(0.001)
            lags.append(time.perf_counter() - start - 0.001)

    async with httpx.AsyncClient(timeout=30) as http:
        warm = await http.post(f"{gw.url}/v1/completions", content=padded)  # starts the helper
        assert warm.status_code == 200 and warm.json()["choices"][0]["text"]
        body = {"model": MODEL, "prompt": "x", "stream": True, "max_tokens": 240}
        async with http.stream("POST", f"{gw.url}/v1/completions", json=body) as stream:
            lines = stream.aiter_lines()
            await anext(lines)
            tick = asyncio.create_task(ticker())

            async def watch() -> None:
                last = time.perf_counter()
                async for _ in lines:
                    now = time.perf_counter()
                    gaps.append(now - last)
                    last = now

            watcher = asyncio.create_task(watch())
            await asyncio.sleep(0.05)
            prompt_resp = await http.post(f"{gw.url}/v1/completions", content=huge_prompt)
            chat_resp = await http.post(f"{gw.url}/v1/chat/completions", content=many_messages)
            await asyncio.sleep(0.05)
            tick.cancel()
            watcher.cancel()
    assert len(gaps) > 10 and len(lags) > 10
    assert max(gaps) < 0.05 and max(lags) < 0.05, f"stream gap {max(gaps):.3f} s, loop lag {max(lags):.3f} s"
    assert prompt_resp.status_code == 400 and error_of(prompt_resp)["code"] == "context_length_exceeded"
    assert "3999800 characters, at least 333317 tokens" in error_of(prompt_resp)["message"]
    assert chat_resp.status_code == 400 and error_of(chat_resp)["param"] == "messages"
    assert "at most 4096 messages are allowed, got 110000" in error_of(chat_resp)["message"]


async def test_max_chat_messages_is_configurable(start_gateway: StartGateway) -> None:
    gw = await start_gateway(max_chat_messages=2)
    messages = [{"role": "user", "content": "hi"}] * 3
    async with httpx.AsyncClient() as http:
        resp = await http.post(f"{gw.url}/v1/chat/completions", json={"model": MODEL, "messages": messages})
        ok = await http.post(f"{gw.url}/v1/chat/completions", json={"model": MODEL, "messages": messages[:2]})
    assert resp.status_code == 400 and "at most 2 messages are allowed, got 3" in error_of(resp)["message"]
    assert ok.status_code == 200


async def test_capacity_error_before_streaming_is_503(gw: Gateway) -> None:
    gw.core.raise_on_generate = CapacityError("no live instance serves model 'tiny' right now")
    async with httpx.AsyncClient() as http:
        resp = await http.post(f"{gw.url}/v1/completions", json={**COMPLETION, "stream": True})
    assert resp.status_code == 503 and "no live instance" in error_of(resp)["message"]


async def test_unexpected_exception_is_a_500_not_a_crash(gw: Gateway) -> None:
    """A bug below the gateway becomes a generic 500 (details only in the log); the server lives on."""
    gw.core.raise_on_generate = RuntimeError("secret internals")
    async with httpx.AsyncClient() as http:
        resp = await http.post(f"{gw.url}/v1/completions", json=COMPLETION)
        gw.core.raise_on_generate = None
        again = await http.post(f"{gw.url}/v1/completions", json=COMPLETION)
    assert resp.status_code == 500 and error_of(resp)["message"] == "internal server error"
    assert "secret" not in resp.text
    assert again.status_code == 200


async def test_unknown_route_and_method_are_openai_errors(gw: Gateway) -> None:
    async with httpx.AsyncClient() as http:
        assert error_of(await http.get(f"{gw.url}/v1/nothing"))["message"] == "Not Found"
        resp = await http.get(f"{gw.url}/v1/completions")
    assert resp.status_code == 405 and error_of(resp)


async def test_body_over_the_limit_is_413(start_gateway: StartGateway) -> None:
    """Both a declared Content-Length and a chunked body that grows past the limit get a 413."""
    gw = await start_gateway(max_body_bytes=2048)
    big = json.dumps({"model": MODEL, "prompt": "x" * 4096}).encode()

    async def chunked() -> AsyncIterator[bytes]:
        for i in range(0, len(big), 512):
            yield big[i : i + 512]

    async with httpx.AsyncClient() as http:
        declared = await http.post(f"{gw.url}/v1/completions", content=big)
        streamed = await http.post(f"{gw.url}/v1/completions", content=chunked())
    assert "Content-Length" not in streamed.request.headers
    for resp in (declared, streamed):
        assert resp.status_code == 413
        assert "limit" in error_of(resp)["message"] and "2048" in error_of(resp)["message"]


# -- connection limits: raw sockets -----------------------------------------------------------


async def open_raw(gw: Gateway) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", int(gw.url.rsplit(":", 1)[1]))


async def read_until_closed(reader: asyncio.StreamReader, *, within_s: float) -> bytes:
    """Everything the server sends until it closes the connection (a reset after it counts too)."""
    data = b""
    async with asyncio.timeout(within_s):
        try:
            while chunk := await reader.read(65536):
                data += chunk
        except ConnectionResetError:
            pass
    return data


def raw_error(data: bytes) -> tuple[int, dict[str, Any]]:
    head, _, body = data.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    assert b"connection: close" in head.lower()
    err: dict[str, Any] = json.loads(body)["error"]
    return status, err


async def test_slow_headers_are_cut_after_the_header_timeout(start_gateway: StartGateway) -> None:
    """A client sending its headers a byte at a time gets a 408 and a close at the deadline;
    one that connects and sends nothing is closed too."""
    gw = await start_gateway(header_timeout_s=0.5)
    reader, writer = await open_raw(gw)
    idle_reader, idle_writer = await open_raw(gw)
    start = time.perf_counter()

    async def trickle() -> None:
        for byte in b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 100:
            writer.write(bytes([byte]))
            await asyncio.sleep(0.05)

    sender = asyncio.create_task(trickle())
    data = await read_until_closed(reader, within_s=5)
    took = time.perf_counter() - start
    sender.cancel()
    assert 0.4 < took < 2.0
    status, err = raw_error(data)
    assert status == 408 and err["code"] == "request_timeout"
    assert err["message"] == "the request headers did not arrive within 0.5 s"
    assert await read_until_closed(idle_reader, within_s=5) == b""
    writer.close()
    idle_writer.close()


async def test_the_timeouts_spare_slow_responses_and_idle_keep_alive(start_gateway: StartGateway) -> None:
    """The header timer runs only while headers arrive: a response slower than it, and a pause
    between two requests on one kept-alive connection, are fine."""
    gw = await start_gateway(header_timeout_s=0.3, body_timeout_s=0.3)
    gw.core.script = Script(pieces=["a", "b", "c", "d"], delay_s=0.2)
    async with httpx.AsyncClient() as http:
        first = await http.post(f"{gw.url}/v1/completions", json=COMPLETION)
        await asyncio.sleep(0.6)
        second = await http.post(f"{gw.url}/v1/completions", json=COMPLETION)
    assert first.json()["choices"][0]["text"] == second.json()["choices"][0]["text"] == "abcd"
    assert first.extensions["network_stream"] is second.extensions["network_stream"]  # one connection


async def test_a_trickling_body_is_cut_after_the_body_timeout(start_gateway: StartGateway) -> None:
    gw = await start_gateway(body_timeout_s=0.5)
    reader, writer = await open_raw(gw)
    writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
    start = time.perf_counter()

    async def trickle() -> None:
        while True:
            await asyncio.sleep(0.05)
            writer.write(b" ")

    sender = asyncio.create_task(trickle())
    data = await read_until_closed(reader, within_s=5)
    took = time.perf_counter() - start
    sender.cancel()
    assert 0.4 < took < 2.0
    status, err = raw_error(data)
    assert status == 408 and err["message"] == "the request body did not arrive within 0.5 s"
    assert gw.core.requests == []
    writer.close()


async def test_oversized_headers_get_431_without_being_buffered(start_gateway: StartGateway) -> None:
    """Headers over max_header_bytes get a 431; the server does not hold what the client sends
    (it used to grow one header value by copying it, to however much arrived)."""
    gw = await start_gateway(max_header_bytes=4096)
    async with httpx.AsyncClient() as http:
        fits = await http.post(f"{gw.url}/v1/completions", json=COMPLETION, headers={"X-Pad": "a" * 3000})
        over = await http.post(f"{gw.url}/v1/completions", json=COMPLETION, headers={"X-Pad": "a" * 5000})
    assert fits.status_code == 200
    assert over.status_code == 431 and error_of(over)["code"] == "request_header_fields_too_large"
    assert error_of(over)["message"] == "request headers exceed the limit of 4096 bytes"

    reader, writer = await open_raw(gw)
    chunk = b"a" * 65536
    tracemalloc.start()
    try:

        async def send_huge_header() -> None:
            writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nX-Big: ")
            for _ in range(128):  # 8 MiB, never ending the header
                writer.write(chunk)
                await writer.drain()

        sender = asyncio.create_task(send_huge_header())
        data = await read_until_closed(reader, within_s=10)
        with contextlib.suppress(ConnectionError):
            await sender
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    status, _ = raw_error(data)
    assert status == 431
    assert peak < 2 * 1024 * 1024, f"{peak / 2**20:.1f} MiB held while 8 MiB of header arrived"
    writer.close()


async def test_an_early_413_is_read_by_a_client_still_sending(start_gateway: StartGateway) -> None:
    """A body declared over max_body_bytes gets its 413 at once; the connection then discards
    input for a while (so the client reads the 413, not a reset) and closes, instead of reading
    the client's body for as long as it sends one."""
    gw = await start_gateway(max_body_bytes=2048)
    reader, writer = await open_raw(gw)
    writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100000000000\r\n\r\n")
    start = time.perf_counter()

    async def send_forever() -> None:
        with contextlib.suppress(ConnectionError):
            while True:
                writer.write(b"x" * 65536)
                await writer.drain()
                await asyncio.sleep(0.01)

    sender = asyncio.create_task(send_forever())
    data = await read_until_closed(reader, within_s=10)
    took = time.perf_counter() - start
    sender.cancel()
    status, err = raw_error(data)
    assert status == 413 and "100000000000 bytes; the limit is 2048 bytes" in err["message"]
    assert took < 5.0  # the linger (2 s), not the client, decides when it ends
    writer.close()


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
async def test_an_early_413_does_not_reset_a_client_that_sends_its_whole_body_first(
    start_gateway: StartGateway, chunked: bool
) -> None:
    """Most clients send the whole body before reading. Closing at once with their data unread
    made the kernel reset the connection under them (a send error after ~4 MB of 20 MB); keeping
    it open made the server read the body for as long as it came. A chunked body declares no
    length, so its 413 comes once the bytes counted pass the limit, mid-body."""
    gw = await start_gateway(max_body_bytes=2048)
    port = int(gw.url.rsplit(":", 1)[1])

    def send_all_then_read() -> bytes:
        total = 20_000_000
        chunk = b"x" * 65536
        framing = b"Transfer-Encoding: chunked" if chunked else b"Content-Length: %d" % total
        piece = b"%x\r\n%s\r\n" % (len(chunk), chunk) if chunked else chunk
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n%s\r\n\r\n" % framing)
            for _ in range(total // len(chunk)):
                sock.sendall(piece)
            sock.sendall(b"0\r\n\r\n" if chunked else b"x" * (total % len(chunk)))
            sock.settimeout(5)
            data = b""
            while block := sock.recv(65536):
                data += block
            return data

    status, err = raw_error(await asyncio.to_thread(send_all_then_read))
    assert status == 413 and err["code"] == "request_too_large"


# -- auth and the operational endpoints -----------------------------------------------------


async def test_api_key_required_when_configured(start_gateway: StartGateway) -> None:
    gw = await start_gateway(api_keys=("sk-right", "sk-other"))
    async with httpx.AsyncClient() as http:
        missing = await http.post(f"{gw.url}/v1/completions", json=COMPLETION)
        wrong = await http.post(
            f"{gw.url}/v1/completions", json=COMPLETION, headers={"Authorization": "Bearer x"}
        )
        health = await http.get(f"{gw.url}/health")
        metrics = await http.get(f"{gw.url}/metrics")
        debug = await http.get(f"{gw.url}/debug/routing")
    assert (missing.status_code, wrong.status_code, debug.status_code) == (401, 401, 401)
    assert missing.headers["www-authenticate"] == "Bearer"
    assert error_of(missing)["type"] == "authentication_error" and "sk-right" not in wrong.text
    assert (health.status_code, metrics.status_code) == (200, 200)
    with pytest.raises(openai.AuthenticationError):
        await gw.client("sk-wrong").models.list()
    resp = await gw.client("sk-other").completions.create(model=MODEL, prompt="hi")
    assert resp.choices[0].text == "Hello world!"


async def test_no_auth_when_no_keys(gw: Gateway) -> None:
    async with httpx.AsyncClient() as http:
        assert (await http.post(f"{gw.url}/v1/completions", json=COMPLETION)).status_code == 200


async def test_models_lists_served_models(gw: Gateway) -> None:
    models = await gw.client().models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert models.data[0].model_dump()["max_model_len"] == CONTEXT


async def test_health_follows_core_readiness(gw: Gateway) -> None:
    async with httpx.AsyncClient() as http:
        ok = await http.get(f"{gw.url}/health")
        gw.core.unready_reason = "all drained"
        down = await http.get(f"{gw.url}/health")
    assert ok.status_code == 200 and ok.json()["status"] == "ok" and ok.json()["membership_version"] == 3
    assert down.status_code == 503 and down.json()["reason"] == "all drained"


async def test_metrics_and_debug_routing(gw: Gateway) -> None:
    await gw.client().completions.create(model=MODEL, prompt="hi")
    async with httpx.AsyncClient() as http:
        metrics = await http.get(f"{gw.url}/metrics")
        debug = await http.get(f"{gw.url}/debug/routing")
    assert metrics.headers["content-type"].startswith("text/plain")
    assert "# TYPE switchyard_routing_decisions_total counter" in metrics.text
    assert "# TYPE switchyard_gc_pause_seconds histogram" in metrics.text  # timed once it listens
    assert debug.json()["decisions"][0]["request_id"] == gw.core.requests[0].request_id


async def test_gateway_freezes_the_start_up_heap_until_stopped(tokenizer: TokenizerAdapter) -> None:
    """Objects alive at start-up (transformers, torch) leave the GC's scans, and young
    collections get rarer; stopping undoes both."""
    cfg = GatewayConfig(host="127.0.0.1", port=0, gc_young_threshold=12_345)
    app = build_gateway_app(FakeCore(tokenizer), tokenizers={MODEL: tokenizer}, config=cfg)
    before = gc.get_threshold()
    server, task, _ = await serve_gateway(app, cfg, graceful_shutdown_s=1)
    try:
        assert gc.get_freeze_count() > 0
        assert gc.get_threshold() == (12_345, *before[1:])
    finally:
        await stop_gateway(server, task)
    assert gc.get_freeze_count() == 0 and gc.get_threshold() == before
    assert not any(cb in gc.callbacks for cb in metrics._gc_watch) and not metrics._gc_watch
