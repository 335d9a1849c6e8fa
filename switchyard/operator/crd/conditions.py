"""Status conditions (Ready, Progressing, Degraded) computed as data, written only when they change.

Handlers compute the whole desired status each time (level-based) and hand it to
``status_changes``, which returns only the keys that differ from the live status. Conditions
keep their ``lastTransitionTime`` while their status stays the same, so a reconcile that finds
everything in place produces an empty patch: a restarted operator converges without writing.

Two writers share ``status.conditions``: the reconcile handlers own Ready, Progressing and
Degraded, the autoscaler's loop owns MetricsAvailable. ``merge_conditions`` therefore keeps
live conditions of types it was not given, and always orders the list the same way
(``CONDITION_ORDER``), so neither writer drops nor reorders the other's entries.
"""

from __future__ import annotations

import datetime
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

__all__ = [
    "CONDITION_ORDER",
    "Condition",
    "merge_conditions",
    "now_rfc3339",
    "standard_conditions",
    "status_changes",
]

CONDITION_ORDER = ("Ready", "Progressing", "Degraded", "MetricsAvailable")
"""Order of conditions in every status; unknown types follow, by name."""

ConditionStatus = Literal["True", "False", "Unknown"]


def now_rfc3339() -> str:
    """The current time as Kubernetes writes timestamps (UTC, seconds)."""
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True, slots=True)
class Condition:
    """One condition as computed by a handler, before timestamps."""

    type: str
    status: ConditionStatus
    reason: str
    message: str = ""


def standard_conditions(*, ready: bool, progressing: bool, reason: str, message: str) -> list[Condition]:
    """The three conditions every Switchyard kind reports, from one summary.

    ``reason``/``message`` describe the state: a Degraded object carries them on Degraded
    (Ready and Progressing are False then); a healthy or converging one carries them on Ready or
    Progressing.
    """
    if not ready and not progressing:
        return [
            Condition("Ready", "False", reason, message),
            Condition("Progressing", "False", reason, message),
            Condition("Degraded", "True", reason, message),
        ]
    return [
        Condition("Ready", "True" if ready else "False", reason, message),
        Condition("Progressing", "True" if progressing else "False", reason, message),
        Condition("Degraded", "False", "AsExpected", ""),
    ]


def _order(cond: Mapping[str, Any]) -> tuple[int, str]:
    kind = str(cond.get("type", ""))
    return (CONDITION_ORDER.index(kind) if kind in CONDITION_ORDER else len(CONDITION_ORDER), kind)


def merge_conditions(
    live: Sequence[Mapping[str, Any]] | None,
    computed: Sequence[Condition],
    *,
    generation: int | None,
    now: str | None = None,
) -> list[dict[str, Any]]:
    """The conditions to store: ``computed``, keeping each live ``lastTransitionTime`` whose status
    held, plus the live conditions of other types unchanged, in ``CONDITION_ORDER``."""
    by_type = {c.get("type"): c for c in live or ()}
    stamp = now or now_rfc3339()
    out: list[dict[str, Any]] = []
    for cond in computed:
        old = by_type.pop(cond.type, None)
        since = old.get("lastTransitionTime") if old and old.get("status") == cond.status else None
        entry: dict[str, Any] = {
            "type": cond.type,
            "status": cond.status,
            "reason": cond.reason,
            "message": cond.message,
            "lastTransitionTime": since or stamp,
        }
        if generation is not None:
            entry["observedGeneration"] = generation
        out.append(entry)
    out.extend(dict(other) for other in by_type.values())
    return sorted(out, key=_order)


def status_changes(live: Mapping[str, Any] | None, desired: Mapping[str, Any]) -> dict[str, Any]:
    """Top-level status keys whose desired value differs from the live one (empty: write nothing)."""
    live = live or {}
    return {key: value for key, value in desired.items() if live.get(key) != value}
