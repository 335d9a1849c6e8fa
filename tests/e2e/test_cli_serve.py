"""The `switchyard serve` command as a user runs it: start, answer, Ctrl-C, nothing left behind.

Runs the simulator engine so the process is up in seconds; the vLLM path of the same command
is covered by test_serve_openai.py through the same `start_stack`.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest

pytestmark = pytest.mark.ray


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_healthy(url: str, proc: subprocess.Popen[str], within_s: float) -> None:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"serve exited early with {proc.returncode}"
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    raise AssertionError(f"{url} not healthy within {within_s}s")


def test_serve_answers_then_ctrl_c_stops_everything(tiny_model_dir: Path) -> None:
    """`switchyard serve --engine sim` serves completions, prints where, and exits 0 on SIGINT
    with its Ray cluster and instance processes gone."""
    port = _free_port()
    # Reuse the session's tiny-model build (cache/models/<name>): the gateway needs its tokenizer.
    env = {**os.environ, "SWITCHYARD_CACHE_DIR": str(tiny_model_dir.parent.parent)}
    cmd = [
        sys.executable,
        "-m",
        "switchyard.cli",
        "serve",
        "--engine",
        "sim",
        "--instances",
        "2",
        "--port",
        str(port),
    ]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        _wait_healthy(f"http://127.0.0.1:{port}/health", proc, within_s=120)
        resp = httpx.post(
            f"http://127.0.0.1:{port}/v1/completions",
            json={"model": "switchyard-sim", "prompt": "hi", "max_tokens": 5, "ignore_eos": True},
            timeout=30,
        )
        assert resp.status_code == 200, resp.text
        assert resp.json()["usage"]["completion_tokens"] == 5
        children = psutil.Process(proc.pid).children(recursive=True)
        assert children, "serve should have started Ray and instance processes"
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, out[-3000:]
    assert f"http://127.0.0.1:{port}/v1" in out
    assert "SIMULATOR" in out
    leftovers = subprocess.run(
        ["pgrep", "-f", f"session_.*{proc.pid}"], capture_output=True, text=True
    ).stdout
    assert leftovers == ""
