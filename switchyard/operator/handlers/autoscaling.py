"""The autoscaler's loop: scrape the router, write what it says into status, decide ``spec.replicas``.

One Kopf daemon per LLMService with pools (they are observed and decided together: the
prefill:decode band spans them). A daemon rather than a ``kopf.timer`` because a timer's
interval is fixed when the module is imported, and the interval is an operator option
(``autoscale_interval_s``, 30 s by default; tests use a fraction of a second). Each tick
(``run_autoscaler``, in a worker thread: the scrape and the API calls block):

1. Scrape the router's ``/metrics`` once (``OperatorOptions.router_url``). A failure is an
   observation, not an error.
2. Write status (``observation.py``): the LLMService's ``sloAttainment``, each pool's
   ``sloAttainment`` and ``kvUsage``, and on all of them the ``MetricsAvailable`` condition
   (``RouterUnreachable`` clears the numbers). Only keys that differ are written, as a merge
   patch conditional on the resourceVersion just read: a concurrent reconcile wins, and the
   next tick writes again.
3. Decide the autoscaled pools (``autoscaler.decide``) and record each change: the pool's
   ``spec.replicas`` (the scale subresource's field, so the pool's reconcile performs the change
   and drains first), its ``status.lastScaleDecision``/``desiredReplicas``/``lastScaleTime``, and
   a Kubernetes Event on the pool and the service.

No retry storm, no crash: one scrape per service per interval whatever happens; a router going
away is logged as a warning once (when the condition turns False), and an exception in a tick
is logged and the next tick runs on schedule. The previous scrape is kept in ``memo`` so
attainment covers the last interval, not the router's whole life.
"""

from __future__ import annotations

import asyncio
import copy
import datetime
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import kopf
from pydantic import ValidationError

from switchyard.operator.autoscaling.decision import PoolInput, ScaleDecision, ServiceSignals, decide
from switchyard.operator.autoscaling.observation import (
    METRICS_CONDITION,
    ServiceObservation,
    observe,
    unavailable,
)
from switchyard.operator.crd import LLMServiceSpec, ServingPoolSpec
from switchyard.operator.crd.conditions import Condition, merge_conditions, now_rfc3339, status_changes
from switchyard.operator.handlers.common import GROUP, VERSION, PoolsIndex, index_entries
from switchyard.operator.kube import ApiError
from switchyard.operator.router_metrics import RouterSnapshot, parse_router_metrics

__all__ = ["autoscale", "run_autoscaler", "write_observed_status"]

SCALE_IN_FRACTION = 0.5
"""A pool may shrink while its KV usage is below this fraction of its ``targetKvUsage``."""


def _age_s(stamp: str | None, now: datetime.datetime) -> float:
    if not stamp:
        return math.inf
    try:
        then = datetime.datetime.fromisoformat(stamp.replace("Z", "+00:00"))
    except ValueError:
        return math.inf
    return (now - then).total_seconds()


def _inputs(
    entries: Sequence[Mapping[str, Any]], snap: RouterSnapshot | None, now: datetime.datetime
) -> list[PoolInput]:
    out = []
    for entry in entries:
        spec = ServingPoolSpec.model_validate(entry["spec"])
        scaling = spec.autoscaling
        out.append(
            PoolInput(
                name=entry["name"],
                role=spec.role,
                replicas=spec.replicas,
                min_replicas=scaling.min_replicas if scaling.enabled else spec.replicas,
                max_replicas=scaling.max_replicas if scaling.enabled else spec.replicas,
                autoscaled=scaling.enabled,
                target_slo_attainment=scaling.target_slo_attainment,
                target_kv_usage=scaling.target_kv_usage,
                scale_in_kv_usage=scaling.target_kv_usage * SCALE_IN_FRACTION,
                kv_usage=snap.pool_kv_usage(entry["name"]) if snap else None,
                seconds_since_last_change=_age_s(entry["status"].get("lastScaleTime"), now),
            )
        )
    return out


EventPoster = Callable[..., None]
"""Posts a Kubernetes Event: ``(objs, *, reason, message)``."""


def post_normal_event(obj: Any, *, reason: str, message: str) -> None:
    """A ``Normal`` Event, posted whatever ``settings.posting.level`` filters out of handler logs."""
    kopf.event(obj, type="Normal", reason=reason, message=message)


def _status_delta(
    status: Mapping[str, Any] | None, fields: Mapping[str, Any], condition: Condition
) -> dict[str, Any]:
    live = dict(status or {})
    conditions = merge_conditions(live.get("conditions"), [condition], generation=None)
    return status_changes(live, {**fields, "conditions": conditions})


def write_observed_status(
    kube: Any,
    kind: str,
    namespace: str,
    name: str,
    fields: Mapping[str, Any],
    condition: Condition,
    *,
    known_status: Mapping[str, Any] | None,
    attempts: int = 3,
) -> bool:
    """Write ``fields`` and ``condition`` into the object's status if they differ; True if written.

    ``known_status`` (from the index or the daemon's body) filters out the common no-change case
    without a read; otherwise the live object is read and the patch carries its resourceVersion,
    so a status written meanwhile by a reconcile is never overwritten with an older view. On a
    conflict (409) it reads and tries again, ``attempts`` times in all: a measurement skipped
    here would not come back, since a quiet next interval has nothing to report.
    """
    if not _status_delta(known_status, fields, condition):
        return False
    for _ in range(attempts):
        live = kube.get(kind, namespace, name)
        if live is None or live["metadata"].get("deletionTimestamp"):
            return False
        changes = _status_delta(live.get("status"), fields, condition)
        if not changes:
            return False
        rv = live["metadata"].get("resourceVersion")
        try:
            body = {"metadata": {"resourceVersion": rv}, "status": changes}
            kube.patch(kind, namespace, name, body, subresource="status")
        except ApiError as exc:
            if exc.status == 409:
                continue
            if exc.status == 404:
                return False
            raise
        return True
    return False


def _record(
    kube: Any, entry: Mapping[str, Any], decision: ScaleDecision, service_body: Any, post: EventPoster
) -> None:
    ns, name = entry["body"]["metadata"]["namespace"], entry["name"]
    stamp = now_rfc3339()
    kube.patch("ServingPool", ns, name, {"spec": {"replicas": decision.desired}})
    record = {
        "time": stamp,
        "fromReplicas": decision.current,
        "toReplicas": decision.desired,
        "reason": decision.reason,
        "message": decision.message,
    }
    status = {"desiredReplicas": decision.desired, "lastScaleTime": stamp, "lastScaleDecision": record}
    kube.patch("ServingPool", ns, name, {"status": status}, subresource="status")
    verb = "ScaleOut" if decision.desired > decision.current else "ScaleIn"
    message = (
        f"{name}: {decision.current} -> {decision.desired} replicas ({decision.reason}: {decision.message})"
    )
    post(entry["body"], reason=verb, message=message)
    post(service_body, reason=verb, message=message)


def _was_available(status: Mapping[str, Any] | None) -> bool:
    conditions = (status or {}).get("conditions") or []
    return not any(c.get("type") == METRICS_CONDITION and c.get("status") == "False" for c in conditions)


def run_autoscaler(
    body: Mapping[str, Any],
    *,
    memo: Any,
    index: Any,
    logger: Any,
    now: datetime.datetime | None = None,
    post: EventPoster = post_normal_event,
) -> list[ScaleDecision]:
    """One tick for one LLMService: observe, write status, decide; returns the decisions."""
    meta = body["metadata"]
    ns, name = meta["namespace"], meta["name"]
    entries = [e for e in index_entries(index, ns, name) if not e["deleting"]]
    try:
        spec = LLMServiceSpec.model_validate(body.get("spec") or {})
        pools = [ServingPoolSpec.model_validate(e["spec"]) for e in entries]
    except ValidationError:
        return []  # reported by the reconcile handlers
    if not entries:
        return []
    kube, options = memo["kube"], memo["options"]
    now = now or datetime.datetime.now(datetime.UTC)
    url = options.router_base_url(service=name, namespace=ns, port=spec.gateway.port) + "/metrics"
    roles = {e["name"]: p.role for e, p in zip(entries, pools, strict=True)}
    snap: RouterSnapshot | None = None
    obs: ServiceObservation
    try:
        snap = parse_router_metrics(memo["metrics"].scrape(url))
    except (OSError, ValueError) as exc:
        obs = unavailable(f"{url}: {exc}", roles)
        if _was_available(body.get("status")):
            logger.warning("router metrics unavailable at %s: %s", url, exc)
    if snap is not None:
        slo = spec.router.slo
        previous: RouterSnapshot | None = memo["scrapes"].get((ns, name))
        memo["scrapes"][(ns, name)] = snap
        obs = observe(
            snap, previous, ttft_slo_s=slo.ttft_ms / 1000, tpot_slo_s=slo.tpot_ms / 1000, pools=roles
        )
    condition = obs.condition()
    write_observed_status(
        kube, "LLMService", ns, name, obs.status(), condition, known_status=body.get("status")
    )
    for entry in entries:
        fields = obs.pools[entry["name"]].status()
        write_observed_status(
            kube, "ServingPool", ns, entry["name"], fields, condition, known_status=entry["status"]
        )
    if not any(p.autoscaling.enabled for p in pools):
        return []
    band = next(
        (p.autoscaling.prefill_decode_ratio for p in pools if p.autoscaling.prefill_decode_ratio), None
    )
    signals = ServiceSignals(
        metrics_available=obs.available,
        ttft_attainment=obs.ttft_attainment,
        tpot_attainment=obs.tpot_attainment,
        ratio_min=band.min if band else None,
        ratio_max=band.max if band else None,
        scale_in_cooldown_s=options.scale_in_cooldown_s,
    )
    decisions = decide(_inputs(entries, snap, now), signals)
    for entry, pool, decision in zip(entries, pools, decisions, strict=True):
        if decision.changed and pool.autoscaling.enabled:
            logger.info(
                "autoscaler: %s %d -> %d (%s)",
                decision.pool,
                decision.current,
                decision.desired,
                decision.reason,
            )
            _record(kube, entry, decision, body, post)
    return decisions


@kopf.daemon(GROUP, VERSION, "llmservices", id="autoscale", cancellation_timeout=5.0)
async def autoscale(
    body: kopf.Body,
    memo: kopf.Memo,
    logger: kopf.Logger,
    stopped: kopf.DaemonStopped,
    pools_by_service: PoolsIndex | None = None,
    **_: Any,
) -> None:
    """Every ``autoscale_interval_s``: one ``run_autoscaler`` tick for this service."""
    key = (body.metadata.namespace or "", body.metadata.name or "")
    interval = memo["options"].autoscale_interval_s
    try:
        while not stopped:
            await stopped.wait(interval)
            if stopped:
                break
            # Snapshots taken in Kopf's loop: the body and the index change under it, the tick
            # runs in a worker thread.
            service = copy.deepcopy(dict(body))
            index = {key: index_entries(pools_by_service, *key)}
            try:
                await asyncio.to_thread(run_autoscaler, service, memo=memo, index=index, logger=logger)
            except Exception as exc:  # the next tick retries; never crash or spin the daemon
                logger.error("autoscaler tick failed: %s", exc)
    finally:
        memo["scrapes"].pop(key, None)
