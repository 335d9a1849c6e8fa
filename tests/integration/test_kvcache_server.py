"""The KV-cache server for real: uvicorn on port 0 in this process, and once as ``switchyard
kvcache-server`` in a child process, driven over HTTP with httpx."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import pytest_asyncio
from prometheus_client.parser import text_string_to_metric_families

from switchyard.kvcache import KVCacheServerConfig
from switchyard.kvcache.metrics import METRIC_NAMES
from switchyard.kvcache.server import KVCacheServer
from switchyard.kvcache.store import ENTRY_OVERHEAD_BYTES

pytestmark = pytest.mark.timeout(60)
BLOCK = 4096
COST = BLOCK + ENTRY_OVERHEAD_BYTES


def key(i: int) -> str:
    return f"{i:064x}"  # the SHA-256 form of a vLLM block hash


def block(i: int, size: int = BLOCK) -> bytes:
    return bytes([i % 251]) * size


def metric_values(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a /metrics body by (name, sorted labels)."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


@pytest_asyncio.fixture
async def server() -> AsyncIterator[tuple[KVCacheServer, httpx.AsyncClient]]:
    """A server with room for exactly eight 4 KiB blocks, small limits, and a client for it."""
    config = KVCacheServerConfig(
        port=0, memory=8 * COST, max_block_bytes=6 * COST, max_batch_keys=16, shutdown_grace_s=1
    )
    srv = KVCacheServer(config)
    port = await srv.start()
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
        yield srv, client
    await srv.stop()


async def test_put_get_delete_round_trip(server: tuple[KVCacheServer, httpx.AsyncClient]) -> None:
    """201 on a new block, 200 on a refresh, the bytes back on GET (HEAD too), 204 on DELETE,
    and 404 with a JSON error for a block that is not held."""
    _, client = server
    assert (await client.put(f"/v1/blocks/{key(1)}", content=block(1))).status_code == 201
    assert (await client.put(f"/v1/blocks/{key(1)}", content=block(1))).status_code == 200
    got = await client.get(f"/v1/blocks/{key(1)}")
    assert got.status_code == 200 and got.content == block(1)
    assert got.headers["content-type"] == "application/octet-stream"
    assert (await client.head(f"/v1/blocks/{key(1)}")).status_code == 200
    assert (await client.delete(f"/v1/blocks/{key(1)}")).status_code == 204
    missing = await client.get(f"/v1/blocks/{key(1)}")
    assert missing.status_code == 404 and missing.json()["error"]["type"] == "not_found_error"
    assert (await client.delete(f"/v1/blocks/{key(1)}")).status_code == 404


async def test_contains_reports_each_key_and_the_held_prefix(
    server: tuple[KVCacheServer, httpx.AsyncClient],
) -> None:
    """A chain's reusable prefix is the run of leading keys the cache holds."""
    _, client = server
    for i in (0, 1, 3):
        await client.put(f"/v1/blocks/{key(i)}", content=block(i))
    resp = await client.post("/v1/contains", json={"keys": [key(i) for i in range(5)]})
    assert resp.status_code == 200
    assert resp.json() == {"present": [True, True, False, True, False], "prefix": 2}
    assert (await client.post("/v1/contains", json={"keys": []})).json() == {"present": [], "prefix": 0}


async def test_memory_limit_evicts_least_recently_used_blocks(
    server: tuple[KVCacheServer, httpx.AsyncClient],
) -> None:
    """Twelve blocks into room for eight: the four least recently used are gone (block 0 was
    read, so blocks 1-4 go), used bytes stay at the limit, and /v1/stats and /metrics agree."""
    srv, client = server
    for i in range(8):
        await client.put(f"/v1/blocks/{key(i)}", content=block(i))
    await client.get(f"/v1/blocks/{key(0)}")
    for i in range(8, 12):
        await client.put(f"/v1/blocks/{key(i)}", content=block(i))
    present = (await client.post("/v1/contains", json={"keys": [key(i) for i in range(12)]})).json()
    assert present["present"] == [True] + [False] * 4 + [True] * 7
    stats = (await client.get("/v1/stats")).json()
    assert stats["used_bytes"] == 8 * COST == stats["capacity_bytes"]
    assert (stats["blocks"], stats["evictions"], stats["eviction_policy"]) == (8, 4, "lru")
    await client.get(f"/v1/blocks/{key(1)}")  # a miss
    metrics = metric_values((await client.get("/metrics")).text)
    assert metrics["switchyard_kvcache_evictions_total", ()] == 4
    assert metrics["switchyard_kvcache_evicted_bytes_total", ()] == 4 * COST
    assert metrics["switchyard_kvcache_used_bytes", ()] == 8 * COST
    assert metrics["switchyard_kvcache_capacity_bytes", ()] == 8 * COST
    assert metrics["switchyard_kvcache_blocks", ()] == 8
    assert metrics["switchyard_kvcache_hits_total", ()] == 1
    assert metrics["switchyard_kvcache_misses_total", ()] == 1
    assert metrics["switchyard_kvcache_requests_total", (("code", "201"), ("op", "put"))] == 12
    assert metrics["switchyard_kvcache_requests_total", (("code", "404"), ("op", "get"))] == 1
    assert srv.store.stats().used_bytes == 8 * COST


@pytest.mark.parametrize(
    ("method", "path", "kwargs", "status", "param"),
    [
        ("PUT", "/v1/blocks/ABCDEF0123456789", {"content": b"x"}, 400, "key"),
        ("GET", "/v1/blocks/0123", {}, 400, "key"),
        ("DELETE", "/v1/blocks/not-a-hash-at-all", {}, 400, "key"),
        ("PUT", f"/v1/blocks/{key(1)}", {"content": b""}, 400, "body"),
        ("PUT", f"/v1/blocks/{key(1)}", {"content": b"x" * (6 * COST + 1)}, 413, None),
        ("POST", "/v1/contains", {"content": b"{not json"}, 400, "body"),
        ("POST", "/v1/contains", {"json": {"keys": "abc"}}, 400, "keys"),
        ("POST", "/v1/contains", {"json": {"keys": [1, 2]}}, 400, "keys.0"),
        ("POST", "/v1/contains", {"json": {"hashes": []}}, 400, "keys"),
        ("POST", "/v1/contains", {"json": {"keys": [key(1), "zz" * 8]}}, 400, "key"),
        ("POST", "/v1/contains", {"json": {"keys": [key(i) for i in range(17)]}}, 413, None),
    ],
)
async def test_bad_requests_get_precise_errors(
    server: tuple[KVCacheServer, httpx.AsyncClient],
    method: str,
    path: str,
    kwargs: dict[str, Any],
    status: int,
    param: str | None,
) -> None:
    """Bad keys, empty or oversized blocks and malformed batch requests are 4xx JSON errors that
    name the part at fault; nothing is stored."""
    srv, client = server
    resp = await client.request(method, path, **kwargs)
    assert resp.status_code == status, resp.text
    error = resp.json()["error"]
    assert error["message"] and error["param"] == param
    assert len(srv.store) == 0


async def test_oversized_streamed_block_is_refused_without_content_length(
    server: tuple[KVCacheServer, httpx.AsyncClient],
) -> None:
    """A chunked upload is cut off with 413 as soon as it passes the limit."""
    _, client = server

    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(8):
            yield b"x" * COST

    resp = await client.put(f"/v1/blocks/{key(1)}", content=chunks())
    assert resp.status_code == 413 and "limit" in resp.json()["error"]["message"]


async def test_unknown_routes_and_methods(server: tuple[KVCacheServer, httpx.AsyncClient]) -> None:
    _, client = server
    assert (await client.get("/v1/nothing")).status_code == 404
    assert (await client.post(f"/v1/blocks/{key(1)}", content=b"x")).status_code == 405


async def test_concurrent_clients_see_a_consistent_store(
    server: tuple[KVCacheServer, httpx.AsyncClient],
) -> None:
    """Many overlapping puts and gets: every GET returns either a miss or exactly the bytes put."""
    srv, client = server

    async def worker(i: int) -> None:
        for j in range(10):
            k = (i * 10 + j) % 12
            await client.put(f"/v1/blocks/{key(k)}", content=block(k))
            got = await client.get(f"/v1/blocks/{key((k + 5) % 12)}")
            assert got.status_code == 404 or got.content == block((k + 5) % 12)

    await asyncio.gather(*(worker(i) for i in range(8)))
    assert srv.store.stats().used_bytes <= 8 * COST


async def test_health_ready_and_metric_names(server: tuple[KVCacheServer, httpx.AsyncClient]) -> None:
    """/health is liveness, /ready turns 503 once shutdown begins; /metrics lists every family."""
    srv, client = server
    assert (await client.get("/health")).json() == {"status": "ok"}
    assert (await client.get("/ready")).status_code == 200
    names = {family.name for family in text_string_to_metric_families((await client.get("/metrics")).text)}
    assert names == set(METRIC_NAMES)
    srv.stopping = True
    assert (await client.get("/ready")).status_code == 503


def _child_env() -> dict[str, str]:
    return {**os.environ, "PYTHONUNBUFFERED": "1"}


async def test_cli_subprocess_serves_and_exits_cleanly_on_sigterm() -> None:
    """``switchyard kvcache-server`` as its own process: it logs the bound port, stores and serves
    blocks, evicts within ``--memory``, and on SIGTERM shuts down with status 0 and logs its
    final counters."""
    memory = 4 * COST
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "switchyard.cli",
        "kvcache-server",
        "--port=0",
        f"--memory={memory}",
        "--eviction=lfu",
        "--log-format=json",
        stderr=asyncio.subprocess.PIPE,
        env=_child_env(),
    )
    assert proc.stderr is not None
    log: list[str] = []
    try:
        port = None
        while port is None:
            line = (await asyncio.wait_for(proc.stderr.readline(), 30)).decode()
            assert line, "server exited before listening: " + "".join(log)
            log.append(line)
            found = re.search(r"listening host=\S+ port=(\d+)", line)
            port = int(found.group(1)) if found else None
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
            for i in range(6):
                assert (await client.put(f"/v1/blocks/{key(i)}", content=block(i))).status_code == 201
            assert (await client.get(f"/v1/blocks/{key(5)}")).content == block(5)
            stats = (await client.get("/v1/stats")).json()
            assert (stats["blocks"], stats["evictions"], stats["eviction_policy"]) == (4, 2, "lfu")
        proc.send_signal(signal.SIGTERM)
        rest = (await asyncio.wait_for(proc.stderr.read(), 30)).decode()
        assert await asyncio.wait_for(proc.wait(), 30) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert "received SIGTERM" in rest
    assert re.search(r"stopped .*blocks=4 hits=1 misses=0 puts=6 evictions=2", rest), rest


def test_cli_rejects_bad_flags_with_status_2() -> None:
    """A flag the configuration rejects exits 2 and names the flag."""
    result = subprocess.run(
        [sys.executable, "-m", "switchyard.cli", "kvcache-server", "--memory=16GB", "--eviction=fifo"],
        capture_output=True,
        text=True,
        timeout=60,
        env=_child_env(),
    )
    assert result.returncode == 2
    assert "--memory" in result.stderr and "--eviction" in result.stderr
