"""What the three kinds' handlers share: spec parsing, child apply, status, the pools index.

Why here: every handler follows the same four steps (parse, render, apply, report) with the same
failure policy, so the policy lives once. ``Degraded`` is the only way a problem is reported:
the handler sets the condition, then raises ``PermanentError`` (the spec itself cannot work;
Kopf waits for the next spec change) or ``TemporaryError`` with a delay (something outside the
spec is missing; Kopf retries later). Nothing escapes as a crash: unexpected exceptions are
Kopf's to retry with its back-off.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NoReturn, TypeVar

import kopf
from pydantic import BaseModel, ValidationError

from switchyard.operator.crd import API_GROUP, API_VERSION, ServingPoolSpec
from switchyard.operator.crd.conditions import (
    Condition,
    merge_conditions,
    standard_conditions,
    status_changes,
)
from switchyard.operator.kube import ApiError, ApplyConflictError, KubeApi, apply
from switchyard.operator.render.objects import Owner

__all__ = [
    "GROUP",
    "VERSION",
    "Degraded",
    "PoolsIndex",
    "apply_children",
    "attached_pools",
    "degraded_status",
    "delete_children",
    "index_entries",
    "is_degraded",
    "owner_of",
    "parse",
    "pools_by_service",
    "raise_for",
    "readiness",
    "set_status",
    "status_patch",
]

GROUP, VERSION = API_GROUP, API_VERSION
PoolsIndex = kopf.Index[tuple[str, str], dict[str, Any]]
"""The ``pools_by_service`` index as handlers receive it."""
M = TypeVar("M", bound=BaseModel)


class Degraded(Exception):
    """A failure to report as ``Degraded`` with ``reason``; ``delay`` None means permanent."""

    def __init__(self, reason: str, message: str, *, delay: float | None = None) -> None:
        super().__init__(message)
        self.reason, self.message, self.delay = reason, message, delay


def owner_of(kind: str, body: Mapping[str, Any]) -> Owner:
    meta = body["metadata"]
    return Owner(kind=kind, name=meta["name"], namespace=meta["namespace"], uid=meta["uid"])


def parse(model: type[M], spec: Mapping[str, Any], what: str) -> M:
    """Validate ``spec`` with the CRD model; a spec that passed the schema but not the model is
    permanently invalid (``InvalidSpec``, the first errors in the message)."""
    try:
        return model.model_validate(dict(spec))
    except ValidationError as exc:
        errors = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'spec'}: {e['msg']}" for e in exc.errors()[:3]
        )
        raise Degraded("InvalidSpec", f"{what}: {errors}") from exc


def apply_children(
    kube: KubeApi, children: Sequence[Mapping[str, Any]], logger: Any
) -> dict[tuple[str, str], dict[str, Any]]:
    """Apply every child; returns the live objects by (kind, name). API refusals become ``Degraded``."""
    live: dict[tuple[str, str], dict[str, Any]] = {}
    for child in children:
        meta = child["metadata"]
        try:
            outcome, live[child["kind"], meta["name"]] = apply(kube, child)
        except ApplyConflictError as exc:
            raise Degraded("ChildConflict", str(exc), delay=60.0) from exc
        except ApiError as exc:
            if exc.status in (400, 403, 409, 422):
                raise Degraded(
                    "ChildRejected", f"{child['kind']} {meta['name']}: {exc.message}", delay=60.0
                ) from exc
            raise
        if outcome != "unchanged":
            logger.info("%s %s %s", outcome, child["kind"], meta["name"])
    return live


def delete_children(
    kube: KubeApi, namespace: str | None, children: Sequence[tuple[str, str]], logger: Any
) -> None:
    """Delete (kind, name) children explicitly: the owner-reference garbage collector may not run
    (an emulator has none) and deleting what we own is idempotent anyway."""
    for kind, name in children:
        if kube.delete(kind, namespace or "", name):
            logger.info("deleted %s %s", kind, name)


def readiness(ready: int, desired: int, what: str) -> tuple[bool, str, str]:
    """(ready?, reason, message) of a workload from its ready and desired pod counts."""
    if desired == 0:
        return True, "ScaledToZero", f"no {what} pods requested"
    if ready >= desired:
        return True, "Available", f"{ready}/{desired} {what} pods ready"
    return False, "PodsPending", f"{ready}/{desired} {what} pods ready"


def status_patch(
    live_status: Mapping[str, Any] | None,
    *,
    generation: int | None,
    conditions: Sequence[Condition],
    **fields: Any,
) -> dict[str, Any]:
    """The status keys to write (empty when everything already reads the same)."""
    live = dict(live_status or {})
    desired: dict[str, Any] = {
        "observedGeneration": generation,
        "conditions": merge_conditions(live.get("conditions"), conditions, generation=generation),
        **fields,
    }
    return status_changes(live, desired)


def set_status(patch: kopf.Patch, changes: Mapping[str, Any]) -> None:
    for key, value in changes.items():
        patch.status[key] = value


def degraded_status(
    live_status: Mapping[str, Any] | None, generation: int | None, exc: Degraded
) -> dict[str, Any]:
    conds = standard_conditions(ready=False, progressing=False, reason=exc.reason, message=exc.message)
    return status_patch(live_status, generation=generation, conditions=conds)


def raise_for(exc: Degraded) -> NoReturn:
    """Turn a reported ``Degraded`` into Kopf's retry policy."""
    if exc.delay is None:
        raise kopf.PermanentError(f"{exc.reason}: {exc.message}") from exc
    raise kopf.TemporaryError(f"{exc.reason}: {exc.message}", delay=exc.delay) from exc


def is_degraded(body: Mapping[str, Any]) -> bool:
    """Whether the object currently reports ``Degraded=True``."""
    conditions = (body.get("status") or {}).get("conditions") or []
    return any(c.get("type") == "Degraded" and c.get("status") == "True" for c in conditions)


def index_entries(index: Any, namespace: str | None, service: str) -> list[dict[str, Any]]:
    """The ``pools_by_service`` entries of one service (a missing index reads as empty)."""
    if not index:
        return []
    return list(index.get((namespace or "", service), []))


def attached_pools(index: Any, namespace: str | None, service: str) -> dict[str, ServingPoolSpec]:
    """Valid, not-being-deleted ServingPools of a service, from the ``pools_by_service`` index."""
    pools: dict[str, ServingPoolSpec] = {}
    for entry in index_entries(index, namespace, service):
        if entry["deleting"]:
            continue
        try:
            pools[entry["name"]] = ServingPoolSpec.model_validate(entry["spec"])
        except ValidationError:
            continue  # reported on the pool itself
    return pools


@kopf.index(GROUP, VERSION, "servingpools", id="pools_by_service")
def pools_by_service(
    name: str, namespace: str | None, spec: kopf.Spec, meta: kopf.Meta, body: kopf.Body, **_: Any
) -> dict[tuple[str, str], dict[str, Any]]:
    """ServingPools keyed by (namespace, serviceRef.name): the service renders its config from
    them, the autoscaler scales them, and a new service wakes the ones that waited for it."""
    ref = (spec.get("serviceRef") or {}).get("name", "")
    return {
        (namespace or "", str(ref)): {
            "name": name,
            "spec": dict(spec),
            "deleting": bool(meta.get("deletionTimestamp")),
            "body": {
                "apiVersion": body.get("apiVersion"),
                "kind": body.get("kind"),
                "metadata": {"name": name, "namespace": namespace, "uid": meta.get("uid")},
            },
            "status": dict(body.get("status") or {}),
        }
    }
