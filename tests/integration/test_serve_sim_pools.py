"""`switchyard serve --engine sim` with several pools: one gateway, merged membership, real Ray.

The simulator stands in for vLLM here (it is a performance model, not inference), so this
covers the multi-pool plumbing of ``serve`` in seconds: per-pool supervisors, the merged
membership the router follows, and the OpenAI gateway in front.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator

import grpc
import httpx
import openai
import pytest
import pytest_asyncio

from switchyard.api.auth import bearer_metadata
from switchyard.api.v1 import router_pb2, router_pb2_grpc, worker_pb2, worker_pb2_grpc
from switchyard.config import EngineConfig, GatewayConfig, PoolConfig, RouterConfig, ServeConfig
from switchyard.serve import RunningStack
from tests.helpers.stack import running_stack

pytestmark = [pytest.mark.ray, pytest.mark.asyncio(loop_scope="module")]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def stack() -> AsyncIterator[RunningStack]:
    config = ServeConfig(
        engine=EngineConfig(kind="sim", max_model_len=4096),
        pools=(
            PoolConfig(name="prefill", role="prefill", instances=1),
            PoolConfig(name="decode", role="decode", instances=2),
        ),
        router=RouterConfig(policy="round_robin"),
        gateway=GatewayConfig(port=0),
        ray_num_cpus=2,
    )
    async with running_stack(config, ready_within_s=30) as running:
        yield running


async def test_router_sees_every_pool_instance_with_its_role(stack: RunningStack) -> None:
    """Both pools' instances are in the router's membership, each with its pool's role."""
    roles = {i.instance_id: i.role for i in stack.core.membership.instances}
    assert roles == {"decode-0": "decode", "decode-1": "decode", "prefill-0": "prefill"}


async def test_openai_client_gets_completions_from_the_simulator(stack: RunningStack) -> None:
    """Completions through the gateway succeed on the simulated fleet, with exact usage counts."""
    client = openai.AsyncOpenAI(
        base_url=f"http://127.0.0.1:{stack.gateway_port}/v1", api_key="x", max_retries=0
    )
    models = await client.models.list()
    assert [m.id for m in models.data] == [stack.model_name]
    for _ in range(3):
        resp = await client.completions.create(
            model=stack.model_name, prompt="hello world", max_tokens=7, extra_body={"ignore_eos": True}
        )
        assert resp.usage is not None and resp.usage.completion_tokens == 7
        assert resp.choices[0].finish_reason == "length"
    used = {d["instance_id"] for d in stack.core.recent_decisions()}
    assert used == {"decode-0", "decode-1", "prefill-0"}


async def test_serve_secures_every_grpc_service_with_a_generated_token(stack: RunningStack) -> None:
    """No token was configured: serve generated one, which the router's and every worker's gRPC
    service require (the completions above passed, so the router sends it); without it, both
    refuse with UNAUTHENTICATED."""
    assert stack.internal_token is not None and len(stack.internal_token.get_secret_value()) >= 43
    good = bearer_metadata(stack.internal_token)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{stack.router_port}") as channel:
        router = router_pb2_grpc.RouterStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await router.ListInstances(router_pb2.ListInstancesRequest())
        assert raised.value.code() is grpc.StatusCode.UNAUTHENTICATED
        assert (
            len((await router.ListInstances(router_pb2.ListInstancesRequest(), metadata=good)).instances) == 3
        )
    for info in stack.core.membership.instances:
        async with grpc.aio.insecure_channel(info.address) as channel:
            worker = worker_pb2_grpc.WorkerStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await worker.Abort(worker_pb2.AbortRequest(request_id="anything"))
            assert raised.value.code() is grpc.StatusCode.UNAUTHENTICATED
            reply = await worker.GetInstanceInfo(worker_pb2.InstanceInfoRequest(), metadata=good)
            assert reply.instance_id == info.instance_id


async def test_hostile_requests_do_not_stall_a_simulated_stream(stack: RunningStack) -> None:
    """Issue #16 item 3, through ``serve`` on the simulator: while a stream decodes, a 4 MB
    prompt and a 110,000-message chat get precise 400s, and the stream's largest gap between two
    chunks stays under 50 ms (the gateway stalled it ~4 s tokenizing the prompt on its loop)."""
    url = f"http://127.0.0.1:{stack.gateway_port}/v1"
    huge_prompt = json.dumps({"model": stack.model_name, "prompt": "the quick brown fox " * 199_990})
    many_messages = json.dumps(
        {"model": stack.model_name, "messages": [{"role": "user", "content": "hi"}] * 110_000}
    )
    body = {
        "model": stack.model_name,
        "prompt": "hello",
        "stream": True,
        "max_tokens": 4000,
        "ignore_eos": True,
    }
    gaps: list[float] = []
    async with (
        httpx.AsyncClient(timeout=60) as http,
        http.stream("POST", f"{url}/completions", json=body) as stream,
    ):
        lines = stream.aiter_lines()
        await anext(lines)

        async def watch() -> None:
            last = time.perf_counter()
            async for line in lines:
                if line:
                    now = time.perf_counter()
                    gaps.append(now - last)
                    last = now

        watcher = asyncio.create_task(watch())
        await asyncio.sleep(0.2)
        quiet = len(gaps)
        prompt_resp = await http.post(f"{url}/completions", content=huge_prompt)
        chat_resp = await http.post(f"{url}/chat/completions", content=many_messages)
        await asyncio.sleep(0.2)
        watcher.cancel()
    assert quiet > 5 and len(gaps) > quiet + 5, "the simulated stream should keep flowing"
    worst = max(gaps[quiet:])
    assert worst < 0.05, (
        f"the stream stalled {worst * 1000:.0f} ms (before them: {max(gaps[:quiet]) * 1000:.0f} ms)"
    )
    assert prompt_resp.status_code == 400
    prompt_error = prompt_resp.json()["error"]
    assert (
        prompt_error["code"] == "context_length_exceeded" and "3999800 characters" in prompt_error["message"]
    )
    assert chat_resp.status_code == 400
    chat_error = chat_resp.json()["error"]
    assert chat_error["param"] == "messages" and "got 110000" in chat_error["message"]
