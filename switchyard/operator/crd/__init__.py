"""The Switchyard custom resources: pydantic models, their status, conditions and CRD generation.

``models`` holds the spec models of the three kinds (``LLMService``, ``ServingPool``,
``KVCachePool``) and ``CRD_SPECS``; ``base`` the pieces they share (``CrdModel``, quantities,
``EngineSpec``); ``status`` the status models; ``conditions`` how handlers compute and write
status conditions; ``schema`` the CRD manifests generated from the models (``switchyard crds``).

The names below are the resources' API as the rest of Switchyard uses it: spec and status
models and the kinds' table. They are pure pydantic, so importing them is cheap.
"""

from switchyard.operator.crd.base import (
    API_GROUP,
    API_VERSION,
    CrdModel,
    EngineSpec,
    ObjectRef,
    PolicyName,
    PoolRole,
    ResourcesSpec,
    Toleration,
)
from switchyard.operator.crd.models import (
    CRD_SPECS,
    PLURAL_BY_KIND,
    AutoscalingSpec,
    CrdSpec,
    GatewaySpec,
    ImagesSpec,
    InternalTokenSecretRef,
    KVCachePoolSpec,
    LLMServiceSpec,
    MigrationSpec,
    ModelSource,
    PvcSource,
    RatioBand,
    RaySpec,
    RouterSpec,
    SecretKeyRef,
    ServingPoolSpec,
    SloSpec,
)
from switchyard.operator.crd.status import (
    Condition,
    KVCachePoolStatus,
    LLMServiceStatus,
    ScaleDecisionRecord,
    ServingPoolStatus,
)

__all__ = [
    "API_GROUP",
    "API_VERSION",
    "CRD_SPECS",
    "PLURAL_BY_KIND",
    "AutoscalingSpec",
    "Condition",
    "CrdModel",
    "CrdSpec",
    "EngineSpec",
    "GatewaySpec",
    "ImagesSpec",
    "InternalTokenSecretRef",
    "KVCachePoolSpec",
    "KVCachePoolStatus",
    "LLMServiceSpec",
    "LLMServiceStatus",
    "MigrationSpec",
    "ModelSource",
    "ObjectRef",
    "PolicyName",
    "PoolRole",
    "PvcSource",
    "RatioBand",
    "RaySpec",
    "ResourcesSpec",
    "RouterSpec",
    "ScaleDecisionRecord",
    "SecretKeyRef",
    "ServingPoolSpec",
    "ServingPoolStatus",
    "SloSpec",
    "Toleration",
]
