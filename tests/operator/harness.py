"""A real Kopf operator (Switchyard's handlers) in its own thread against kmock's emulator.

Per shared/research/k8s-testing.md: the emulator serves the bundled built-in resources plus the
three CRDs from ``deploy/crds`` (status and scale subresources as generated); Kopf logs in to it
through a ``kopf.on.login`` handler; Kopf runs in its own thread and event loop (in pytest's
loop it would treat the fixture teardown as a hung task). The handlers' dependencies arrive
through the memo: a ``KubeApi`` pointed at the emulator, a scripted metrics source and drain
client, and fast retry delays.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import kmock
import kopf
import pytest
import pytest_asyncio
import yaml
from kubernetes import client as k8s_client

import switchyard.operator.handlers  # noqa: F401  (registers the handlers in Kopf's default registry)
from switchyard.operator.kube import KubeApi
from switchyard.operator.settings import OperatorOptions
from tests.operator.emulator import K8sEmulator

REPO = Path(__file__).resolve().parents[2]
_API_URL: list[str] = []


@kopf.on.login(id="emulator-login")
def _login_to_emulator(**_: Any) -> kopf.ConnectionInfo:
    return kopf.ConnectionInfo(server=_API_URL[-1])


class FakeMetrics:
    """A scripted router ``/metrics`` per URL; raises OSError for unknown URLs (router down)."""

    def __init__(self) -> None:
        self.bodies: dict[str, str] = {}
        self.scraped: list[str] = []

    def scrape(self, url: str) -> str:
        self.scraped.append(url)
        if url not in self.bodies:
            raise OSError(f"connection refused: {url}")
        return self.bodies[url]


class FakeDrain:
    """Running requests per pod, set by the test; None (unknown pod) by default."""

    def __init__(self) -> None:
        self.running: dict[str, int] = {}
        self.asked: list[str] = []

    def running_requests(self, router_url: str, pod_name: str) -> int | None:
        self.asked.append(pod_name)
        return self.running.get(pod_name)


def fast_options(**overrides: Any) -> OperatorOptions:
    values: dict[str, Any] = {
        "posting_level": logging.WARNING,
        "error_backoffs": (0.1,),
        "reconnect_backoff_s": 0.1,
        "service_wait_s": (0.3, 0.6),
        "model_pvc_wait_s": 0.3,
        "drain_poll_s": 0.1,
        "drain_timeout_s": 60.0,
    }
    values.update(overrides)
    return OperatorOptions.model_validate(values)


def load_examples(name: str, namespace: str = "default") -> list[dict[str, Any]]:
    docs = [d for d in yaml.safe_load_all((REPO / "deploy" / "examples" / name).read_text()) if d]
    for doc in docs:
        doc["metadata"]["namespace"] = namespace
    return docs


@pytest_asyncio.fixture
async def k8s() -> AsyncIterator[K8sEmulator]:
    async with K8sEmulator() as emu, kmock.Server(emu):
        emu.resources.load_bundled()
        for path in sorted((REPO / "deploy" / "crds").glob("*.yaml")):
            emu._register_crd(yaml.safe_load(path.read_text()))
        _API_URL.append(str(emu.url).rstrip("/"))
        yield emu


class Api:
    """Blocking test-side access to the emulator (through the same client the operator uses)."""

    def __init__(self, url: str) -> None:
        self.kube = KubeApi(k8s_client.ApiClient(k8s_client.Configuration(host=url)))

    async def __call__(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return await asyncio.to_thread(fn, *args, **kwargs)


@pytest.fixture
def api(k8s: K8sEmulator) -> Api:
    return Api(_API_URL[-1])


class OperatorRunner:
    """Starts and stops Kopf operators (one at a time) with injectable memo contents."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.metrics = FakeMetrics()
        self.drain = FakeDrain()
        self._running: tuple[threading.Thread, threading.Event] | None = None

    async def start(self, options: OperatorOptions | None = None, *, metrics: Any = None) -> None:
        """Run Kopf with ``options`` (fast defaults) and ``metrics`` as the router metrics source
        (default: the scripted ``self.metrics``)."""
        assert self._running is None
        settings = kopf.OperatorSettings()
        settings.posting.level = logging.WARNING
        settings.networking.error_backoffs = [0.1]
        settings.watching.reconnect_backoff = 0.1
        memo = kopf.Memo(
            options=options or fast_options(),
            kube=KubeApi(k8s_client.ApiClient(k8s_client.Configuration(host=self.url))),
            metrics=self.metrics if metrics is None else metrics,
            drain=self.drain,
        )
        stop, ready = threading.Event(), threading.Event()
        coro = kopf.operator(
            settings=settings, clusterwide=True, standalone=True, stop_flag=stop, ready_flag=ready, memo=memo
        )
        thread = threading.Thread(target=asyncio.run, args=(coro,), daemon=True)
        thread.start()
        assert await asyncio.to_thread(ready.wait, 10), "operator did not start"
        self._running = (thread, stop)

    async def stop(self) -> None:
        if self._running is None:
            return
        thread, stop = self._running
        stop.set()
        await asyncio.to_thread(thread.join, 10)  # keep the emulator's loop serving meanwhile
        assert not thread.is_alive(), "operator did not stop"
        self._running = None


@pytest_asyncio.fixture
async def operator(k8s: K8sEmulator) -> AsyncIterator[OperatorRunner]:
    runner = OperatorRunner(_API_URL[-1])
    try:
        yield runner
    finally:
        await runner.stop()


def condition(obj: dict[str, Any] | None, kind: str) -> dict[str, Any]:
    """The named condition of an object's status ({} when absent)."""
    for cond in ((obj or {}).get("status") or {}).get("conditions") or []:
        if cond.get("type") == kind:
            return dict(cond)
    return {}


def writes(emu: K8sEmulator, since: int = 0) -> list[Any]:
    """Requests that change state (POST, PATCH, PUT, DELETE) after the ``since``-th request."""
    return [r for r in list(emu._requests)[since:] if r.method.value in {"POST", "PATCH", "PUT", "DELETE"}]


def objects_of(emu: K8sEmulator, resource: str) -> Iterator[dict[str, Any]]:
    """Stored, not deleted objects of ``resource`` (``group/version/plural``; ``v1/events``)."""
    for key, obj in list(emu.objects.items()):
        res = key[0]
        name = f"{getattr(res, 'group', '')}/{getattr(res, 'version', '')}/{getattr(res, 'plural', '')}"
        if resource in {str(res), name.lstrip("/")} and not obj.deleted:
            yield obj.raw
