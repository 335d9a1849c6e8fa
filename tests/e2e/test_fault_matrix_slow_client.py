"""Fault matrix (issue #16): slow clients, which read their streams far slower than tokens come.

`switchyard serve --engine sim` in a subprocess; ``STALLED`` clients each start a long streamed
completion over a socket with a small receive buffer and then read nothing for ``STALL_S``
seconds. What must hold:

* back-pressure: what the stalled streams would have sent (``STALLED`` x ``MAX_TOKENS`` SSE
  chunks, tens of MB) is not buffered in the serve process: its RSS grows by a fraction of it;
* the stalled streams do not hold up anyone else: a normal request completes meanwhile;
* each stalled stream completes, every token and ``[DONE]``, once its client reads again.

There is no server-side limit that cuts a reader that never comes back (docs/reliability.md,
gaps): such a client holds its connection until it closes it.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
from pathlib import Path

import psutil
import pytest

from bench.soak import ServeProcess, free_port, stream_completion

pytestmark = pytest.mark.ray

STALLED = 30
MAX_TOKENS = 4000
STALL_S = 12.0
MODEL = "switchyard-sim"


@pytest.fixture(autouse=True)
def _reuse_tiny_model(tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SWITCHYARD_CACHE_DIR", str(tiny_model_dir.parent.parent))


async def start_stalled_stream(port: int, i: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A streamed completion whose client has read only the response head so far."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    reader, writer = await asyncio.open_connection(sock=sock, limit=1 << 16)
    body = json.dumps({
        "model": MODEL, "prompt": f"slow reader {i}", "max_tokens": MAX_TOKENS, "ignore_eos": True,
        "stream": True, "stream_options": {"include_usage": True},
    }).encode()  # fmt: skip
    writer.write(
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nConnection: close\r\n"
        b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
    )
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
    assert head.startswith(b"HTTP/1.1 200"), head
    return reader, writer


async def read_to_the_end(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> tuple[bool, int]:
    """Read the rest slowly-then-fully: (saw ``[DONE]``, completion tokens from the usage chunk)."""
    data = await asyncio.wait_for(reader.read(), 120)  # Connection: close ends the body
    writer.close()
    done = b"data: [DONE]" in data
    usage = [json.loads(line[6:]) for line in data.split(b"\n") if line.startswith(b'data: {"id"')]
    tokens = next((u["usage"]["completion_tokens"] for u in usage if u.get("usage")), -1)
    return done, tokens


def rss(pid: int) -> int:
    return int(psutil.Process(pid).memory_info().rss)


async def test_stalled_readers_are_back_pressured_and_complete_when_they_read(tmp_path: Path) -> None:
    port = free_port()
    serve = ServeProcess(port, instances=2, log_path=tmp_path / "serve.log")
    serve.start()
    try:
        await serve.wait_healthy()
        warm = await stream_completion(
            port, model=MODEL, prompt="warm", max_tokens=200, deadline_s=30, t0=time.monotonic()
        )
        assert warm.outcome == "ok", warm
        before = rss(serve.pid)
        stalled = [await start_stalled_stream(port, i) for i in range(STALLED)]
        await asyncio.sleep(STALL_S)
        during = rss(serve.pid)
        normal = await stream_completion(
            port, model=MODEL, prompt="not slowed", max_tokens=50, deadline_s=15, t0=time.monotonic()
        )
        assert normal.outcome == "ok", f"a normal request was held up by stalled ones: {normal}"
        ends = await asyncio.gather(*(read_to_the_end(r, w) for r, w in stalled))
        after = rss(serve.pid)
    finally:
        code, _ = serve.stop()
    sse_bytes = STALLED * MAX_TOKENS * 180  # ~180 B per completion chunk
    grown = during - before
    mib = 2**20
    print(f"serve RSS {before / mib:.0f} -> {during / mib:.0f} MiB while stalled (+{grown / mib:.1f} MiB; "
          f"unsent SSE ~{sse_bytes / mib:.0f} MiB), {after / mib:.0f} MiB after")  # fmt: skip
    assert grown < sse_bytes / 4, f"serve buffered the stalled streams: +{grown / 2**20:.1f} MiB"
    assert all(done and tokens == MAX_TOKENS for done, tokens in ends), ends
    assert code == 0
