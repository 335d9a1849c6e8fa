"""Fault matrix (issue #16) at the process level: `switchyard serve --engine sim` as a user runs it.

* The router process (serve) is SIGKILLed with streams open: each client sees its connection
  close at once (no hang), serve's local Ray goes down with it, and a new serve starts cleanly.
* The same on a Ray cluster serve joined (``--ray-address``, how Kubernetes runs it): the
  instances outlive the router, and a restarted serve re-attaches to the very same instance
  processes instead of starting new ones.
* A Ray worker node is lost (a second local node started with ``ray start --address`` and
  killed): the instance placed on it is reported gone, requests on it fail over to the other
  instance, and new requests keep being served.

Every client request runs under a deadline (``bench.soak.stream_completion``): a hang is a
``lost`` record with the reason "deadline", and fails the test.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import psutil
import pytest

from bench.soak import RequestRecord, ServeProcess, free_port, http_status, stream_completion

pytestmark = [pytest.mark.ray, pytest.mark.asyncio(loop_scope="function")]

RAY = str(Path(sys.executable).with_name("ray"))
MODEL = "switchyard-sim"


@pytest.fixture(autouse=True)
def _reuse_tiny_model(tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """serve builds the tiny model for its tokenizer; the session's build is reused. Ray's token
    auth stays off: ``ray start --head`` turns it on by itself when ``~/.ray/auth_token`` exists
    (a developer's machine), which ``ray.init`` in serve then does not send."""
    monkeypatch.setenv("SWITCHYARD_CACHE_DIR", str(tiny_model_dir.parent.parent))
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")


@contextlib.contextmanager
def serving(port: int, *args: str, log: Path, instances: int = 2) -> Iterator[ServeProcess]:
    serve = ServeProcess(port, instances=instances, extra_args=args, log_path=log)
    serve.start()
    try:
        yield serve
    finally:
        serve.stop(timeout_s=30)


async def open_streams(
    port: int, n: int, *, max_tokens: int = 50_000, deadline_s: float = 60.0
) -> list[asyncio.Task[RequestRecord]]:
    """``n`` long streamed completions, returned once each has its first token (or has ended)."""
    t0 = time.monotonic()
    tasks = [
        asyncio.create_task(
            stream_completion(
                port, model=MODEL, prompt=f"fault {i}", max_tokens=max_tokens, deadline_s=deadline_s, t0=t0
            )
        )
        for i in range(n)
    ]
    await asyncio.sleep(3.0)  # first tokens: TTFT is tens of ms on the simulator
    return tasks


async def one_completion(port: int, tokens: int = 16) -> RequestRecord:
    return await stream_completion(
        port, model=MODEL, prompt="after the fault", max_tokens=tokens, deadline_s=30.0, t0=time.monotonic()
    )


def gone_within(procs: list[psutil.Process], within_s: float) -> list[str]:
    """The processes of ``procs`` still running after ``within_s`` (names), zombies counting as gone."""
    deadline = time.monotonic() + within_s
    alive = procs
    while True:
        still = []
        for p in alive:
            with contextlib.suppress(psutil.Error):
                if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                    still.append(p)
        alive = still
        if not alive or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    names = []
    for p in alive:
        with contextlib.suppress(psutil.Error):
            names.append(f"{p.name()} ({p.pid})")
    return names


async def test_killed_router_process_closes_client_streams_and_a_new_serve_starts_clean(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SIGKILL of serve with 5 streams open: every client sees the connection end without
    ``[DONE]`` within a second or two (curl reports "transfer closed"); no request hangs. The
    daemons and instance processes of serve's own Ray exit with it, and a new serve on the same
    port starts and answers.

    Measured, not asserted: Ray's dashboard and runtime-env agents outlive the kill by a minute
    or more (they try to flush their logs to the dead GCS first); they exit on their own.

    ``RAY_ADDRESS`` names a dead cluster: serve starts its own Ray all the same (before the
    fix in ``local_cluster._init_ray`` it tried to join it, and hung at start-up)."""
    monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{free_port()}")
    port = free_port()
    with serving(port, log=tmp_path / "serve1.log") as serve:
        await serve.wait_healthy()
        descendants = psutil.Process(serve.pid).children(recursive=True)
        streams = await open_streams(port, 5)
        t_kill = time.monotonic()
        os.kill(serve.pid, signal.SIGKILL)
        records = await asyncio.wait_for(asyncio.gather(*streams), 30)
        seen_end_s = time.monotonic() - t_kill
        assert all(r.outcome == "lost" and r.detail != "deadline: no end within the request deadline"
                   for r in records), records  # fmt: skip
        assert all(r.tokens == 0 and r.ttft_s is not None for r in records), "each stream had started"
        assert seen_end_s < 10, f"clients noticed the dead router only after {seen_end_s:.1f} s"
    core = [p for p in descendants if not p.name().startswith(("ray::DashboardA", "ray::RuntimeEnv"))]
    assert gone_within(core, 20) == [], "serve's Ray (GCS, raylet, workers, instances) outlived it"
    with serving(port, log=tmp_path / "serve2.log") as again:
        await again.wait_healthy()
        record = await one_completion(port)
        assert record.outcome == "ok", record


@contextlib.contextmanager
def ray_node(*args: str, log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """``ray start --block`` in its own process group; killed (the whole group) on exit.

    On the machine's own address, not loopback: Ray resolves a loopback ``--address`` to the
    node's IP before connecting, so a joined cluster cannot live on 127.0.0.1."""
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [RAY, "start", "--block", "--disable-usage-stats", *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        yield proc
    finally:
        kill_node(proc)


def kill_node(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL a node started by :func:`ray_node`: its process group and every descendant."""
    with contextlib.suppress(psutil.Error):
        tree = psutil.Process(proc.pid).children(recursive=True)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    for p in locals().get("tree", []):
        with contextlib.suppress(psutil.Error):
            p.kill()
    proc.wait(10)


async def wait_for_node(log: Path, proc: subprocess.Popen[bytes], within_s: float = 90) -> None:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        assert proc.poll() is None, tail(log)
        if "Ray runtime started" in tail(log, 100_000):
            return
        await asyncio.sleep(0.5)
    raise AssertionError(f"ray node not up within {within_s} s: {tail(log)}")


def tail(log: Path, size: int = 2000) -> str:
    return log.read_text(errors="replace")[-size:]


@pytest.fixture
async def ray_head(tmp_path: Path) -> AsyncIterator[str]:
    """A local Ray head (2 CPUs, resource ``slot0``) that serve joins with ``--ray-address``.

    In a temp dir of its own: ``ray start`` records its address in ``<temp dir>/ray_current_cluster``,
    and Ray's default ``ray.init()`` joins what /tmp/ray's copy names, even once the head is
    dead; a record left there would capture every other Ray user on the machine. (Short path:
    Ray's socket paths live below it.)"""
    port = free_port()
    log = tmp_path / "head.log"
    temp_dir = tempfile.mkdtemp(prefix="syr-", dir="/tmp")
    try:
        with ray_node(
            "--head", f"--port={port}", "--num-cpus=2", "--include-dashboard=false",
            '--resources={"slot0": 1}', f"--temp-dir={temp_dir}", log=log,
        ) as head:  # fmt: skip
            await wait_for_node(log, head)
            yield f"127.0.0.1:{port}"
    finally:
        shutil.rmtree(temp_dir, ignore_errors=True)


def all_instance_pids() -> set[int]:
    """Instance actor processes anywhere on this machine started after the test's Ray head
    (a joined cluster's workers are the head raylet's children, not serve's)."""
    found = set()
    for p in psutil.process_iter(["cmdline"]):
        cmd = " ".join(p.info["cmdline"] or ())
        if "InstanceActor" in cmd:
            found.add(p.pid)
    return found


async def test_restarted_router_reattaches_to_the_running_instances(ray_head: str, tmp_path: Path) -> None:
    """On a joined Ray cluster the supervisors are detached: SIGKILL of serve leaves the instances
    running, open clients see their connections close, and a new serve (same flags) adopts the
    running pool: the same instance processes, no restart, and requests are served again."""
    before_any = all_instance_pids()
    port = free_port()
    with serving(port, "--ray-address", ray_head, log=tmp_path / "serve1.log") as serve:
        await _wait_joined_healthy(serve, before_any)
        instances = all_instance_pids() - before_any
        assert len(instances) == 2
        streams = await open_streams(port, 3)
        os.kill(serve.pid, signal.SIGKILL)
        records = await asyncio.wait_for(asyncio.gather(*streams), 30)
        assert all(r.outcome == "lost" and not r.detail.startswith("deadline") for r in records), records
    await asyncio.sleep(2.0)
    assert all_instance_pids() - before_any == instances, "the instances should outlive the router"
    with serving(port, "--ray-address", ray_head, log=tmp_path / "serve2.log") as again:
        await _wait_joined_healthy(again, before_any)
        assert all_instance_pids() - before_any == instances, "re-attached to the same processes"
        for _ in range(4):
            record = await one_completion(port)
            assert record.outcome == "ok", record


async def _wait_joined_healthy(serve: ServeProcess, before: set[int], within_s: float = 180) -> None:
    """``wait_healthy`` for a joined cluster, whose instance processes are not serve's children."""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        assert serve.proc is not None and serve.proc.poll() is None, "serve exited"
        if await http_status(serve.port, "/health") == 200 and len(all_instance_pids() - before) >= 2:
            return
        await asyncio.sleep(0.5)
    raise AssertionError("serve did not become healthy")


async def test_lost_ray_worker_node_its_instance_is_dropped_and_requests_fail_over(
    ray_head: str, tmp_path: Path
) -> None:
    """Instance ``sim-1`` is placed on a second Ray node (resource ``slot1``), which is then
    killed outright (raylet and workers). Streams on it fail over to ``sim-0`` and complete; none
    hangs, fails or is cut silently; new requests are served by ``sim-0``, and ``/health`` stays ok.

    Before the supervisor was pinned to the head node (``SUPERVISOR_RESOURCES``), Ray could place
    it on the second node: losing that node then killed the supervisor and, with it, every
    instance it owned (``sim-0`` too), and every stream failed with "no live instance"."""
    worker_log = tmp_path / "worker.log"
    config = tmp_path / "serve.json"
    config.write_text(
        json.dumps({"pools": [{"name": "sim", "instances": 2, "instance_resource": "slot{index}"}]})
    )
    with ray_node(
        f"--address={ray_head}", "--num-cpus=1", '--resources={"slot1": 1}', log=worker_log
    ) as node:
        await wait_for_node(worker_log, node)
        port = free_port()
        before_any = all_instance_pids()
        with serving(
            port, "--ray-address", ray_head, "--config", str(config), log=tmp_path / "serve.log"
        ) as serve:
            await _wait_joined_healthy(serve, before_any)
            on_node = psutil.Process(node.pid).children(recursive=True)
            titles = [" ".join(p.cmdline()) for p in on_node if p.is_running()]
            assert sum("InstanceActor" in t for t in titles) == 1, "sim-1 should run on the second node"
            assert not any("Supervisor" in t for t in titles), "the supervisor must run on the head node"
            streams = await open_streams(port, 8, max_tokens=5000, deadline_s=150)
            kill_node(node)
            records = await asyncio.wait_for(asyncio.gather(*streams), 180)
            assert [r for r in records if r.outcome != "ok"] == [], records
            for _ in range(4):
                record = await one_completion(port)
                assert record.outcome == "ok", record
            assert await http_status(port, "/health") == 200
        assert "failover" in tail(tmp_path / "serve.log", 10**7), "no stream was on the lost node"
