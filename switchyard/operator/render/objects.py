"""Building blocks of the child manifests: names, labels, owner references, pod and Service parts.

The renderers of the three kinds (``service``, ``pool``, ``kvcache``) say what each CR
becomes; everything here is a small pure helper they share. Pods run as the images' non-root user with a
read-only root filesystem (writable ``/tmp`` and, for Ray, a memory-backed ``/dev/shm``), no
privilege escalation and no capabilities.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from switchyard.operator.crd import API_GROUP, API_VERSION, LLMServiceSpec

__all__ = [
    "CONFIG_DIR",
    "CONFIG_KEY",
    "DEFAULT_PORTS",
    "ENV",
    "MODEL_MOUNT",
    "RAY_CLIENT_PORT",
    "RAY_DASHBOARD_PORT",
    "RAY_GCS_PORT",
    "ROUTER_SERVICE_ACCOUNT",
    "WORKER_SERVICE_ACCOUNT",
    "Owner",
    "Ports",
    "child_names",
    "labels",
    "meta",
    "model_fetchers",
    "model_path",
    "model_volume",
    "pod_security",
    "pod_spec",
    "pool_selector",
    "scratch_volumes",
    "security",
    "selector_string",
    "service_manifest",
    "stateful_set",
]

ROUTER_SERVICE_ACCOUNT = "switchyard-router"
WORKER_SERVICE_ACCOUNT = "switchyard-worker"
CONFIG_KEY = "serve.json"
CONFIG_DIR = "/etc/switchyard"
MODEL_MOUNT = "/models"
RAY_GCS_PORT = 6379
RAY_CLIENT_PORT = 10001
RAY_DASHBOARD_PORT = 8265
_UID = 1000  # the images' non-root user


@dataclass(frozen=True, slots=True)
class Owner:
    """The custom resource that owns the children being rendered."""

    kind: str
    name: str
    namespace: str
    uid: str

    def reference(self) -> dict[str, Any]:
        return {
            "apiVersion": f"{API_GROUP}/{API_VERSION}",
            "kind": self.kind,
            "name": self.name,
            "uid": self.uid,
            "controller": True,
            "blockOwnerDeletion": True,
        }


@dataclass(frozen=True, slots=True)
class Ports:
    """Ports that are operator settings rather than spec fields."""

    router_grpc: int = 50051
    kvcache: int = 9700


DEFAULT_PORTS = Ports()


def child_names(service: str) -> dict[str, str]:
    """Names of an LLMService's children (also how other handlers find them)."""
    return {
        "head": f"{service}-ray-head",
        "config": f"{service}-config",
        "router": f"{service}-router",
        "router_grpc": f"{service}-router-grpc",
    }


def labels(service: str, component: str, role: str, pool: str | None = None) -> dict[str, str]:
    """Standard labels of every child; ``pool`` for ServingPool and KVCachePool children."""
    out = {
        "app.kubernetes.io/name": "switchyard",
        "app.kubernetes.io/instance": service,
        "app.kubernetes.io/component": component,
        "app.kubernetes.io/managed-by": "switchyard-operator",
        "switchyard.dev/service": service,
        "switchyard.dev/role": role,
    }
    if pool is not None:
        out["switchyard.dev/pool"] = pool
    return out


def pool_selector(service: str, pool: str, component: str = "worker") -> dict[str, str]:
    """The immutable StatefulSet selector of a pool (role is left out: it may change)."""
    return {
        "switchyard.dev/service": service,
        "switchyard.dev/pool": pool,
        "app.kubernetes.io/component": component,
    }


def selector_string(selector: Mapping[str, str]) -> str:
    """``k=v,k=v`` as the scale subresource's ``status.selector`` wants it."""
    return ",".join(f"{k}={v}" for k, v in sorted(selector.items()))


def _hf_repo(spec: LLMServiceSpec) -> str | None:
    uri = spec.model.uri
    return uri.removeprefix("hf://") if uri is not None and uri.startswith("hf://") else None


def model_path(spec: LLMServiceSpec) -> str:
    """Where the model directory is inside router and worker pods."""
    if spec.model.pvc is not None:
        sub = spec.model.pvc.sub_path.strip("/")
        return f"{MODEL_MOUNT}/{sub}" if sub else MODEL_MOUNT
    if spec.model.path is not None:
        return spec.model.path
    if _hf_repo(spec) is not None:
        return MODEL_MOUNT
    raise ValueError(f"model.uri {spec.model.uri!r}: only hf:// URIs are fetched")


def meta(owner: Owner, name: str, lbls: Mapping[str, str]) -> dict[str, Any]:
    return {
        "name": name,
        "namespace": owner.namespace,
        "labels": dict(lbls),
        "ownerReferences": [owner.reference()],
    }


def security() -> dict[str, Any]:
    return {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
        "capabilities": {"drop": ["ALL"]},
    }


def pod_security() -> dict[str, Any]:
    return {
        "runAsNonRoot": True,
        "runAsUser": _UID,
        "runAsGroup": _UID,
        "fsGroup": _UID,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def scratch_volumes(shm: bool) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Writable /tmp (Ray session dirs, caches: the root filesystem is read-only) and /dev/shm."""
    volumes: list[dict[str, Any]] = [{"name": "tmp", "emptyDir": {}}]
    mounts: list[dict[str, Any]] = [{"name": "tmp", "mountPath": "/tmp"}]
    if shm:
        volumes.append({"name": "dshm", "emptyDir": {"medium": "Memory"}})
        mounts.append({"name": "dshm", "mountPath": "/dev/shm"})
    return volumes, mounts


ENV: list[dict[str, Any]] = [
    {"name": "HOME", "value": "/tmp"},
    {"name": "XDG_CACHE_HOME", "value": "/tmp/.cache"},
]


def model_volume(spec: LLMServiceSpec) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The model volume and its read-only mount: the PVC, or an emptyDir an init container fills."""
    mount = [{"name": "model", "mountPath": MODEL_MOUNT, "readOnly": True}]
    if spec.model.pvc is not None:
        claim = {"claimName": spec.model.pvc.claim_name, "readOnly": True}
        return [{"name": "model", "persistentVolumeClaim": claim}], mount
    if _hf_repo(spec) is not None:
        return [{"name": "model", "emptyDir": {}}], mount
    return [], []


def model_fetchers(spec: LLMServiceSpec) -> list[dict[str, Any]]:
    """Init containers that download an ``hf://`` model into the pod's model volume (each pod
    fetches its own copy: simple, and fine for small models; large ones belong on a PVC)."""
    repo = _hf_repo(spec)
    if repo is None:
        return []
    script = "import sys, huggingface_hub as h; h.snapshot_download(sys.argv[1], local_dir=sys.argv[2])"
    return [
        {
            "name": "fetch-model",
            "command": ["python", "-c", script, repo, MODEL_MOUNT],
            "env": list(ENV),
            "volumeMounts": [
                {"name": "model", "mountPath": MODEL_MOUNT},
                {"name": "tmp", "mountPath": "/tmp"},
            ],
        }
    ]


def pod_spec(
    spec: LLMServiceSpec,
    *,
    image: str,
    account: str,
    container: dict[str, Any],
    volumes: Sequence[dict[str, Any]],
    init_containers: Sequence[dict[str, Any]] = (),
    **extra: Any,
) -> dict[str, Any]:
    common = {"image": image, "imagePullPolicy": spec.images.pull_policy, "securityContext": security()}
    pod: dict[str, Any] = {
        "serviceAccountName": account,
        "securityContext": pod_security(),
        "containers": [{**common, **container}],
        "volumes": list(volumes),
        **extra,
    }
    if init_containers:
        pod["initContainers"] = [{**common, **c} for c in init_containers]
    if spec.images.pull_secrets:
        pod["imagePullSecrets"] = [{"name": n} for n in spec.images.pull_secrets]
    return pod


def service_manifest(
    owner: Owner,
    name: str,
    lbls: Mapping[str, str],
    selector: Mapping[str, str],
    ports: Mapping[str, int],
    *,
    svc_type: str = "ClusterIP",
    headless: bool = False,
) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "type": svc_type,
        "selector": dict(selector),
        "ports": [{"name": n, "port": p, "targetPort": p, "protocol": "TCP"} for n, p in ports.items()],
    }
    if headless:
        spec["clusterIP"] = "None"
    return {"apiVersion": "v1", "kind": "Service", "metadata": meta(owner, name, lbls), "spec": spec}


def stateful_set(
    owner: Owner,
    name: str,
    lbls: Mapping[str, str],
    selector: Mapping[str, str],
    *,
    replicas: int,
    pod: dict[str, Any],
    ports: Mapping[str, int],
) -> list[dict[str, Any]]:
    """A StatefulSet of ``pod`` replicas and the headless Service that names each pod.

    Pods start in parallel (each one's server or engine starts on its own; ordering buys
    nothing) and are addressed one by one (``<name>-<i>.<name>``), hence headless.
    """
    sts = {
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "metadata": meta(owner, name, lbls),
        "spec": {
            "replicas": replicas,
            "serviceName": name,
            "podManagementPolicy": "Parallel",
            "selector": {"matchLabels": dict(selector)},
            "template": {"metadata": {"labels": dict(lbls)}, "spec": pod},
        },
    }
    return [sts, service_manifest(owner, name, lbls, selector, ports, headless=True)]
