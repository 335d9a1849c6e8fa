"""Fault matrix (issue #16): the operator process SIGKILLed in the middle of a reconcile.

The first operator runs as its own process (so it can be killed for real, mid-request) against
kmock's emulator in this test's process. The emulator applies one of its child-creating requests
but holds the answer (a gate), and the test SIGKILLs the operator right then: some children
exist, the last of them created without the operator ever learning so (its retry would get a
409), the rest never requested. A new
operator (the in-thread harness runner) must converge to the full set of children with no
duplicate, no error condition, and a state so exactly what it renders that a third operator
writes nothing at all.
"""

from __future__ import annotations

import asyncio
import functools
import os
import signal
import subprocess
import sys
import threading
from collections.abc import AsyncIterator
from typing import Any

import kmock
import kopf
import pytest
import pytest_asyncio
import yaml

from tests.helpers.waiting import eventually
from tests.operator import harness
from tests.operator.emulator import K8sEmulator
from tests.operator.harness import REPO, Api, OperatorRunner, condition, objects_of, writes
from tests.operator.test_operator_emulator import (
    NS,
    PD_CHILDREN,
    POOL_CHILDREN,
    create_pd_stack,
    wait_converged,
)

pytestmark = pytest.mark.timeout(120)

CHILD_RESOURCES = ("configmaps", "deployments", "services", "statefulsets")


class GatedEmulator(K8sEmulator):
    """Holds the answer to the ``hold_at``-th create of a child object until ``release`` is set;
    the object itself is created at once (an API server that applied a request whose client
    died before the answer arrived)."""

    hold_at = 3
    creates = 0
    reached: asyncio.Event
    release: asyncio.Event

    async def _handle(self, request: Any) -> Any:
        plural = getattr(request.resource, "plural", None)
        hold = False
        if request.action == kmock.action.CREATE and plural in CHILD_RESOURCES:
            self.creates += 1
            hold = self.creates == self.hold_at
        answer = await super()._handle(request)
        if hold:
            self.reached.set()
            await self.release.wait()
        return answer


@pytest_asyncio.fixture
async def gated() -> AsyncIterator[GatedEmulator]:
    emu = GatedEmulator()
    emu.reached, emu.release = asyncio.Event(), asyncio.Event()
    async with emu, kmock.Server(emu):
        emu.resources.load_bundled()
        for path in sorted((REPO / "deploy" / "crds").glob("*.yaml")):
            emu._register_crd(yaml.safe_load(path.read_text()))
        harness._API_URL.append(str(emu.url).rstrip("/"))
        yield emu
        emu.release.set()


def run_operator(url: str) -> None:
    """Entry point of the operator process: the harness's operator, in a process of its own."""
    harness._API_URL.append(url)
    runner = OperatorRunner(url)
    settings = kopf.OperatorSettings()
    settings.networking.error_backoffs = [0.1]
    settings.watching.reconnect_backoff = 0.1
    memo = kopf.Memo(
        options=harness.fast_options(),
        kube=harness.KubeApi(harness.k8s_client.ApiClient(harness.k8s_client.Configuration(host=url))),
        metrics=runner.metrics,
        drain=runner.drain,
    )
    stop = threading.Event()
    asyncio.run(
        kopf.operator(settings=settings, clusterwide=True, standalone=True, stop_flag=stop, memo=memo)
    )


def operator_process(url: str) -> subprocess.Popen[bytes]:
    code = f"from tests.operator.test_fault_matrix_operator import run_operator; run_operator({url!r})"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen([sys.executable, "-c", code], env=env, cwd=REPO)


def children(emu: K8sEmulator) -> list[tuple[str, str]]:
    found = []
    for resource, kind in (("v1/configmaps", "ConfigMap"), ("apps/v1/deployments", "Deployment"),
                           ("v1/services", "Service"), ("apps/v1/statefulsets", "StatefulSet")):  # fmt: skip
        found += [(kind, o["metadata"]["name"]) for o in objects_of(emu, resource)]
    return sorted(found)


async def test_operator_killed_mid_reconcile_a_new_one_converges_to_the_same_children(
    gated: GatedEmulator,
) -> None:
    url = harness._API_URL[-1]
    api = Api(url)
    first = operator_process(url)
    try:
        await create_pd_stack(api)
        await asyncio.wait_for(gated.reached.wait(), 60)
        first.send_signal(signal.SIGKILL)
        await asyncio.to_thread(first.wait, 10)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    gated.release.set()
    partial = children(gated)
    assert 0 < len(partial) < len(PD_CHILDREN + POOL_CHILDREN), f"not killed mid-reconcile: {partial}"

    second = OperatorRunner(url)
    await second.start()
    try:
        await wait_converged(api)
        assert children(gated) == sorted(PD_CHILDREN + POOL_CHILDREN), "a child missing or duplicated"
        for kind, name in [("LLMService", "llama-pd"), ("ServingPool", "llama-pd-prefill"),
                           ("ServingPool", "llama-pd-decode"), ("KVCachePool", "llama-pd-kv")]:  # fmt: skip
            obj = await api(api.kube.get, kind, NS, name)
            assert condition(obj, "Degraded").get("status") != "True", (kind, name, obj.get("status"))
    finally:
        await second.stop()

    mark = len(gated._requests)
    third = OperatorRunner(url)
    await third.start()
    try:

        def reads(fragment: str) -> int:
            return sum(
                fragment in str(r.url) for r in list(gated._requests)[mark:] if r.method.value == "GET"
            )

        for child in ("llama-pd-router-grpc", "llama-pd-kv-kvcache", "llama-pd-prefill-worker",
                      "llama-pd-decode-worker"):  # fmt: skip
            await eventually(functools.partial(lambda c: reads(f"services/{c}") >= 1, child), 15)
        await asyncio.sleep(0.5)
        assert [f"{r.method.value} {r.url.path}" for r in writes(gated, mark)] == []
    finally:
        await third.stop()
