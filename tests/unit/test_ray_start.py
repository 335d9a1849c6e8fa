"""Starting a local Ray: a start that times out is retried, a join is not.

Ray waits a fixed 30 s for its raylet to register; a loaded CI box missed that once, and the
whole module then errored. These tests replace ``ray.init`` to make it fail on purpose: the
retry policy is the unit under test, real Ray start-ups are covered by the integration tests.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import psutil  # type: ignore[import-untyped]
import pytest

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
