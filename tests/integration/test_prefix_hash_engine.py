"""Router block hashes against the real engine's: vLLM's KV events name the blocks it caches.

One vLLM CPU engine (tiny model, block size 32, prefix caching on, the default ``sha256``
algorithm) publishes KV events over ZMQ (an ``ipc://`` endpoint, which vLLM binds). The
test sends prompts as token ids, collects the ``BlockStored`` events, and checks that every
full prompt block the router hashes (``BlockHasher``, no vLLM import) is among the stored
blocks under the same hash (low 64 bits, as vLLM publishes them), with the same tokens.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import msgspec
import pytest
import pytest_asyncio
import zmq
import zmq.asyncio
from vllm.config import KVEventsConfig
from vllm.distributed.kv_events import BlockStored, KVEventBatch

from switchyard.config import EngineConfig
from switchyard.messages import EngineRequest, SamplingOptions
from switchyard.router.prefix_hash import BlockHasher, external_block_hash
from switchyard.workers.vllm.engine import VLLMEngine

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(300)]  # a safety net: ~60 s on a quiet machine

BLOCK = 32


def prompt(seed: int, length: int) -> list[int]:
    """A deterministic prompt inside the tiny vocabulary (ids 5..511), distinct per seed."""
    return [5 + (seed * 131 + i * 17 + i * i) % 500 for i in range(length)]


@pytest_asyncio.fixture
async def engine_and_events(
    tiny_model_dir: Path, tmp_path: Path
) -> AsyncIterator[tuple[VLLMEngine, zmq.asyncio.Socket]]:
    endpoint = f"ipc://{tmp_path / 'kv-events.sock'}"
    cfg = EngineConfig(
        dtype="float32",
        block_size=BLOCK,
        max_model_len=512,
        max_num_seqs=8,
        extra_args={
            "kv_events_config": KVEventsConfig(
                enable_kv_cache_events=True, publisher="zmq", endpoint=endpoint, topic="kv"
            )
        },
    )
    engine = await VLLMEngine.start(cfg, instance_id="kv-events-0", model_dir=tiny_model_dir)
    ctx = zmq.asyncio.Context()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"kv")
    sub.connect(endpoint)
    await asyncio.sleep(0.5)  # PUB/SUB drops messages sent before the subscription lands
    try:
        yield engine, sub
    finally:
        sub.close(linger=0)
        ctx.term()
        await engine.close()


async def stored_blocks(
    sub: zmq.asyncio.Socket, want: set[int], timeout_s: float = 20.0
) -> dict[int, list[int]]:
    """Collect BlockStored events (hash -> token ids) until every hash in ``want`` was seen."""
    decoder = msgspec.msgpack.Decoder(type=KVEventBatch)
    seen: dict[int, list[int]] = {}
    async with asyncio.timeout(timeout_s):
        while not want <= seen.keys():
            _topic, _seq, payload = await sub.recv_multipart()
            for event in decoder.decode(payload).events:
                if isinstance(event, BlockStored):
                    size = event.block_size
                    for i, h in enumerate(event.block_hashes):
                        key = h if isinstance(h, int) else external_block_hash(h)
                        seen[key] = list(event.token_ids[i * size : (i + 1) * size])
    return seen


async def test_router_block_hashes_equal_the_engines_kv_event_hashes(
    engine_and_events: tuple[VLLMEngine, zmq.asyncio.Socket],
) -> None:
    """Each full block of each prompt is stored by the engine under the hash the router computes."""
    engine, sub = engine_and_events
    assert engine.block_size == BLOCK
    hasher = BlockHasher(BLOCK, "sha256")
    prompts = [prompt(1, 101), prompt(2, 64), prompt(3, 200), prompt(1, 101)[:70] + prompt(4, 90)]
    expected: dict[int, list[int]] = {}
    for n, tokens in enumerate(prompts):
        req = EngineRequest(f"kv-{n}", tokens, SamplingOptions(max_tokens=1, temperature=0.0))
        outputs = [out async for out in engine.generate(req)]
        assert outputs[-1].finished
        for i, h in enumerate(hasher.block_hashes(tokens)):
            expected[external_block_hash(h)] = tokens[i * BLOCK : (i + 1) * BLOCK]
    assert len(expected) == 3 + 2 + 6 + (5 - 2), "the fourth prompt shares its first two blocks"
    stored = await stored_blocks(sub, set(expected))
    for h, tokens in expected.items():
        assert stored[h] == tokens
