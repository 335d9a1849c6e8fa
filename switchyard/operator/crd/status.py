"""Status models of the Switchyard kinds: what the operator reports back on each object.

Why typed: ``crds.py`` turns them into the status schema (so ``kubectl get -o yaml`` and the
printer columns line up with what handlers write), and tests validate written status against
them. Every field is optional, since a fresh object has no status yet.
"""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import Field

from switchyard.operator.crd.base import CrdModel

__all__ = ["Condition", "KVCachePoolStatus", "LLMServiceStatus", "ScaleDecisionRecord", "ServingPoolStatus"]


class Condition(CrdModel):
    """One observation of the object's state, in the Kubernetes condition convention."""

    type: Literal["Ready", "Progressing", "Degraded", "MetricsAvailable"]
    """Ready: serving. Progressing: converging on the spec. Degraded: failing, see reason.
    MetricsAvailable: whether the router's metrics were read at the last autoscaler tick
    (LLMService and ServingPool; False with reason RouterUnreachable clears sloAttainment)."""

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
    """The lower of TTFT and TPOT attainment (share of requests within the objective) over the
    last autoscaler interval, from the router's histograms; an upper bound on the share that met
    both. Kept while no requests finish; unset while the router's metrics cannot be read (see
    the MetricsAvailable condition)."""


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
    """Attainment of the objective this pool's role serves (TTFT for prefill and unified, TPOT
    for decode) over the last autoscaler interval; the router measures per service, not per
    pool. Kept while no requests finish; unset while the router's metrics cannot be read (see
    the MetricsAvailable condition)."""

    kv_usage: float | None = Field(default=None, ge=0, le=1)
    """Mean KV-cache usage across the pool's instances, as the router last saw it."""

    desired_replicas: int | None = Field(default=None, ge=0)
    """Replicas the autoscaler last asked for."""

    last_scale_time: datetime | None = None
    """When the autoscaler last changed ``spec.replicas``."""

    last_scale_decision: ScaleDecisionRecord | None = None
    """The autoscaler's latest change of ``spec.replicas`` and its reason."""


class KVCachePoolStatus(_StatusBase):
    """Observed state of a KVCachePool."""
