"""Scale-in drains first: mark the pods a StatefulSet is about to lose, wait until they are idle.

A StatefulSet removes its highest ordinals first, so shrinking ``P-worker`` from N to M removes
pods ``M..N-1``. Before the replicas change, each of those pods is annotated
``switchyard.dev/draining=true`` (with ``draining-since``), and the pool's reconcile holds the
old replica count, retrying every ``drainPoll`` seconds, until the ``DrainClient`` reports no
running requests on each of them, or ``drainTimeout`` has passed since it was marked (then
the pod goes anyway and the router fails its requests over).

The annotation is the signal for the component that empties the pod: the migration issue adds
the real drain (stop routing to the pod, migrate its running requests with their KV cache);
until then the router keeps routing to a draining pod and the wait is bounded by the timeout.
If the pool grows again while pods are marked, the marks are removed.
"""

from __future__ import annotations

import datetime
from collections.abc import Iterable
from typing import Any

from switchyard.operator.kube import KubeApi
from switchyard.operator.router_metrics import DrainClient

__all__ = ["DRAINING", "DRAINING_SINCE", "pending_drains", "release_pods"]

DRAINING = "switchyard.dev/draining"
DRAINING_SINCE = "switchyard.dev/draining-since"


def _parse_time(text: str | None) -> datetime.datetime | None:
    try:
        return datetime.datetime.fromisoformat(text) if text else None
    except ValueError:
        return None


def pending_drains(
    kube: KubeApi,
    drain: DrainClient,
    *,
    namespace: str,
    pods: Iterable[str],
    router_url: str,
    timeout_s: float,
    now: datetime.datetime,
    logger: Any,
) -> list[str]:
    """Mark ``pods`` as draining (once) and return those that still have work and time left."""
    pending: list[str] = []
    for name in pods:
        pod = kube.get("Pod", namespace, name)
        if pod is None:
            continue  # never started or already gone: nothing to drain
        annotations = pod.get("metadata", {}).get("annotations") or {}
        since = _parse_time(annotations.get(DRAINING_SINCE))
        if annotations.get(DRAINING) != "true" or since is None:
            since = now
            kube.patch(
                "Pod",
                namespace,
                name,
                {"metadata": {"annotations": {DRAINING: "true", DRAINING_SINCE: now.isoformat()}}},
            )
            logger.info("pod %s marked draining", name)
        try:
            running = drain.running_requests(router_url, name)
        except OSError as exc:
            logger.warning("drain status of %s unavailable: %s", name, exc)
            running = None
        if running == 0:
            continue
        if (now - since).total_seconds() >= timeout_s:
            logger.warning(
                "pod %s still has %s running request(s) after the drain timeout; removing it", name, running
            )
            continue
        pending.append(name)
    return pending


def release_pods(
    kube: KubeApi, *, namespace: str, selector: dict[str, str], keep_below: int, sts_name: str
) -> None:
    """Remove draining marks from pods the StatefulSet keeps (ordinal < ``keep_below``)."""
    for pod in kube.list("Pod", namespace, selector):
        meta = pod.get("metadata", {})
        name = str(meta.get("name", ""))
        ordinal = name.removeprefix(f"{sts_name}-")
        if (meta.get("annotations") or {}).get(DRAINING) and ordinal.isdigit() and int(ordinal) < keep_below:
            kube.patch(
                "Pod", namespace, name, {"metadata": {"annotations": {DRAINING: None, DRAINING_SINCE: None}}}
            )
