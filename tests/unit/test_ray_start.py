"""Starting a local Ray: a start that times out is retried, a join is not.

Ray waits a fixed 30 s for its raylet to register; a loaded CI box missed that once, and the
whole module then errored. These tests replace ``ray.init`` to make it fail on purpose: the
retry policy is the unit under test, real Ray start-ups are covered by the integration tests.
"""

from __future__ import annotations

import asyncio
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import psutil  # type: ignore[import-untyped]
import pytest
from ray._private import services

from switchyard.workers import local_cluster


class _FlakyInit:
    """``ray.init`` that fails the first ``failures`` calls the way Ray's start-up timeout does."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.calls: list[dict[str, object]] = []
        self.shutdowns = 0
        self.cleanups = 0

    def init(self, **kwargs: object) -> None:
        self.calls.append(kwargs)
        if len(self.calls) <= self.failures:
            raise Exception("The current node timed out during startup.")

    def shutdown(self) -> None:
        self.shutdowns += 1

    def cleanup(self) -> None:
        self.cleanups += 1


@pytest.fixture
def flaky(monkeypatch: pytest.MonkeyPatch) -> _FlakyInit:
    fake = _FlakyInit(failures=0)
    monkeypatch.setattr(local_cluster.ray, "init", fake.init)
    monkeypatch.setattr(local_cluster.ray, "shutdown", fake.shutdown)
    monkeypatch.setattr(local_cluster, "_kill_half_started_ray", fake.cleanup)
    return fake


def test_a_local_start_that_timed_out_is_retried_after_a_shutdown(flaky: _FlakyInit) -> None:
    flaky.failures = local_cluster.RAY_START_ATTEMPTS - 1
    local_cluster._init_ray([], ray_address=None, num_cpus=2)
    assert len(flaky.calls) == local_cluster.RAY_START_ATTEMPTS
    assert flaky.shutdowns == flaky.cleanups == local_cluster.RAY_START_ATTEMPTS - 1
    assert all(call["num_cpus"] == 2 and call["namespace"] == "switchyard" for call in flaky.calls)


def test_a_local_start_gives_up_after_the_last_attempt(flaky: _FlakyInit) -> None:
    flaky.failures = local_cluster.RAY_START_ATTEMPTS
    with pytest.raises(Exception, match="timed out during startup"):
        local_cluster._init_ray([], ray_address=None, num_cpus=None)
    assert len(flaky.calls) == local_cluster.RAY_START_ATTEMPTS


def test_a_local_start_never_joins_a_cluster_this_machine_knows_of(flaky: _FlakyInit) -> None:
    """``address="local"``: Ray's default (None) would join ``$RAY_ADDRESS`` or the last
    ``ray start`` recorded in /tmp/ray, even a dead one (serve then hung at start-up)."""
    local_cluster._init_ray([], ray_address=None, num_cpus=2)
    local_cluster._init_ray([], ray_address="ray://head:10001", num_cpus=None)
    assert [call["address"] for call in flaky.calls] == ["local", "ray://head:10001"]


def test_joining_a_cluster_is_not_retried(flaky: _FlakyInit) -> None:
    """A wrong address should fail at once, not after three waits."""
    flaky.failures = 1
    with pytest.raises(Exception, match="timed out"):
        local_cluster._init_ray([], ray_address="ray://head:10001", num_cpus=None)
    assert len(flaky.calls) == 1 and flaky.shutdowns == 0


def test_the_processes_of_a_half_started_ray_are_killed(tmp_path: Path) -> None:
    """Children named like Ray's daemons die (a failed start left them); other children live.

    Real processes: ``sleep`` copied under the daemons' names, so ``ps`` sees those names.
    """
    sleep = shutil.which("sleep")
    assert sleep is not None
    procs = {}
    for name in ("raylet", "gcs_server", "bystander"):
        exe = tmp_path / name
        shutil.copy(sleep, exe)
        procs[name] = subprocess.Popen([str(exe), "60"])
    try:
        local_cluster._kill_half_started_ray()  # kills and reaps: nothing left to wait for
        assert procs["raylet"].poll() is not None and not psutil.pid_exists(procs["raylet"].pid)
        assert procs["gcs_server"].poll() is not None and not psutil.pid_exists(procs["gcs_server"].pid)
        assert procs["bystander"].poll() is None, "a child that is not Ray's must be left alone"
    finally:
        for proc in procs.values():
            proc.kill()
            proc.wait()


def _our_handler(signum: int, frame: object) -> None:
    """Stands in for the event loop's handler (``loop.add_signal_handler``)."""


def _rays_handler(signum: int, frame: object) -> None:
    """Stands in for the handler ``ray.init`` installs (a ``sys.exit``)."""


def _signal_grabbing_init(**kwargs: object) -> None:
    """``ray.init`` setting SIGTERM handlers the ways Ray 2.60 does: through its installer, and
    directly (as its C++ core worker does, a change Python cannot even see)."""
    local_cluster.ray._private.utils.set_sigterm_handler(_rays_handler)
    signal.signal(signal.SIGTERM, _rays_handler)


@pytest.fixture
def sigterm_restored() -> Iterator[None]:
    before = signal.getsignal(signal.SIGTERM)
    yield
    signal.signal(signal.SIGTERM, before)


def test_ray_start_keeps_the_processs_own_sigterm_handler(
    monkeypatch: pytest.MonkeyPatch, sigterm_restored: None
) -> None:
    """`serve`'s loop handler survives ray.init, so SIGTERM stops it in order (not sys.exit)."""
    monkeypatch.setattr(local_cluster.ray, "init", _signal_grabbing_init)
    installer = local_cluster.ray._private.utils.set_sigterm_handler
    signal.signal(signal.SIGTERM, _our_handler)
    local_cluster._init_ray([], ray_address=None, num_cpus=1)
    assert signal.getsignal(signal.SIGTERM) is _our_handler
    assert local_cluster.ray._private.utils.set_sigterm_handler is installer


def test_ray_start_leaves_rays_handler_to_a_process_without_one(
    monkeypatch: pytest.MonkeyPatch, sigterm_restored: None
) -> None:
    """A library user that installed nothing keeps Ray's handler, which cleans Ray up."""
    monkeypatch.setattr(local_cluster.ray, "init", _signal_grabbing_init)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    local_cluster._init_ray([], ray_address=None, num_cpus=1)
    assert signal.getsignal(signal.SIGTERM) is _rays_handler


def test_ray_processes_left_after_shutdown_are_killed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A Ray daemon's descendants (workers, agents, engines) are found while it runs and killed
    if they outlive the wait; a child that is not Ray's is left alone."""
    shell = shutil.which("sh")
    assert shell is not None
    raylet = tmp_path / "raylet"
    shutil.copy(shell, raylet)
    daemon = subprocess.Popen([str(raylet), "-c", "sleep 60 & wait"])
    bystander = subprocess.Popen(["sleep", "60"])
    try:
        deadline = time.monotonic() + 10
        while not psutil.Process(daemon.pid).children() and time.monotonic() < deadline:
            time.sleep(0.02)
        found = local_cluster._ray_processes()
        assert sorted(p.name() for p in found) == ["raylet", "sleep"]
        asyncio.run(local_cluster._reap(found, 0.2))
        assert daemon.poll() is not None
        assert not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in found)
        assert bystander.poll() is None
        assert "killed 2 Ray processes" in caplog.text
    finally:
        for proc in (daemon, bystander):
            proc.kill()
            proc.wait()


def test_a_local_ray_starts_as_a_loopback_node_a_joined_one_does_not(monkeypatch: pytest.MonkeyPatch) -> None:
    """Ray binds its ports (metrics exporters, gRPC servers, agents) to loopback exactly when its
    node address is loopback; a local start gets that address, a join keeps the cluster's.
    The real binds are checked in tests/e2e/test_cli_serve.py."""
    constants = local_cluster.ray._private.ray_constants
    seen: list[bool] = []
    monkeypatch.setattr(local_cluster.ray, "init", lambda **kwargs: seen.append(constants.ENABLE_RAY_CLUSTER))
    before = constants.ENABLE_RAY_CLUSTER
    local_cluster._init_ray([], ray_address=None, num_cpus=1)
    local_cluster._init_ray([], ray_address="ray://head:10001", num_cpus=None)
    assert seen == [False, before]
    assert constants.ENABLE_RAY_CLUSTER is before
    monkeypatch.setattr(
        local_cluster.ray, "init", lambda **kwargs: seen.append(services.get_node_ip_address())
    )
    local_cluster._init_ray([], ray_address=None, num_cpus=1)
    assert seen[-1] == "127.0.0.1"
