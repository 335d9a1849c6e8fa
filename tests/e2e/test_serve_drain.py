"""Drain and rebalancing through `switchyard serve`: real vLLM CPU engines with the migration
connector on Ray.

The whole path a user (or the operator before a scale-in) takes: streams arrive over the
OpenAI gateway, ``POST /admin/drain`` moves every stream off one instance by live migration
(NIXL pulls the KV cache between the two engine processes), the clients' streams continue on
the other instance with the text an uninterrupted run produces, and the drained instance
ends with nothing running. The hotspot rebalancer runs in the same stack: it must leave a
drain alone, and spread a hotspot once the drained instance is back. Greedy decoding with
``ignore_eos`` makes the reference exact.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import openai
import pytest
import pytest_asyncio

from switchyard import metrics
from switchyard.config import (
    EngineConfig,
    GatewayConfig,
    KvTransferConfig,
    RebalancerConfig,
    RouterConfig,
    ServeConfig,
)
from switchyard.serve import RunningStack
from tests.helpers.stack import running_stack
from tests.helpers.waiting import eventually

pytestmark = [pytest.mark.vllm, pytest.mark.ray, pytest.mark.asyncio(loop_scope="module")]

MODEL = "switchyard-tiny"
MAX_TOKENS = 400
PROMPTS = [f"request {i}: the quick brown fox jumps over the lazy dog number {i * 7}" for i in range(4)]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def stack(tiny_model_dir: Path) -> AsyncIterator[RunningStack]:
    config = ServeConfig(
        instances=2,
        engine=EngineConfig(
            model=tiny_model_dir,
            served_model_name=MODEL,
            dtype="float32",
            max_model_len=512,
            max_num_seqs=8,
            kv_transfer=KvTransferConfig(),
        ),
        router=RouterConfig(
            policy="round_robin",
            rebalancer=RebalancerConfig(enabled=True, period_s=0.5, request_cooldown_s=60),
        ),
        gateway=GatewayConfig(port=0),
        ray_num_cpus=2,
    )
    async with running_stack(config, ready_within_s=90) as running:
        yield running


def _client(stack: RunningStack) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(
        base_url=f"http://127.0.0.1:{stack.gateway_port}/v1", api_key="unused", max_retries=0
    )


async def _reference(client: openai.AsyncOpenAI, prompt: str) -> str:
    resp = await client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0, extra_body={"ignore_eos": True}
    )
    assert resp.choices[0].finish_reason == "length"
    return resp.choices[0].text


class _Stream:
    """One streamed completion, collected while the test drains underneath it."""

    def __init__(self, client: openai.AsyncOpenAI, prompt: str) -> None:
        self.chunks: list[str] = []
        self.finish_reason: str | None = None
        self.completion_tokens: int | None = None
        self.task = asyncio.create_task(self._run(client, prompt))

    async def _run(self, client: openai.AsyncOpenAI, prompt: str) -> None:
        stream = await client.completions.create(
            model=MODEL,
            prompt=prompt,
            max_tokens=MAX_TOKENS,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
        async for chunk in stream:
            if chunk.choices:
                self.chunks.append(chunk.choices[0].text)
                self.finish_reason = chunk.choices[0].finish_reason or self.finish_reason
            if chunk.usage is not None:
                self.completion_tokens = chunk.usage.completion_tokens


async def test_drain_moves_every_stream_and_outputs_match(stack: RunningStack) -> None:
    """Four streams, two per instance; draining one moves its two by migration, texts unchanged."""
    client = _client(stack)
    references = [await _reference(client, p) for p in PROMPTS]

    streams = [_Stream(client, p) for p in PROMPTS]
    core = stack.core
    await eventually(lambda: len(core.streams) == len(PROMPTS), within_s=30)
    await eventually(lambda: all(len(s.chunks) >= 8 for s in streams), within_s=60)
    placed = {rid: s.instance_id for rid, s in core.streams.items()}
    source = max(set(placed.values()), key=list(placed.values()).count)
    on_source = sorted(rid for rid, iid in placed.items() if iid == source)
    assert len(on_source) >= 2, placed  # round_robin put two on each

    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{stack.gateway_port}") as http:
        resp = await http.post("/admin/drain", json={"instance": source, "timeout_s": 120}, timeout=150)
    assert resp.status_code == 200, resp.text
    result = resp.json()
    assert result["complete"] is True, result
    assert result["failed"] == []
    assert set(result["moved"]) | set(result["finished"]) == set(on_source)
    assert result["moved"], f"nothing was migrated (all finished first?): {result}"
    assert all(dst != source for dst in result["destinations"].values())

    # Draining: nothing new lands on the source while it stays drained.
    assert await _reference(client, "a request during the drain") != ""
    assert all(s.instance_id != source for s in core.streams.values())

    await asyncio.wait_for(asyncio.gather(*(s.task for s in streams)), timeout=180)
    for stream, ref in zip(streams, references, strict=True):
        assert stream.finish_reason == "length"
        assert stream.completion_tokens == MAX_TOKENS  # moved tokens are not counted twice
        assert "".join(stream.chunks) == ref

    def source_idle() -> bool:
        state = core.registry.get(source)
        return state is not None and state.num_running + state.num_waiting == 0

    await eventually(source_idle, within_s=10)

    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{stack.gateway_port}") as http:
        resp = await http.post("/admin/undrain", json={"instance": source})
        assert resp.status_code == 200 and resp.json() == {"instance": source, "draining": False}
        missing = await http.post("/admin/drain", json={"instance": "no-such-instance"})
        assert missing.status_code == 404
        assert "no-such-instance" in missing.json()["error"]["message"]


async def test_rebalancer_spreads_a_hotspot(stack: RunningStack) -> None:
    """Six streams pile onto one instance while the other is drained; once it is back, the
    rebalancer migrates some of them over, and every text still equals the uninterrupted one."""
    client, core = _client(stack), stack.core
    prompts = [f"hotspot {i}: switchyard moves running requests with their cache {i * 3}" for i in range(6)]
    references = await asyncio.gather(*(_reference(client, p) for p in prompts))
    cold, hot = sorted(s.instance_id for s in core.registry)
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{stack.gateway_port}") as http:
        assert (await http.post("/admin/drain", json={"instance": cold, "timeout_s": 5})).json()["complete"]
        streams = [_Stream(client, p) for p in prompts]
        await eventually(lambda: all(len(s.chunks) >= 4 for s in streams), within_s=60)
        assert {s.instance_id for s in core.streams.values()} == {hot}
        moves_before = _rebalancer_moves()
        assert (await http.post("/admin/undrain", json={"instance": cold})).status_code == 200

    await eventually(lambda: any(s.instance_id == cold for s in core.streams.values()), within_s=30)
    await asyncio.wait_for(asyncio.gather(*(s.task for s in streams)), timeout=180)
    assert _rebalancer_moves() > moves_before
    for stream, ref in zip(streams, references, strict=True):
        assert stream.completion_tokens == MAX_TOKENS
        assert "".join(stream.chunks) == ref


def _rebalancer_moves() -> float:
    """Rebalancer migrations that moved a request, from the router's own metric."""
    value = metrics.REGISTRY.get_sample_value(
        "switchyard_rebalancer_actions_total", {"action": "migrate", "outcome": "moved"}
    )
    return value or 0.0
