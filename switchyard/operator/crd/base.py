"""Building blocks shared by the Switchyard CRD models (see ``models.py``, which re-exports them).

Why a separate module: the LLMService and the ServingPool both carry an ``EngineSpec`` (defaults
and overrides), and the status models need the same base class, so these live below both; so
do the pod-level pieces (resources, tolerations) that any pod-running kind reuses.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import ConfigDict, Field
from pydantic.alias_generators import to_camel

from switchyard.config import EngineConfig, PoolRole, StrictModel

__all__ = [
    "API_GROUP",
    "API_VERSION",
    "CPU_PATTERN",
    "MEMORY_PATTERN",
    "CpuQuantity",
    "CrdModel",
    "EngineSpec",
    "MemoryQuantity",
    "ObjectName",
    "ObjectRef",
    "PolicyName",
    "PoolRole",
    "ResourcesSpec",
    "Toleration",
    "cel",
]

API_GROUP = "switchyard.dev"
API_VERSION = "v1alpha1"

PolicyName = Literal["consistent_hash", "dualmap", "least_load", "power_of_two", "prefix_tree", "round_robin"]
"""Routing policies a CRD may name; a test keeps this equal to the router's ``POLICIES`` registry."""

_QUANTITY_SUFFIX = r"(Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E)?"
MEMORY_PATTERN = r"^[0-9]+(\.[0-9]+)?" + _QUANTITY_SUFFIX + "$"
"""A Kubernetes memory quantity in bytes (``512Mi``, ``16Gi``, ``1.5G``); no milli-bytes, no exponents."""
CPU_PATTERN = r"^([0-9]+(\.[0-9]+)?|[0-9]+m)$"
"""A Kubernetes CPU quantity: cores (``2``, ``0.5``) or millicores (``500m``)."""
DNS_LABEL_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"

MemoryQuantity = Annotated[str, Field(pattern=MEMORY_PATTERN, max_length=32)]
CpuQuantity = Annotated[str, Field(pattern=CPU_PATTERN, max_length=32)]
ObjectName = Annotated[str, Field(pattern=DNS_LABEL_PATTERN, min_length=1, max_length=63)]


def cel(*rules: tuple[str, str]) -> dict[str, Any]:
    """``json_schema_extra`` carrying CEL rules (rule, message) for the CRD generator."""
    return {"x-kubernetes-validations": [{"rule": r, "message": m} for r, m in rules]}


class CrdModel(StrictModel):
    """Base of every CRD model: StrictModel's rules plus camelCase wire names."""

    model_config = ConfigDict(
        alias_generator=to_camel, validate_by_name=True, validate_by_alias=True, serialize_by_alias=True
    )


class ObjectRef(CrdModel):
    """A reference to an object of a known kind in the same namespace."""

    name: ObjectName
    """Name of the referenced LLMService."""


class EngineSpec(CrdModel):
    """Engine settings. Every field is optional: a ServingPool's value wins over its LLMService's,
    which wins over Switchyard's default (named in each description)."""

    kind: Literal["vllm", "sim"] | None = None
    """``vllm`` runs real inference; ``sim`` the simulator, for scale tests (default vllm)."""

    dtype: Literal["auto", "float16", "bfloat16", "float32"] | None = None
    """Weights dtype; ``auto`` keeps the checkpoint's (default auto)."""

    block_size: Literal[8, 16, 32, 64, 128, 256] | None = None
    """Tokens per KV block; routers hash prompts in blocks of this size (default 32)."""

    max_model_len: int | None = Field(default=None, ge=16)
    """Context length; unset takes the model's own."""

    max_num_seqs: int | None = Field(default=None, ge=1, le=4096)
    """Most requests in one batch per instance (default 16)."""

    enable_prefix_caching: bool | None = None
    """Reuse KV of shared prefixes; cache-affinity routing depends on it (default true)."""

    enforce_eager: bool | None = None
    """Skip CUDA graphs and torch.compile: faster start, slower decode (default false on Kubernetes)."""

    sim_profile: str | None = None
    """Simulator cost profile, used with ``kind: sim``."""

    extra_args: dict[str, Any] | None = None
    """Further vLLM ``AsyncEngineArgs`` fields, passed through unchanged (merged key by key)."""

    def over(self, base: EngineSpec) -> EngineSpec:
        """This spec's set fields on top of ``base``'s (``extraArgs`` merged key by key)."""
        merged = base.model_dump(exclude_none=True, by_alias=False)
        merged.update(self.model_dump(exclude_none=True, by_alias=False))
        if base.extra_args is not None and self.extra_args is not None:
            merged["extra_args"] = {**base.extra_args, **self.extra_args}
        return EngineSpec.model_validate(merged)

    def engine_config(self, *, model: str | None, served_model_name: str | None) -> EngineConfig:
        """The engine configuration a worker builds from this (already merged) spec."""
        fields: dict[str, Any] = self.model_dump(exclude_none=True, by_alias=False)
        profile = fields.pop("sim_profile", None)
        if profile is not None:
            fields["sim"] = {"profile": profile}
        fields.setdefault("enforce_eager", False)
        if fields.get("kind") == "sim":
            model = None
        return EngineConfig.model_validate({**fields, "model": model, "served_model_name": served_model_name})


class ResourcesSpec(CrdModel):
    """Per-replica resources of a worker pod."""

    gpus: int = Field(default=1, ge=0, le=16)
    """GPUs per replica (requests = limits); above 1 the engine runs tensor-parallel across them."""

    gpu_resource_name: str = Field(default="nvidia.com/gpu", min_length=1, max_length=253)
    """Extended resource name the GPUs are requested under."""

    cpu: CpuQuantity | None = None
    """CPU request per replica; unset leaves it to the namespace's defaults."""

    memory: MemoryQuantity | None = None
    """Memory request and limit per replica."""


class Toleration(CrdModel):
    """A pod toleration, as in the core API."""

    key: str | None = None
    """Taint key; unset with operator Exists tolerates every taint."""

    operator: Literal["Exists", "Equal"] = "Equal"
    """How the key and value are matched."""

    value: str | None = None
    """Taint value matched with operator Equal."""

    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None
    """Taint effect to tolerate; unset tolerates every effect."""

    toleration_seconds: int | None = Field(default=None, ge=0)
    """How long a NoExecute taint is tolerated."""
