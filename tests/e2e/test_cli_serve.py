"""The `switchyard serve` command as a user runs it: start, answer, Ctrl-C or SIGTERM, nothing left behind.

Runs the simulator engine so the process is up in seconds; the vLLM path of the same command
is covered by test_serve_openai.py through the same `start_stack`.
"""

from __future__ import annotations

import ipaddress
import json
import os
import signal
import socket
import subprocess
import sys
import threading
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


def _is_loopback(ip: str) -> bool:
    return ipaddress.ip_address(ip.removeprefix("::ffff:")).is_loopback


def _non_loopback_listeners(procs: list[psutil.Process]) -> list[str]:
    """Every listening TCP socket and bound UDP socket of ``procs`` not on loopback (``0.0.0.0``,
    ``::``, the machine's own address): what another machine could reach."""
    found = []
    for proc in procs:
        try:
            for conn in proc.net_connections(kind="inet"):
                listening = conn.status == psutil.CONN_LISTEN or conn.type == socket.SOCK_DGRAM
                if listening and conn.laddr and not _is_loopback(conn.laddr.ip):
                    found.append(f"{proc.name()} ({proc.pid}) on {conn.laddr.ip}:{conn.laddr.port}")
        except psutil.Error:
            pass
    return found


def test_serve_answers_then_ctrl_c_stops_everything(tiny_model_dir: Path) -> None:
    """`switchyard serve --engine sim` serves completions, prints where, and exits 0 on SIGINT
    with its Ray cluster and instance processes gone. No process it started listens beyond
    loopback: before the fix, Ray's metrics exporters bound 0.0.0.0 and its gRPC servers ``::``."""
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
        assert any(c.name() == "raylet" for c in children)
        exposed = _non_loopback_listeners([psutil.Process(proc.pid), *children])
        assert not exposed, f"ports reachable from other machines: {exposed}"
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


class _Stream:
    """A streamed completion read in a thread: its SSE data lines, when each came, how it ended."""

    def __init__(self, port: int, max_tokens: int) -> None:
        self.data: list[str] = []
        self.arrivals: list[float] = []
        self.error: Exception | None = None
        body = {"model": "switchyard-sim", "prompt": "hi", "max_tokens": max_tokens, "ignore_eos": True}
        self._args = (f"http://127.0.0.1:{port}/v1/completions", {**body, "stream": True})
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        url, body = self._args
        try:
            with httpx.stream("POST", url, json=body, timeout=60) as resp:
                assert resp.status_code == 200, resp.read()
                for line in resp.iter_lines():
                    if line.startswith("data: "):
                        self.data.append(line.removeprefix("data: "))
                        self.arrivals.append(time.monotonic())
        except Exception as exc:  # a cut connection: what the test must never see
            self.error = exc

    def join(self, timeout_s: float) -> None:
        self._thread.join(timeout_s)
        assert not self._thread.is_alive(), "the stream neither ended nor was cut"

    def outcome(self) -> str:
        """``done`` (finish chunk and [DONE]), ``error`` (an SSE error event last), else a failure."""
        assert self.error is None, f"the stream was cut: {self.error!r} after {len(self.data)} events"
        assert self.data, "the stream ended without a single event"
        if self.data[-1] == "[DONE]":
            assert any(json.loads(d)["choices"][0]["finish_reason"] for d in self.data[:-1]), self.data[-3:]
            return "done"
        last = json.loads(self.data[-1])
        assert "error" in last, f"the stream ended silently: last event {self.data[-1]}"
        assert "shutting down" in last["error"]["message"] and last["error"]["code"] == "capacity_exceeded"
        return "error"


def _process_tree(pid: int) -> list[psutil.Process]:
    """``pid``'s descendants and every other process of its session and process group.

    Ray's workers start their own process group and are re-parented once the raylet dies, so
    the session (``serve`` leads one here) catches them too.
    """
    found = {p.pid: p for p in psutil.Process(pid).children(recursive=True)}
    for proc in psutil.process_iter():
        try:
            if proc.pid != pid and (os.getsid(proc.pid) == pid or os.getpgid(proc.pid) == pid):
                found[proc.pid] = proc
        except (OSError, psutil.Error):
            pass
    return list(found.values())


def _alive(procs: list[psutil.Process]) -> list[str]:
    left = []
    for proc in procs:
        try:
            if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                left.append(f"{proc.pid} {proc.name()}")
        except psutil.Error:
            pass
    return left


GRACE_S = 2.0
"""Short, and not the default (5 s), so the test shows ``--shutdown-grace-s`` is what applies."""
EXIT_MARGIN_S = 20.0
"""Beyond the grace: the router, the engines and Ray stop (about 4 s on the loaded 2-core CI box)."""


def _serve(port: int, tiny_model_dir: Path) -> subprocess.Popen[str]:
    """`serve --engine sim` in its own session, as under a process manager, so that every
    process it starts is found by session even once re-parented."""
    env = {**os.environ, "SWITCHYARD_CACHE_DIR": str(tiny_model_dir.parent.parent)}
    cmd = [sys.executable, "-m", "switchyard.cli", "serve", "--engine", "sim", "--instances", "2"]
    cmd += ["--port", str(port), "--shutdown-grace-s", str(GRACE_S)]
    return subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )


def test_sigterm_stops_like_ctrl_c_streams_finish_or_get_an_error_event(tiny_model_dir: Path) -> None:
    """SIGTERM (Kubernetes, systemd, docker stop) is an orderly stop, like Ctrl-C.

    A stream that finishes within ``--shutdown-grace-s`` gets all of it; one that cannot ends
    with an SSE error event after the grace, never a cut connection; `serve` exits 0 within the
    grace plus a margin, and no process it started (Ray's daemons, workers, agents) outlives it.
    Before the fix, ``ray.init``'s own SIGTERM handler raised ``SystemExit`` mid-stream: the
    connections were cut, nothing stopped in order, and the exit status was 15.
    """
    port = _free_port()
    proc = _serve(port, tiny_model_dir)
    try:
        _wait_healthy(f"http://127.0.0.1:{port}/health", proc, within_s=120)
        long = _Stream(port, max_tokens=20_000)  # minutes of simulated decoding: cannot finish in time
        short = _Stream(port, max_tokens=40)  # well under a second
        deadline = time.monotonic() + 30
        while not (long.data and short.data) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert long.data and short.data, "the streams did not start"
        procs = _process_tree(proc.pid)
        assert any(p.name() == "raylet" for p in procs), [p.name() for p in procs]
        sent = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=GRACE_S + EXIT_MARGIN_S)
        exited = time.monotonic() - sent
        left = _alive(procs)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, out[-3000:]
    assert exited <= GRACE_S + EXIT_MARGIN_S
    assert not left, f"still running after serve exited: {left}"
    long.join(10)
    short.join(10)
    assert short.outcome() == "done"
    assert long.outcome() == "error"
    # The grace given was honoured: the long stream went on until it was over, then ended.
    ended = long.arrivals[-1] - sent
    assert GRACE_S - 0.5 <= ended <= GRACE_S + 2.5, ended
    assert long.arrivals[-2] - sent >= GRACE_S - 1.0, "the stream stalled during the grace period"
    assert "SIGTERM: shutting down" in out


def test_sigterm_while_starting_stops_what_was_started(tiny_model_dir: Path) -> None:
    """SIGTERM while Ray and the engines start (a rollout replacing a pod still starting) stops
    what had started, exits 0 and leaves no process behind. Before the fix, Ray's handler exited
    15 from inside the start-up (or aborted) and Ray's agents outlived `serve` by a minute."""
    proc = _serve(_free_port(), tiny_model_dir)
    try:
        deadline = time.monotonic() + 120
        procs: list[psutil.Process] = []
        while not any(p.name() == "raylet" for p in procs) and time.monotonic() < deadline:
            assert proc.poll() is None, f"serve exited early with {proc.returncode}"
            time.sleep(0.1)
            procs = _process_tree(proc.pid)
        assert procs, "serve did not start Ray"
        time.sleep(1.0)  # into the start-up: Ray's own, or the supervisors'
        procs += [p for p in _process_tree(proc.pid) if p.pid not in {q.pid for q in procs}]
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)  # Ray's start-up finishes first: it cannot be interrupted
        left = _alive(procs)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, out[-3000:]
    assert not left, f"still running after serve exited: {left}"
    assert "SIGTERM: shutting down" in out
