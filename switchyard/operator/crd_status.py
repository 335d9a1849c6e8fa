"""Status models of the Switchyard kinds: what the operator reports back on each object.

Why typed: ``crds.py`` turns them into the status schema (so ``kubectl get -o yaml`` and the
printer columns line up with what handlers write), and tests validate written status against
them. Every field is optional, since a fresh object has no status yet.
"""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import Field

from switchyard.operator.crd_base import CrdModel

__all__ = ["Condition", "KVCachePoolStatus", "LLMServiceStatus", "ScaleDecisionRecord", "ServingPoolStatus"]


class Condition(CrdModel):
    """One observation of the object's state, in the Kubernetes condition convention."""

    type: Literal["Ready", "Progressing", "Degraded"]
    """Ready: serving. Progressing: converging on the spec. Degraded: failing, see reason."""

    status: Literal["True", "False", "Unknown"]
    """Whether the condition holds."""

    reason: str = Field(default="", max_length=1024)
    """CamelCase machine-readable cause (``PodsPending``, ``InvalidSpec``)."""

    message: str = Field(default="", max_length=32768)
    """Human-readable detail."""

    last_transition_time: datetime | None = None
    """When ``status`` last changed."""

    observed_generation: int | None = Field(default=None, ge=0)
    """The ``metadata.generation`` this condition was computed from."""


class _StatusBase(CrdModel):
    observed_generation: int | None = Field(default=None, ge=0)
    """The ``metadata.generation`` the operator last reconciled."""

    conditions: list[Condition] = Field(default_factory=list)
    """Ready, Progressing and Degraded."""

    replicas: int | None = Field(default=None, ge=0)
    """Pods the operator has created."""

    ready_replicas: int | None = Field(default=None, ge=0)
    """Pods that are ready."""

    endpoints: list[str] = Field(default_factory=list)
    """Addresses (``host:port`` or URLs) where this object serves."""


class LLMServiceStatus(_StatusBase):
    """Observed state of an LLMService (its router; replicas count router pods)."""

    slo_attainment: float | None = Field(default=None, ge=0, le=1)
    """Share of recent requests that met both latency objectives."""


class ScaleDecisionRecord(CrdModel):
    """One change the autoscaler made to a pool's replicas, and why."""

    time: datetime | None = None
    """When the decision was made."""

    from_replicas: int = Field(ge=0)
    """Replicas before the decision."""

    to_replicas: int = Field(ge=0)
    """Replicas the decision asked for."""

    reason: str = Field(default="", max_length=64)
    """CamelCase rule that fired (``SLOMiss``, ``KVPressure``, ``LowUtilization``, ``RatioBand``)."""

    message: str = Field(default="", max_length=1024)
    """The numbers behind it, e.g. ``TTFT attainment 0.72 < target 0.90``."""


class ServingPoolStatus(_StatusBase):
    """Observed state of a ServingPool."""

    selector: str | None = None
    """Label selector of the pool's pods, for the scale subresource (HPA, ``kubectl scale``)."""

    slo_attainment: float | None = Field(default=None, ge=0, le=1)
    """Share of this pool's recent requests that met their latency objective."""

    kv_usage: float | None = Field(default=None, ge=0, le=1)
    """Mean KV-cache usage across the pool's instances."""

    desired_replicas: int | None = Field(default=None, ge=0)
    """Replicas the autoscaler last asked for."""

    last_scale_time: datetime | None = None
    """When the autoscaler last changed ``spec.replicas``."""

    last_scale_decision: ScaleDecisionRecord | None = None
    """The autoscaler's latest change of ``spec.replicas`` and its reason."""


class KVCachePoolStatus(_StatusBase):
    """Observed state of a KVCachePool."""
