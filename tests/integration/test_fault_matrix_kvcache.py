"""Fault matrix (issue #16): the KV-cache server (``switchyard kvcache-server``) killed.

No component of the serving path calls the KV-cache pool yet (the engines do not read from it;
docs/reliability.md), so what a kill can break today is its own clients and its own restart:
an upload in flight and a read both end with a connection error within their deadline (no
hang), and a server restarted on the same port is ready at once and empty (the store is
memory-only: a killed replica loses its blocks, which are a cache, never the only copy).
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import AsyncIterator

import httpx
import pytest

from bench.soak import free_port
from tests.integration.test_kvcache_server import BLOCK, key

DEADLINE_S = 15.0


async def start_server(port: int) -> asyncio.subprocess.Process:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "switchyard.cli", "kvcache-server", f"--port={port}", "--memory=16Mi",
        stderr=asyncio.subprocess.DEVNULL, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=2) as client:
        for _ in range(300):
            try:
                if (await client.get("/ready")).status_code == 200:
                    return proc
            except httpx.TransportError:
                pass
            assert proc.returncode is None, "kvcache-server exited during start-up"
            await asyncio.sleep(0.1)
    raise AssertionError("kvcache-server not ready within 30 s")


async def slow_body(started: asyncio.Event) -> AsyncIterator[bytes]:
    """A block uploaded in pieces, slowly: the kill lands mid-upload."""
    for _ in range(BLOCK // 256):
        yield b"x" * 256
        started.set()
        await asyncio.sleep(0.2)


async def test_killed_kvcache_server_fails_its_clients_fast_and_restarts_empty() -> None:
    port = free_port()
    proc = await start_server(port)
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=DEADLINE_S) as client:
            assert (await client.put(f"/v1/blocks/{key(1)}", content=b"y" * BLOCK)).status_code == 201
            started = asyncio.Event()
            upload = asyncio.create_task(client.put(f"/v1/blocks/{key(2)}", content=slow_body(started)))
            await asyncio.wait_for(started.wait(), DEADLINE_S)
            proc.send_signal(signal.SIGKILL)
            await proc.wait()
            async with asyncio.timeout(DEADLINE_S):  # a hang fails here
                with pytest.raises(httpx.TransportError):
                    await upload
                with pytest.raises(httpx.TransportError):
                    await client.get(f"/v1/blocks/{key(1)}")
        proc = await start_server(port)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=DEADLINE_S) as client:
            assert (await client.get(f"/v1/blocks/{key(1)}")).status_code == 404, "a restart starts empty"
            assert (await client.put(f"/v1/blocks/{key(1)}", content=b"y" * BLOCK)).status_code == 201
            assert (await client.get(f"/v1/blocks/{key(1)}")).content == b"y" * BLOCK
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
