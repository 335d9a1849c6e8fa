"""The Switchyard custom resources as pydantic models: the one source of truth for their shape.

Why models and not hand-written OpenAPI: the operator validates every spec it reconciles with
these classes, and ``crds.py`` generates the CRD schemas from them, so the API server and the
operator can never disagree about a field. Field docstrings become the CRD descriptions that
``kubectl explain`` shows, so they say the unit, the default and why.

Wire names are camelCase (``ttftMs``, ``serviceRef``) through an alias generator, Python
attributes snake_case; both spellings validate, dumps use the wire names. These names are an
API: renaming one breaks every stored object, so add fields rather than rename them.

The shared pieces (base class, quantities, ``EngineSpec``) are in ``base.py`` and the status
models in ``status.py``; the package (``switchyard.operator.crd``) exports the public names.

Cross-field rules (exactly one model source, ``minReplicas <= maxReplicas``, ratio band order)
live twice on purpose: as a pydantic validator here, and as a CEL rule
(``x-kubernetes-validations``) attached to the same class, so the API server rejects a bad
object at ``kubectl apply`` and the operator rejects one that slipped past an older CRD.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from pydantic import ConfigDict, Field, model_validator

from switchyard.config import (
    DEFAULT_TTFT_SLO_MS,
    MAX_POOL_INSTANCES,
    EngineConfig,
    GatewayConfig,
    MigrationConfig,
    PoolConfig,
    RebalancerConfig,
    RouterConfig,
    check_ttft_slo,
)
from switchyard.operator.crd.base import (
    CpuQuantity,
    CrdModel,
    EngineSpec,
    MemoryQuantity,
    ObjectName,
    ObjectRef,
    PolicyName,
    PoolRole,
    ResourcesSpec,
    Toleration,
    cel,
)
from switchyard.operator.crd.status import (
    KVCachePoolStatus,
    LLMServiceStatus,
    ServingPoolStatus,
)

__all__ = [
    "CRD_SPECS",
    "PLURAL_BY_KIND",
    "AutoscalingSpec",
    "CrdSpec",
    "GatewaySpec",
    "ImagesSpec",
    "InternalTokenSecretRef",
    "KVCachePoolSpec",
    "LLMServiceSpec",
    "MigrationSpec",
    "ModelSource",
    "PvcSource",
    "RatioBand",
    "RaySpec",
    "RouterSpec",
    "SecretKeyRef",
    "ServingPoolSpec",
    "SloSpec",
    "pool_ray_resource",
    "worker_set_name",
]

# ----------------------------------------------------------------------------- LLMService spec


class PvcSource(CrdModel):
    """A model directory on a PersistentVolumeClaim, mounted read-only into router and workers."""

    claim_name: ObjectName
    """Name of the PersistentVolumeClaim in the LLMService's namespace."""

    sub_path: str = ""
    """Directory inside the volume that holds the Hugging Face model; empty means its root."""


class ModelSource(CrdModel):
    """Where the weights come from: exactly one of ``path``, ``pvc`` or ``uri``."""

    model_config = ConfigDict(
        json_schema_extra=cel(
            (
                "(has(self.path) ? 1 : 0) + (has(self.pvc) ? 1 : 0) + (has(self.uri) ? 1 : 0) == 1",
                "set exactly one of path, pvc or uri",
            )
        )
    )

    path: str | None = Field(default=None, min_length=1)
    """A model directory already present in the image or on every node (hostPath-style setups)."""

    pvc: PvcSource | None = None
    """A model directory on a PersistentVolumeClaim (the usual production choice)."""

    uri: str | None = Field(default=None, pattern=r"^(hf|s3|gs|https?)://.+$")
    """A remote model fetched at start-up: ``hf://org/name``, ``s3://``, ``gs://`` or ``http(s)://``."""

    tokenizer: str | None = None
    """Tokenizer directory or ``hf://`` name if it differs from the model's; the router tokenizes with it."""

    served_model_name: str | None = None
    """Name clients send in ``model``; defaults to the LLMService's name."""

    @model_validator(mode="after")
    def _exactly_one_source(self) -> ModelSource:
        given = [n for n in ("path", "pvc", "uri") if getattr(self, n) is not None]
        if len(given) != 1:
            raise ValueError(f"set exactly one of path, pvc or uri (got {given or 'none'})")
        return self


class SloSpec(CrdModel):
    """Latency objectives the router's SLO switch and the autoscaler steer by."""

    ttft_ms: int = Field(default=int(DEFAULT_TTFT_SLO_MS), ge=1, le=600_000)
    """Time-to-first-token objective in milliseconds (2 s: interactive chat with long prompts)."""

    tpot_ms: int = Field(default=100, ge=1, le=60_000)
    """Time-per-output-token objective in milliseconds (100 ms ~ 10 tokens/s, faster than reading)."""


class MigrationSpec(CrdModel, MigrationConfig):
    """Live KV migration of running requests between instances: whether engines can and the
    rebalancer does, and how the router's coordinator moves a request (the fields of
    ``MigrationConfig``, inherited so that their bounds, defaults and descriptions exist once)."""

    model_config = ConfigDict(
        json_schema_extra=cel(("self.enabled || !self.rebalance", "rebalance needs migration.enabled"))
    )

    enabled: bool = True
    """Load the KV-transfer connector (NIXL) in every vLLM engine, so drains before scale-in move
    requests with their KV cache; off, a drain waits for requests to finish instead."""

    rebalance: bool = False
    """Run the router's hotspot rebalancer, which migrates requests off overloaded instances."""

    @model_validator(mode="after")
    def _rebalance_needs_migration(self) -> MigrationSpec:
        if self.rebalance and not self.enabled:
            raise ValueError("router.migration.rebalance needs router.migration.enabled")
        return self

    def migration_config(self) -> MigrationConfig:
        """The coordinator's settings alone: a plain ``MigrationConfig``, without the switches."""
        return MigrationConfig.model_validate(
            self.model_dump(include=set(MigrationConfig.model_fields), by_alias=False)
        )


class SecretKeyRef(CrdModel):
    """One key of a Secret in the same namespace."""

    name: ObjectName
    """Secret name."""

    key: str = Field(default="api-key", min_length=1, max_length=253)
    """Key inside the Secret; its value is the accepted bearer key (``SWITCHYARD_API_KEY`` in router pods)."""


class InternalTokenSecretRef(SecretKeyRef):
    """One key of a Secret in the same namespace, holding the internal gRPC token."""

    key: str = Field(default="internal-token", min_length=1, max_length=253)
    """Key inside the Secret; its value is the internal token (``SWITCHYARD_INTERNAL_TOKEN`` in
    router pods)."""


class RouterSpec(CrdModel):
    """The router Deployment: policy, replicas, SLOs."""

    policy: PolicyName = "dualmap"
    """Routing policy. ``dualmap`` balances prefix-cache affinity against load under the SLOs."""

    policy_params: dict[str, Any] = Field(default_factory=dict)
    """Parameters of the policy, validated by the policy's own model when the router starts."""

    replicas: int = Field(default=1, ge=1, le=64)
    """Router pods; more than one spreads gateway load (each keeps its own view of the pools)."""

    slo: SloSpec = Field(default_factory=SloSpec)
    """Latency objectives."""

    migration: MigrationSpec = Field(default_factory=MigrationSpec)
    """Live KV migration."""

    max_failover_attempts: int = Field(default=RouterConfig().max_failover_attempts, ge=0, le=16)
    """How often one request may move to another instance after its instance died."""

    internal_token_secret_ref: InternalTokenSecretRef | None = None
    """Secret holding the bearer token of the router's and the workers' gRPC services
    (``SWITCHYARD_INTERNAL_TOKEN`` in router pods; workers get it from the router through their
    supervisor). Unset: the first router generates one and later replicas adopt it from the
    running pools, so the services are still authenticated, but no client outside the router
    pods can call the router's gRPC service. The operator only references the Secret (it never
    reads Secrets); create it with 16+ printable ASCII characters."""

    @model_validator(mode="after")
    def _one_slo(self) -> RouterSpec:
        """A ``policyParams.ttft_slo_ms`` other than ``slo.ttftMs`` is refused at admission (the
        operator's validation), not first when the router pod starts."""
        check_ttft_slo(self.policy_params, self.slo.ttft_ms)
        return self

    def router_config(self, *, grpc_port: int) -> RouterConfig:
        """The in-process router configuration this spec stands for. Its ``grpc_host`` stays
        loopback: the router pod's command binds its own pod IP (one config for every replica)."""
        return RouterConfig(
            policy=self.policy,
            policy_params=self.policy_params,
            grpc_port=grpc_port,
            ttft_slo_ms=self.slo.ttft_ms,
            max_failover_attempts=self.max_failover_attempts,
            rebalancer=RebalancerConfig(enabled=self.migration.rebalance),
            migration=self.migration.migration_config(),
        )


class GatewaySpec(CrdModel):
    """The OpenAI-compatible HTTP front door served by the router pods."""

    port: int = Field(default=GatewayConfig().port, ge=1, le=65535)
    """Service and container port of the gateway."""

    service_type: Literal["ClusterIP", "NodePort", "LoadBalancer"] = "ClusterIP"
    """Kubernetes Service type; ClusterIP so nothing is exposed outside the cluster by accident."""

    api_key_secret_ref: SecretKeyRef | None = None
    """Secret holding the accepted API keys; unset disables auth (only for trusted networks)."""

    max_body_bytes: int = Field(default=GatewayConfig().max_body_bytes, ge=1024)
    """Largest request body accepted (413 above it)."""


class ImagesSpec(CrdModel):
    """Container images; pin them by tag or digest so every pod runs the same build."""

    router: str = Field(default="ghcr.io/switchyard/engine:0.1.0", min_length=1)
    """Image of the router/gateway pods (the engine image carries both)."""

    worker: str = Field(default="ghcr.io/switchyard/engine:0.1.0", min_length=1)
    """Image of the engine workers and the Ray head (vLLM + Switchyard, see docs/operations/images.md)."""

    pull_policy: Literal["Always", "IfNotPresent", "Never"] = "IfNotPresent"
    """imagePullPolicy of every container."""

    pull_secrets: list[ObjectName] = Field(default_factory=list)
    """Names of imagePullSecrets for private registries."""


class RaySpec(CrdModel):
    """The Ray head each LLMService runs its engine actors under."""

    version: str = Field(default="2.60.0", pattern=r"^[0-9]+\.[0-9]+\.[0-9]+$")
    """Ray version inside the worker image; head and workers must match exactly."""

    head_cpu: CpuQuantity = "2"
    """CPU request of the Ray head pod."""

    head_memory: MemoryQuantity = "8Gi"
    """Memory request and limit of the Ray head pod (GCS and dashboard)."""


class LLMServiceSpec(CrdModel):
    """A served model: its weights, router, gateway and engine defaults. Pools attach by serviceRef."""

    model: ModelSource
    """The model to serve."""

    router: RouterSpec = Field(default_factory=RouterSpec)
    """Routing."""

    gateway: GatewaySpec = Field(default_factory=GatewaySpec)
    """HTTP front door."""

    engine: EngineSpec = Field(default_factory=EngineSpec)
    """Engine defaults for every pool of this service."""

    images: ImagesSpec = Field(default_factory=ImagesSpec)
    """Container images."""

    ray: RaySpec = Field(default_factory=RaySpec)
    """Ray head settings."""


# ----------------------------------------------------------------------------- pools


class RatioBand(CrdModel):
    """Allowed range of prefill replicas per decode replica."""

    model_config = ConfigDict(json_schema_extra=cel(("self.min <= self.max", "min must not exceed max")))

    min: float = Field(gt=0, le=64)
    """Fewest prefill replicas per decode replica."""

    max: float = Field(gt=0, le=64)
    """Most prefill replicas per decode replica."""

    @model_validator(mode="after")
    def _ordered(self) -> RatioBand:
        if self.min > self.max:
            raise ValueError(f"prefillDecodeRatio.min ({self.min}) must not exceed max ({self.max})")
        return self


class AutoscalingSpec(CrdModel):
    """SLO- and KV-driven autoscaling; the operator writes ``spec.replicas`` through the scale subresource."""

    model_config = ConfigDict(
        json_schema_extra=cel(
            ("self.minReplicas <= self.maxReplicas", "minReplicas must not exceed maxReplicas")
        )
    )

    enabled: bool = False
    """Let the operator change ``replicas``; off keeps it where the user put it."""

    min_replicas: int = Field(default=1, ge=0, le=MAX_POOL_INSTANCES)
    """Fewest replicas the autoscaler leaves (0 allows scale to zero)."""

    max_replicas: int = Field(default=4, ge=1, le=MAX_POOL_INSTANCES)
    """Most replicas the autoscaler creates."""

    target_slo_attainment: float = Field(default=0.9, gt=0, le=1)
    """Scale out while the share of requests meeting their TTFT/TPOT objectives is below this."""

    target_kv_usage: float = Field(default=0.8, gt=0, le=1)
    """Scale out while mean KV-cache usage is above this, in before it nears the preemption point."""

    prefill_decode_ratio: RatioBand | None = None
    """Keep prefill/decode replicas of this service within this band (P/D pools only)."""

    @model_validator(mode="after")
    def _ordered(self) -> AutoscalingSpec:
        if self.min_replicas > self.max_replicas:
            raise ValueError(
                f"minReplicas ({self.min_replicas}) must not exceed maxReplicas ({self.max_replicas})"
            )
        return self


class ServingPoolSpec(CrdModel):
    """A set of engine instances with one role, attached to an LLMService."""

    service_ref: ObjectRef
    """The LLMService this pool serves."""

    role: PoolRole = "unified"
    """``prefill`` or ``decode`` for disaggregated serving; ``unified`` runs both phases."""

    replicas: int = Field(default=1, ge=0, le=MAX_POOL_INSTANCES)
    """Engine instances; written by the autoscaler when autoscaling is enabled."""

    autoscaling: AutoscalingSpec = Field(default_factory=AutoscalingSpec)
    """Autoscaling targets and bounds."""

    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)
    """Per-replica resources."""

    engine: EngineSpec = Field(default_factory=EngineSpec)
    """Overrides of the LLMService's engine defaults for this pool."""

    node_selector: dict[str, str] = Field(default_factory=dict)
    """Node labels worker pods must match (GPU type, zone)."""

    tolerations: list[Toleration] = Field(default_factory=list)
    """Tolerations of worker pods (GPU node taints)."""

    def pool_config(self, name: str, *, engine: EngineConfig) -> PoolConfig:
        """The ``PoolConfig`` of this pool (named ``name``) in its router's ``serve.json``.

        ``engine`` is the merged engine configuration. Instances are placed by the Ray resources
        the pool's worker pods advertise (``render/pool.py``): ``pool-<name>`` on every pod, and
        each pod's own name ``<name>-worker-<i>``, which pins instance ``<name>-<i>`` to it.
        """
        return PoolConfig(
            name=name,
            role=self.role,
            instances=self.replicas,
            engine=engine,
            ray_resource=pool_ray_resource(name),
            instance_resource=f"{worker_set_name(name)}-{{index}}",
        )


def worker_set_name(pool: str) -> str:
    """The StatefulSet (and headless Service) of a ServingPool's workers; pods are ``<it>-<i>``."""
    return f"{pool}-worker"


def pool_ray_resource(pool: str) -> str:
    """The Ray resource every worker pod of ``pool`` advertises, one unit each."""
    return f"pool-{pool}"


class KVCachePoolSpec(CrdModel):
    """A shared KV-cache tier (CPU memory) that pools of one LLMService offload to and fetch from."""

    service_ref: ObjectRef
    """The LLMService whose pools use this cache."""

    replicas: int = Field(default=1, ge=0, le=1024)
    """Cache server pods."""

    memory_per_replica: MemoryQuantity = "16Gi"
    """KV memory each cache server holds (its pod's memory request adds headroom on top)."""

    eviction_policy: Literal["lru", "lfu"] = "lru"
    """Which blocks go first when the cache is full: least recently or least frequently used."""


# ----------------------------------------------------------------------------- kinds


@dataclass(frozen=True, slots=True)
class CrdSpec:
    """Names and models of one custom resource kind."""

    kind: str
    plural: str
    singular: str
    short_names: tuple[str, ...]
    spec_model: type[CrdModel]
    status_model: type[CrdModel]


CRD_SPECS: tuple[CrdSpec, ...] = (
    CrdSpec("LLMService", "llmservices", "llmservice", ("llms",), LLMServiceSpec, LLMServiceStatus),
    CrdSpec("ServingPool", "servingpools", "servingpool", ("sp",), ServingPoolSpec, ServingPoolStatus),
    CrdSpec("KVCachePool", "kvcachepools", "kvcachepool", ("kvp",), KVCachePoolSpec, KVCachePoolStatus),
)
"""Every Switchyard kind, in the order the CRD files are written."""

PLURAL_BY_KIND = {c.kind: c.plural for c in CRD_SPECS}
