"""`switchyard serve` end to end: real vLLM CPU engines on Ray, the router, the OpenAI gateway.

One stack (two vLLM instances of the tiny model) is started for the whole module: an engine
takes ~12 s to start on this machine, so tests share it and the one that kills an instance
runs last.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import openai
import pytest
import pytest_asyncio
import ray
from openai.types.chat import ChatCompletionMessageParam

from switchyard.config import EngineConfig, GatewayConfig, RouterConfig, ServeConfig
from switchyard.serve import RunningStack
from tests.helpers.stack import running_stack
from tests.helpers.waiting import eventually

pytestmark = [pytest.mark.vllm, pytest.mark.ray, pytest.mark.asyncio(loop_scope="module")]

MAX_MODEL_LEN = 1024
PROMPT = "the quick brown fox jumps over the lazy dog and switchyard routes requests"


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def stack(tiny_model_dir: Path) -> AsyncIterator[RunningStack]:
    config = ServeConfig(
        instances=2,
        engine=EngineConfig(
            kind="vllm",
            model=tiny_model_dir,
            served_model_name="switchyard-tiny",
            max_model_len=MAX_MODEL_LEN,
            max_num_seqs=8,
        ),
        router=RouterConfig(policy="round_robin"),
        gateway=GatewayConfig(port=0, max_body_bytes=64 * 1024),
        ray_num_cpus=2,
    )
    async with running_stack(config, ready_within_s=60) as running:
        yield running


def _base_url(stack: RunningStack) -> str:
    return f"http://127.0.0.1:{stack.gateway_port}"


def _client(stack: RunningStack) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=_base_url(stack) + "/v1", api_key="unused", max_retries=0)


def _running_everywhere(stack: RunningStack) -> int:
    return sum(s.num_running + s.num_waiting for s in stack.core.registry)


async def test_models_lists_the_served_model(stack: RunningStack) -> None:
    """GET /v1/models through the official client names the one served model."""
    models = await _client(stack).models.list()
    assert [m.id for m in models.data] == ["switchyard-tiny"]


async def test_non_streamed_completion_has_text_and_usage(stack: RunningStack) -> None:
    """A non-streamed completion returns text, finish_reason length, and exact usage counts."""
    resp = await _client(stack).completions.create(
        model="switchyard-tiny", prompt=PROMPT, max_tokens=12, temperature=0, extra_body={"ignore_eos": True}
    )
    choice = resp.choices[0]
    assert choice.finish_reason == "length"
    assert isinstance(choice.text, str) and choice.text
    assert resp.usage is not None
    assert resp.usage.completion_tokens == 12
    assert resp.usage.prompt_tokens > 5
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + 12


async def test_streamed_completion_equals_non_streamed(stack: RunningStack) -> None:
    """Greedy decoding: the SSE stream concatenates to the same text as the non-streamed answer."""
    client = _client(stack)
    full = await client.completions.create(
        model="switchyard-tiny", prompt=PROMPT, max_tokens=24, temperature=0, extra_body={"ignore_eos": True}
    )
    stream = await client.completions.create(
        model="switchyard-tiny",
        prompt=PROMPT,
        max_tokens=24,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    parts, usage, chunks = [], None, 0
    async for chunk in stream:
        chunks += 1
        if chunk.choices:
            parts.append(chunk.choices[0].text)
        if chunk.usage is not None:
            usage = chunk.usage
    assert chunks > 2, "a stream should arrive in several chunks"
    assert "".join(parts) == full.choices[0].text
    assert usage is not None and usage.completion_tokens == 24


async def test_chat_completion_streamed_and_not(stack: RunningStack) -> None:
    """Chat completions apply the chat template; stream and non-stream agree under greedy decoding."""
    client = _client(stack)
    messages: list[ChatCompletionMessageParam] = [{"role": "user", "content": "hello world"}]
    full = await client.chat.completions.create(
        model="switchyard-tiny",
        messages=messages,
        max_tokens=10,
        temperature=0,  # type: ignore[arg-type]
        extra_body={"ignore_eos": True},
    )
    assert full.choices[0].message.role == "assistant"
    assert full.usage is not None and full.usage.completion_tokens == 10
    stream = await client.chat.completions.create(
        model="switchyard-tiny",
        messages=messages,
        max_tokens=10,
        temperature=0,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    assert text == full.choices[0].message.content


async def test_greedy_output_equals_vllm_own_output(stack: RunningStack, tiny_model_dir: Path) -> None:
    """The gateway's greedy text equals what vLLM itself generates and detokenizes for the same prompt."""
    from vllm import SamplingParams
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    resp = await _client(stack).completions.create(
        model="switchyard-tiny", prompt=PROMPT, max_tokens=32, temperature=0, extra_body={"ignore_eos": True}
    )
    llm = AsyncLLM.from_engine_args(
        AsyncEngineArgs(
            model=str(tiny_model_dir),
            dtype="float32",
            max_model_len=MAX_MODEL_LEN,
            block_size=32,
            enforce_eager=True,
            seed=0,
            max_num_seqs=2,
            kv_cache_memory_bytes=256 * 1024 * 1024,
        )
    )
    try:
        text = ""
        async for out in llm.generate(
            PROMPT, SamplingParams(max_tokens=32, temperature=0, ignore_eos=True), request_id="reference"
        ):
            text = out.outputs[0].text
    finally:
        llm.shutdown()
    assert resp.choices[0].text == text


async def test_client_disconnect_aborts_engine_request(stack: RunningStack) -> None:
    """Closing the HTTP stream mid-generation aborts the request: the engines' running count returns to 0
    long before the requested 900 tokens could have been generated."""
    body = {
        "model": "switchyard-tiny",
        "prompt": "hello",
        "max_tokens": 900,
        "temperature": 0,
        "stream": True,
        "ignore_eos": True,
    }
    async with (
        httpx.AsyncClient(base_url=_base_url(stack), timeout=30) as http,
        http.stream("POST", "/v1/completions", json=body) as resp,
    ):
        assert resp.status_code == 200
        async for line in resp.aiter_lines():
            # Stay connected until the engines' own load reports count the request as running.
            if line.startswith("data: ") and _running_everywhere(stack) >= 1:
                break
        assert _running_everywhere(stack) >= 1
    await eventually(lambda: _running_everywhere(stack) == 0, within_s=10)
    aborted = [d for d in stack.core.recent_decisions() if d.get("request_id", "").startswith("cmpl-")]
    assert aborted, "the routing decision of the aborted request should be in the debug view"


@pytest.mark.parametrize(
    ("body", "status", "needle"),
    [
        (b"{not json", 400, "json"),
        (json.dumps({"prompt": "x", "max_tokens": 4}).encode(), 400, "model"),
        (json.dumps({"model": "nope", "prompt": "x"}).encode(), 404, "nope"),
        (
            json.dumps({"model": "switchyard-tiny", "prompt": "x", "max_tokens": 0}).encode(),
            400,
            "max_tokens",
        ),
        (
            json.dumps({"model": "switchyard-tiny", "prompt": "x", "temperature": -1}).encode(),
            400,
            "temperature",
        ),
        (json.dumps({"model": "switchyard-tiny", "prompt": "x", "n": 2}).encode(), 400, "n"),
        (
            json.dumps({"model": "switchyard-tiny", "prompt": "hello " * 1500}).encode(),
            400,
            str(MAX_MODEL_LEN),
        ),
        (json.dumps({"model": "switchyard-tiny", "prompt": "x" * 70000}).encode(), 413, "bytes"),
    ],
    ids=[
        "malformed-json",
        "missing-model",
        "unknown-model",
        "max-tokens-0",
        "negative-temperature",
        "n-2",
        "prompt-too-long",
        "body-too-large",
    ],
)
async def test_bad_input_gets_status_and_message(
    stack: RunningStack, body: bytes, status: int, needle: str
) -> None:
    """Each bad request gets the OpenAI error shape, the right status and a message naming the problem."""
    async with httpx.AsyncClient(base_url=_base_url(stack), timeout=30) as http:
        resp = await http.post("/v1/completions", content=body, headers={"content-type": "application/json"})
    assert resp.status_code == status, resp.text
    error = resp.json()["error"]
    assert needle.lower() in (error["message"] + str(error.get("param"))).lower(), error
    await eventually(lambda: _running_everywhere(stack) == 0, within_s=10)


async def test_killed_vllm_instance_restarts_and_serves(stack: RunningStack) -> None:
    """Killing a vLLM instance actor: the supervisor restarts it, the router follows, requests succeed."""
    victim = stack.core.membership.instances[0]
    ray.kill(await stack.pool.instance_handle(victim.instance_id), no_restart=True)
    await eventually(
        lambda: any(
            i.instance_id == victim.instance_id and i.incarnation == victim.incarnation + 1
            for i in stack.core.membership.instances
        ),
        within_s=120,
    )
    await eventually(lambda: stack.core.ready, within_s=30)
    client = _client(stack)
    results = await asyncio.gather(
        *(
            client.completions.create(
                model="switchyard-tiny",
                prompt=f"{PROMPT} {uuid.uuid4().hex[:4]}",
                max_tokens=4,
                temperature=0,
                extra_body={"ignore_eos": True},
            )
            for _ in range(4)
        )
    )
    assert all(r.usage is not None and r.usage.completion_tokens == 4 for r in results)
