"""The autoscaler's timer: gather router metrics and pool bounds, decide, write ``spec.replicas``.

One timer per LLMService (its pools are decided together: the prefill:decode band spans them).
It only writes when a decision changes a pool: the pool's ``spec.replicas`` (the scale
subresource's field, so the pool's reconcile performs the change and drains first), the pool's
``status.lastScaleDecision``/``desiredReplicas``/``lastScaleTime``, and a Kubernetes Event on the
pool and the service. Services with no autoscaled pool cost one index lookup per tick.

The interval is fixed when the handler is registered (Kopf timers are declared, not
configured), 30 s: long enough for a scrape interval's worth of requests, short next to the
minutes an engine takes to start. The previous scrape is kept in ``memo`` so attainment covers
the last interval, not the router's whole life.
"""

from __future__ import annotations

import datetime
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import kopf
from pydantic import ValidationError

from switchyard.operator.autoscaler import PoolInput, ScaleDecision, ServiceSignals, decide
from switchyard.operator.conditions import now_rfc3339
from switchyard.operator.handlers.common import GROUP, VERSION, PoolsIndex, index_entries
from switchyard.operator.models import LLMServiceSpec, ServingPoolSpec
from switchyard.operator.render import child_names
from switchyard.operator.router_metrics import RouterSnapshot, attainment, parse_router_metrics

__all__ = ["AUTOSCALE_INTERVAL_S", "autoscale", "run_autoscaler"]

AUTOSCALE_INTERVAL_S = 30.0
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


def run_autoscaler(
    body: Mapping[str, Any],
    *,
    memo: Any,
    index: Any,
    logger: Any,
    now: datetime.datetime | None = None,
    post: EventPoster = post_normal_event,
) -> list[ScaleDecision]:
    """One autoscaler tick for one LLMService; returns the decisions (tests read them)."""
    meta = body["metadata"]
    ns, name = meta["namespace"], meta["name"]
    entries = [e for e in index_entries(index, ns, name) if not e["deleting"]]
    try:
        spec = LLMServiceSpec.model_validate(body.get("spec") or {})
        pools = [ServingPoolSpec.model_validate(e["spec"]) for e in entries]
    except ValidationError:
        return []  # reported by the reconcile handlers
    if not any(p.autoscaling.enabled for p in pools):
        return []
    now = now or datetime.datetime.now(datetime.UTC)
    url = f"http://{child_names(name)['router']}.{ns}.svc:{spec.gateway.port}/metrics"
    snap: RouterSnapshot | None
    try:
        snap = parse_router_metrics(memo["metrics"].scrape(url))
    except (OSError, ValueError) as exc:
        logger.warning("router metrics unavailable at %s: %s", url, exc)
        snap = None
    previous: RouterSnapshot | None = memo["scrapes"].get((ns, name))
    if snap is not None:
        memo["scrapes"][(ns, name)] = snap
    ttft = tpot = None
    if snap is not None:
        slo = spec.router.slo
        ttft, _ = attainment(
            snap.ttft_buckets, slo.ttft_ms / 1000, before=previous.ttft_buckets if previous else None
        )
        tpot, _ = attainment(
            snap.tpot_buckets, slo.tpot_ms / 1000, before=previous.tpot_buckets if previous else None
        )
    band = next(
        (p.autoscaling.prefill_decode_ratio for p in pools if p.autoscaling.prefill_decode_ratio), None
    )
    signals = ServiceSignals(
        metrics_available=snap is not None,
        ttft_attainment=ttft,
        tpot_attainment=tpot,
        ratio_min=band.min if band else None,
        ratio_max=band.max if band else None,
        scale_in_cooldown_s=memo["options"].scale_in_cooldown_s,
    )
    decisions = decide(_inputs(entries, snap, now), signals)
    for entry, decision in zip(entries, decisions, strict=True):
        if decision.changed and ServingPoolSpec.model_validate(entry["spec"]).autoscaling.enabled:
            logger.info(
                "autoscaler: %s %d -> %d (%s)",
                decision.pool,
                decision.current,
                decision.desired,
                decision.reason,
            )
            _record(memo["kube"], entry, decision, body, post)
    return decisions


@kopf.timer(
    GROUP,
    VERSION,
    "llmservices",
    id="autoscale",
    interval=AUTOSCALE_INTERVAL_S,
    initial_delay=AUTOSCALE_INTERVAL_S,
)
def autoscale(
    body: kopf.Body,
    memo: kopf.Memo,
    logger: kopf.Logger,
    pools_by_service: PoolsIndex | None = None,
    **_: Any,
) -> None:
    """Decide the service's autoscaled pools from the router's metrics (see ``autoscaler``)."""
    run_autoscaler(body, memo=memo, index=pools_by_service, logger=logger)
