"""What an LLMService becomes, and the ``ServeConfig`` its router pods start from.

Children (names prefixed with the service name ``S``):
  ``S-ray-head`` Deployment + Service: the Ray cluster's head (GCS 6379, client 10001, dashboard 8265).
  ``S-config`` ConfigMap: ``serve.json``, a ``ServeConfig`` naming every pool of the service.
  ``S-router`` Deployment: router core, router gRPC and the OpenAI gateway, joined to the Ray cluster
  as a driver that runs the pools' supervisors. ``S-router`` Service (HTTP) and ``S-router-grpc``.

The router pods run ``switchyard serve --config /etc/switchyard/serve.json`` with
``ray_address`` set in the file. The config is read once, so a pod-template hash of it rolls
the router when pools change; supervisors are detached named actors every router replica
attaches to, so extra replicas do not start extra engines. Their instance actors are detached
and named as well, so a supervisor that Ray restarts re-adopts them (nothing in the rendered
objects depends on it); the Ray head's deletion with the service ends them all.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

from switchyard.api.auth import TOKEN_ENV
from switchyard.config import EngineConfig, GatewayConfig, KvTransferConfig, ServeConfig
from switchyard.operator.crd import EngineSpec, LLMServiceSpec, ServingPoolSpec
from switchyard.operator.render.objects import (
    CONFIG_DIR,
    CONFIG_KEY,
    DEFAULT_PORTS,
    ENV,
    RAY_CLIENT_PORT,
    RAY_DASHBOARD_PORT,
    RAY_GCS_PORT,
    ROUTER_SERVICE_ACCOUNT,
    WORKER_SERVICE_ACCOUNT,
    Owner,
    Ports,
    child_names,
    labels,
    meta,
    model_fetchers,
    model_path,
    model_volume,
    pod_spec,
    scratch_volumes,
    service_manifest,
)

__all__ = ["serve_config", "served_name", "service_children"]


def served_name(service: str, spec: LLMServiceSpec) -> str:
    return spec.model.served_model_name or service


def serve_config(
    service: str,
    namespace: str,
    spec: LLMServiceSpec,
    pools: Mapping[str, ServingPoolSpec],
    ports: Ports = DEFAULT_PORTS,
) -> ServeConfig:
    """The ``ServeConfig`` the router pods start from; one ``PoolConfig`` per attached pool."""
    model, name = model_path(spec), served_name(service, spec)
    # Migration on: every engine loads the KV-transfer connector. Its loopback handshake address
    # is replaced by the pod's own in the instance actor (``with_reachable_kv_endpoint``).
    kv = {"kv_transfer": KvTransferConfig()} if spec.router.migration.enabled else {}

    def engine(e: EngineSpec) -> EngineConfig:
        cfg = e.engine_config(model=model, served_model_name=name)
        return cfg.model_copy(update=kv) if cfg.kind == "vllm" else cfg

    pool_configs = tuple(
        pool.pool_config(pool_name, engine=engine(pool.engine.over(spec.engine)))
        for pool_name, pool in sorted(pools.items())
    )
    return ServeConfig(
        engine=engine(spec.engine),
        router=spec.router.router_config(grpc_port=ports.router_grpc),
        gateway=GatewayConfig(
            host="0.0.0.0", port=spec.gateway.port, max_body_bytes=spec.gateway.max_body_bytes
        ),
        # Ray Client: the router pod is not a Ray node, so it joins through the head's client server.
        ray_address=f"ray://{child_names(service)['head']}.{namespace}.svc:{RAY_CLIENT_PORT}",
        pools=pool_configs,
    )


def service_children(
    owner: Owner, spec: LLMServiceSpec, pools: Mapping[str, ServingPoolSpec], ports: Ports = DEFAULT_PORTS
) -> list[dict[str, Any]]:
    """ConfigMap, Ray head Deployment + Service, router Deployment + HTTP and gRPC Services."""
    svc, names = owner.name, child_names(owner.name)
    config = serve_config(svc, owner.namespace, spec, pools, ports)
    config_json = config.model_dump_json(indent=2)
    config_hash = hashlib.sha256(config_json.encode()).hexdigest()[:16]
    head_lbls, router_lbls = labels(svc, "ray-head", "ray-head"), labels(svc, "router", "router")
    head_sel = {"switchyard.dev/service": svc, "app.kubernetes.io/component": "ray-head"}
    router_sel = {"switchyard.dev/service": svc, "app.kubernetes.io/component": "router"}
    tmp_vols, tmp_mounts = scratch_volumes(shm=True)
    head_container = {
        "name": "ray-head",
        "command": [
            "ray",
            "start",
            "--head",
            f"--port={RAY_GCS_PORT}",
            f"--ray-client-server-port={RAY_CLIENT_PORT}",
            "--dashboard-host=0.0.0.0",
            "--num-cpus=0",
            "--block",
        ],
        "ports": [
            {"name": "gcs", "containerPort": RAY_GCS_PORT},
            {"name": "client", "containerPort": RAY_CLIENT_PORT},
            {"name": "dashboard", "containerPort": RAY_DASHBOARD_PORT},
        ],
        "env": list(ENV),
        "resources": {
            "requests": {"cpu": spec.ray.head_cpu, "memory": spec.ray.head_memory},
            "limits": {"memory": spec.ray.head_memory},
        },
        "readinessProbe": {"tcpSocket": {"port": RAY_GCS_PORT}, "periodSeconds": 5},
        "volumeMounts": tmp_mounts,
    }
    head = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": meta(owner, names["head"], head_lbls),
        "spec": {
            "replicas": 1,
            "strategy": {"type": "Recreate"},  # one GCS per cluster, never two
            "selector": {"matchLabels": head_sel},
            "template": {
                "metadata": {"labels": head_lbls},
                "spec": pod_spec(
                    spec,
                    image=spec.images.worker,
                    account=WORKER_SERVICE_ACCOUNT,
                    container=head_container,
                    volumes=tmp_vols,
                ),
            },
        },
    }
    model_vols, model_mounts = model_volume(spec)
    tmp_vols, tmp_mounts = scratch_volumes(shm=False)
    env = [*ENV, {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}]
    if spec.gateway.api_key_secret_ref is not None:
        ref = spec.gateway.api_key_secret_ref
        env.append(
            {"name": "SWITCHYARD_API_KEY", "valueFrom": {"secretKeyRef": {"name": ref.name, "key": ref.key}}}
        )
    if spec.router.internal_token_secret_ref is not None:
        # The token goes by reference (the kubelet resolves it), never into serve.json: the
        # ConfigMap is readable by more principals than the Secret, and the operator reads no
        # Secrets. Workers receive it from the router through their supervisor.
        ref = spec.router.internal_token_secret_ref
        env.append({"name": TOKEN_ENV, "valueFrom": {"secretKeyRef": {"name": ref.name, "key": ref.key}}})
    port = spec.gateway.port
    router_container = {
        "name": "router",
        # The router's gRPC port binds the pod IP, not every interface: Kubernetes expands
        # $(POD_IP) from the downward API, which one shared serve.json cannot carry.
        "command": [
            "switchyard",
            "serve",
            "--config",
            f"{CONFIG_DIR}/{CONFIG_KEY}",
            "--router-host=$(POD_IP)",
        ],
        "ports": [
            {"name": "http", "containerPort": port},
            {"name": "grpc", "containerPort": ports.router_grpc},
        ],
        "env": env,
        "readinessProbe": {"httpGet": {"path": "/health", "port": port}, "periodSeconds": 5},
        "livenessProbe": {"tcpSocket": {"port": port}, "initialDelaySeconds": 60, "periodSeconds": 10},
        "volumeMounts": [
            {"name": "config", "mountPath": CONFIG_DIR, "readOnly": True},
            *model_mounts,
            *tmp_mounts,
        ],
    }
    config_volume = {"name": "config", "configMap": {"name": names["config"]}}
    router = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": meta(owner, names["router"], router_lbls),
        "spec": {
            "replicas": spec.router.replicas,
            "selector": {"matchLabels": router_sel},
            "template": {
                "metadata": {
                    "labels": router_lbls,
                    "annotations": {"switchyard.dev/config-hash": config_hash},
                },
                "spec": pod_spec(
                    spec,
                    image=spec.images.router,
                    account=ROUTER_SERVICE_ACCOUNT,
                    container=router_container,
                    volumes=[config_volume, *model_vols, *tmp_vols],
                    init_containers=model_fetchers(spec),
                ),
            },
        },
    }
    configmap = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": meta(owner, names["config"], labels(svc, "config", "router")),
        "data": {CONFIG_KEY: config_json},
    }
    ray_ports = {"gcs": RAY_GCS_PORT, "client": RAY_CLIENT_PORT, "dashboard": RAY_DASHBOARD_PORT}
    return [
        configmap,
        head,
        service_manifest(owner, names["head"], head_lbls, head_sel, ray_ports),
        router,
        service_manifest(
            owner,
            names["router"],
            router_lbls,
            router_sel,
            {"http": port},
            svc_type=spec.gateway.service_type,
        ),
        service_manifest(owner, names["router_grpc"], router_lbls, router_sel, {"grpc": ports.router_grpc}),
    ]
