"""The pure renderers: what each custom resource becomes, checked without a cluster."""

from __future__ import annotations

import json
from typing import Any

import pytest

from switchyard import cli
from switchyard.config import MAX_POOL_INSTANCES, ServeConfig
from switchyard.kvcache import KVCacheServerConfig
from switchyard.kvcache.server import KVCacheServer
from switchyard.operator.crd import KVCachePoolSpec, LLMServiceSpec, ServingPoolSpec
from switchyard.operator.kube import contains
from switchyard.operator.render.kvcache import kvcache_children, kvcache_pod_memory
from switchyard.operator.render.objects import Owner, Ports, selector_string
from switchyard.operator.render.pool import pool_children
from switchyard.operator.render.service import service_children
from tests.operator.harness import load_examples

NS = "prod"


def examples() -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d["spec"] for d in load_examples("llmservice-pd.yaml", NS)}


def service_spec(**overrides: Any) -> LLMServiceSpec:
    return LLMServiceSpec.model_validate({**examples()["llama-pd"], **overrides})


def pool_spec(name: str = "llama-pd-prefill", **overrides: Any) -> ServingPoolSpec:
    return ServingPoolSpec.model_validate({**examples()[name], **overrides})


def owner(kind: str, name: str) -> Owner:
    return Owner(kind=kind, name=name, namespace=NS, uid=f"uid-{name}")


def by_key(children: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    return {(c["kind"], c["metadata"]["name"]): c for c in children}


def pod(workload: dict[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = workload["spec"]["template"]["spec"]
    return spec


def test_service_children_are_the_ray_head_router_services_and_config() -> None:
    """An LLMService renders exactly its config, Ray head and router with their Services."""
    children = by_key(service_children(owner("LLMService", "llama-pd"), service_spec(), {}))
    assert sorted(children) == [
        ("ConfigMap", "llama-pd-config"),
        ("Deployment", "llama-pd-ray-head"),
        ("Deployment", "llama-pd-router"),
        ("Service", "llama-pd-ray-head"),
        ("Service", "llama-pd-router"),
        ("Service", "llama-pd-router-grpc"),
    ]


def test_every_child_is_controlled_by_its_owner_and_labelled() -> None:
    """Each child has one controller ownerReference (so the garbage collector removes it with its
    owner) and the standard labels, with pool and role where they apply."""
    svc = service_spec()
    children = [
        *service_children(owner("LLMService", "llama-pd"), svc, {}),
        *pool_children(owner("ServingPool", "llama-pd-prefill"), pool_spec(), svc),
        *kvcache_children(
            owner("KVCachePool", "kv"), KVCachePoolSpec.model_validate(examples()["llama-pd-kv"]), svc
        ),
    ]
    for child in children:
        meta = child["metadata"]
        (ref,) = meta["ownerReferences"]
        assert ref["controller"] is True and ref["blockOwnerDeletion"] is True
        assert ref["apiVersion"] == "switchyard.dev/v1alpha1" and ref["uid"].startswith("uid-")
        assert meta["namespace"] == NS
        labels = meta["labels"]
        assert labels["app.kubernetes.io/managed-by"] == "switchyard-operator"
        assert labels["app.kubernetes.io/name"] == "switchyard"
        assert labels["app.kubernetes.io/instance"] == labels["switchyard.dev/service"] == "llama-pd"
        assert {"app.kubernetes.io/component", "switchyard.dev/role"} <= set(labels)
    worker = by_key(children)["StatefulSet", "llama-pd-prefill-worker"]
    assert worker["metadata"]["labels"]["switchyard.dev/pool"] == "llama-pd-prefill"
    assert worker["metadata"]["labels"]["switchyard.dev/role"] == "prefill"


def test_images_accounts_and_security_contexts_come_from_spec_and_rbac() -> None:
    """Router pods use the router image and the switchyard-router account; Ray pods the worker
    image and switchyard-worker; every container is non-root, read-only, without capabilities."""
    images = {"router": "r.example/router:1", "worker": "r.example/worker:2"}
    svc = service_spec(images={**images, "pullPolicy": "Always", "pullSecrets": ["regcred"]})
    children = by_key(service_children(owner("LLMService", "llama-pd"), svc, {}))
    workers = pool_children(owner("ServingPool", "p"), pool_spec(), svc)
    expected = {
        ("Deployment", "llama-pd-router"): ("r.example/router:1", "switchyard-router"),
        ("Deployment", "llama-pd-ray-head"): ("r.example/worker:2", "switchyard-worker"),
        ("StatefulSet", "p-worker"): ("r.example/worker:2", "switchyard-worker"),
    }
    workloads = {**children, **by_key(workers)}
    for key, (image, account) in expected.items():
        spec = pod(workloads[key])
        assert spec["serviceAccountName"] == account
        assert spec["imagePullSecrets"] == [{"name": "regcred"}]
        assert spec["securityContext"]["runAsNonRoot"] is True
        for container in spec["containers"]:
            assert container["image"] == image and container["imagePullPolicy"] == "Always"
            sc = container["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] is True
            assert sc["capabilities"] == {"drop": ["ALL"]}


def test_worker_pods_join_the_services_ray_cluster_with_the_pool_resource() -> None:
    """Worker pods run `ray start` against the service's head with one unit of pool-<name>, the
    resource the supervisor pins the pool's instances to, and request the pool's GPUs."""
    sts = by_key(pool_children(owner("ServingPool", "llama-pd-prefill"), pool_spec(), service_spec()))
    worker = sts["StatefulSet", "llama-pd-prefill-worker"]
    container = pod(worker)["containers"][0]
    cmd = container["command"]
    assert cmd[:3] == ["ray", "start", "--address=llama-pd-ray-head.prod.svc:6379"]
    assert cmd[-1] == "--block"
    resources_flag = next(a for a in cmd if a.startswith("--resources="))
    assert json.loads(resources_flag.removeprefix("--resources=")) == {
        "pool-llama-pd-prefill": 1,
        "$(POD_NAME)": 1,
    }
    pod_name_env = {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}
    assert pod_name_env in container["env"], "the $(POD_NAME) resource needs the downward-API env var"
    assert "--num-gpus=1" in cmd and "--num-cpus=8" in cmd
    assert container["resources"]["limits"] == {"nvidia.com/gpu": 1, "memory": "64Gi"}
    assert pod(worker)["tolerations"] == [
        {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
    ]
    assert {"name": "model", "mountPath": "/models", "readOnly": True} in container["volumeMounts"]


def test_statefulset_selector_is_the_scale_selector_and_excludes_the_role() -> None:
    """The selector is stable (role may change, a selector may not) and is what status.selector says."""
    svc = service_spec()
    prefill = by_key(pool_children(owner("ServingPool", "p"), pool_spec(role="prefill"), svc))[
        "StatefulSet", "p-worker"
    ]
    decode = by_key(pool_children(owner("ServingPool", "p"), pool_spec(role="decode"), svc))[
        "StatefulSet", "p-worker"
    ]
    selector = prefill["spec"]["selector"]["matchLabels"]
    assert selector == decode["spec"]["selector"]["matchLabels"]
    assert "switchyard.dev/role" not in selector
    assert contains(prefill["spec"]["template"]["metadata"]["labels"], selector)
    assert (
        selector_string(selector)
        == "app.kubernetes.io/component=worker,switchyard.dev/pool=p,switchyard.dev/service=llama-pd"
    )


def test_held_replicas_override_the_spec_during_a_drain() -> None:
    """While pods drain, the StatefulSet keeps its old size whatever the spec says."""
    children = pool_children(owner("ServingPool", "p"), pool_spec(replicas=1), service_spec(), replicas=3)
    assert by_key(children)["StatefulSet", "p-worker"]["spec"]["replicas"] == 3


def test_router_config_lists_every_pool_with_its_ray_resource() -> None:
    """The ConfigMap holds a valid ServeConfig: Ray address of the head, one pool per ServingPool
    pinned to its pool-<name> resource, the service engine defaults under the pool overrides."""
    pools = {"llama-pd-prefill": pool_spec(), "llama-pd-decode": pool_spec("llama-pd-decode")}
    children = by_key(service_children(owner("LLMService", "llama-pd"), service_spec(), pools))
    config = ServeConfig.model_validate_json(children["ConfigMap", "llama-pd-config"]["data"]["serve.json"])
    assert config.ray_address == "ray://llama-pd-ray-head.prod.svc:10001"
    assert config.gateway.host == "0.0.0.0" and config.router.policy == "dualmap"
    assert {p.name: (p.role, p.instances, p.ray_resource) for p in config.pools} == {
        "llama-pd-prefill": ("prefill", 2, "pool-llama-pd-prefill"),
        "llama-pd-decode": ("decode", 2, "pool-llama-pd-decode"),
    }
    decode = next(p for p in config.pools if p.name == "llama-pd-decode")
    assert decode.engine is not None
    assert decode.engine.max_num_seqs == 128 and decode.engine.max_model_len == 8192  # override + default
    assert str(decode.engine.model) == "/models/Meta-Llama-3.1-8B-Instruct"


@pytest.mark.parametrize(
    ("migration", "kv_transfer", "rebalancer"),
    [({}, True, False), ({"rebalance": True}, True, True), ({"enabled": False}, False, False)],
)
def test_migration_spec_loads_the_kv_connector_and_the_rebalancer(
    migration: dict[str, Any], kv_transfer: bool, rebalancer: bool
) -> None:
    """``router.migration`` decides whether every vLLM engine loads the KV-transfer connector
    (drain by migration) and whether the router runs the hotspot rebalancer."""
    svc = service_spec(router={"migration": migration})
    children = by_key(service_children(owner("LLMService", "llama-pd"), svc, {"p": pool_spec()}))
    config = ServeConfig.model_validate_json(children["ConfigMap", "llama-pd-config"]["data"]["serve.json"])
    engines = [config.engine, *(p.engine for p in config.pools)]
    assert [e is not None and e.kv_transfer is not None for e in engines] == [kv_transfer] * len(engines)
    assert config.router.rebalancer.enabled is rebalancer


def test_a_pool_at_the_instance_bound_renders_a_valid_serve_config() -> None:
    """The largest ServingPool the CRD admits becomes a PoolConfig the router's ServeConfig accepts
    (the two once had different bounds: 1024 replicas passed the CRD and broke serve.json)."""
    svc = service_spec()
    children = by_key(
        service_children(
            owner("LLMService", "llama-pd"), svc, {"big": pool_spec(replicas=MAX_POOL_INSTANCES)}
        )
    )
    config = ServeConfig.model_validate_json(children["ConfigMap", "llama-pd-config"]["data"]["serve.json"])
    (pool,) = config.pools
    assert (pool.name, pool.role, pool.instances) == ("big", "prefill", MAX_POOL_INSTANCES)
    assert (pool.ray_resource, pool.instance_resource) == ("pool-big", "big-worker-{index}")


def test_router_pods_roll_when_the_config_changes() -> None:
    """The router reads its config once, so its pod template carries a hash of it."""
    svc, o = service_spec(), owner("LLMService", "llama-pd")

    def config_hash(replicas: int) -> str:
        children = by_key(service_children(o, svc, {"p": pool_spec(replicas=replicas)}))
        annotations = children["Deployment", "llama-pd-router"]["spec"]["template"]["metadata"]["annotations"]
        return str(annotations["switchyard.dev/config-hash"])

    assert config_hash(2) == config_hash(2) != config_hash(3)


def test_router_exposes_gateway_and_grpc_services_and_reads_the_api_key_secret() -> None:
    children = by_key(service_children(owner("LLMService", "llama-pd"), service_spec(), {}))
    http = children["Service", "llama-pd-router"]["spec"]
    grpc = children["Service", "llama-pd-router-grpc"]["spec"]
    assert [p["port"] for p in http["ports"]] == [8000] and [p["port"] for p in grpc["ports"]] == [50051]
    container = pod(children["Deployment", "llama-pd-router"])["containers"][0]
    assert container["command"] == [
        "switchyard",
        "serve",
        "--config",
        "/etc/switchyard/serve.json",
        "--router-host=$(POD_IP)",
    ]
    (key,) = [e for e in container["env"] if e["name"] == "SWITCHYARD_API_KEY"]
    assert key["valueFrom"]["secretKeyRef"] == {"name": "llama-pd-api-keys", "key": "api-key"}


def test_router_grpc_binds_the_pod_ip_and_the_gateway_every_interface(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The router's gRPC port is internal: the pod binds it to its own IP (downward API, expanded
    by Kubernetes in the command), not 0.0.0.0; the gateway, the front door, listens everywhere."""
    children = by_key(service_children(owner("LLMService", "llama-pd"), service_spec(), {}))
    container = pod(children["Deployment", "llama-pd-router"])["containers"][0]
    (pod_ip,) = [e for e in container["env"] if e["name"] == "POD_IP"]
    assert pod_ip["valueFrom"] == {"fieldRef": {"fieldPath": "status.podIP"}}
    serve_json = json.loads(children["ConfigMap", "llama-pd-config"]["data"]["serve.json"])
    assert serve_json["router"]["grpc_host"] == "127.0.0.1"
    monkeypatch.setattr(cli, "_load_config_file", lambda path: serve_json)
    argv = [a.replace("$(POD_IP)", "10.2.3.4") for a in container["command"][1:]]
    config = cli._serve_config(cli._build_parser().parse_args(argv))
    assert (config.router.grpc_host, config.gateway.host) == ("10.2.3.4", "0.0.0.0")


def test_router_pods_read_the_internal_token_from_its_secret_never_from_the_config(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``router.internalTokenSecretRef`` becomes SWITCHYARD_INTERNAL_TOKEN by secretKeyRef (the
    operator never reads the Secret); serve.json, a ConfigMap, carries no token, and the router's
    CLI turns the two into a ServeConfig with the token. Without the ref there is no variable."""
    children = by_key(service_children(owner("LLMService", "llama-pd"), service_spec(), {}))
    container = pod(children["Deployment", "llama-pd-router"])["containers"][0]
    (env,) = [e for e in container["env"] if e["name"] == "SWITCHYARD_INTERNAL_TOKEN"]
    assert env["valueFrom"]["secretKeyRef"] == {"name": "llama-pd-internal-token", "key": "internal-token"}
    serve_json = json.loads(children["ConfigMap", "llama-pd-config"]["data"]["serve.json"])
    assert serve_json["internal_token"] is None and serve_json["internal_token_file"] is None
    monkeypatch.setenv("SWITCHYARD_INTERNAL_TOKEN", "token-from-the-secret-0123456")
    monkeypatch.setattr(cli, "_load_config_file", lambda path: serve_json)
    config = cli._serve_config(cli._build_parser().parse_args(container["command"][1:]))
    assert config.internal_token is not None
    assert config.internal_token.get_secret_value() == "token-from-the-secret-0123456"

    router = {k: v for k, v in examples()["llama-pd"]["router"].items() if k != "internalTokenSecretRef"}
    bare = by_key(service_children(owner("LLMService", "llama-pd"), service_spec(router=router), {}))
    env = pod(bare["Deployment", "llama-pd-router"])["containers"][0]["env"]
    assert not [e for e in env if e["name"] == "SWITCHYARD_INTERNAL_TOKEN"]


@pytest.mark.parametrize(
    ("model", "volume", "init"),
    [
        (
            {"pvc": {"claimName": "weights"}},
            {"persistentVolumeClaim": {"claimName": "weights", "readOnly": True}},
            False,
        ),
        ({"uri": "hf://Qwen/Qwen2.5-0.5B-Instruct"}, {"emptyDir": {}}, True),
        ({"path": "/opt/model"}, None, False),
    ],
)
def test_model_sources_become_volumes_or_fetchers(model: dict[str, Any], volume: Any, init: bool) -> None:
    """A PVC is mounted read-only, an hf:// model is fetched by an init container, a path is used as is."""
    svc = LLMServiceSpec.model_validate({"model": model})
    children = by_key(service_children(owner("LLMService", "m"), svc, {}))
    router = pod(children["Deployment", "m-router"])
    volumes = {v["name"]: v for v in router["volumes"]}
    if volume is None:
        assert "model" not in volumes
    else:
        assert {k: v for k, v in volumes["model"].items() if k != "name"} == volume
    assert ("initContainers" in router) is init


def test_kvcache_pool_renders_a_statefulset_and_headless_service() -> None:
    spec = KVCachePoolSpec.model_validate(examples()["llama-pd-kv"])
    children = by_key(kvcache_children(owner("KVCachePool", "llama-pd-kv"), spec, service_spec()))
    sts = children["StatefulSet", "llama-pd-kv-kvcache"]
    assert sts["spec"]["replicas"] == 2 and sts["spec"]["serviceName"] == "llama-pd-kv-kvcache"
    resources = pod(sts)["containers"][0]["resources"]
    # 64Gi for blocks plus 10 % headroom (over the 256Mi floor), request = limit (Guaranteed)
    assert resources["requests"]["memory"] == resources["limits"]["memory"] == "72090Mi"
    assert children["Service", "llama-pd-kv-kvcache"]["spec"]["clusterIP"] == "None"


@pytest.mark.parametrize(
    ("memory", "pod_memory"), [("64Gi", "72090Mi"), ("1Gi", "1280Mi"), ("100M", "352Mi")]
)
def test_kvcache_pod_memory_adds_headroom(memory: str, pod_memory: str) -> None:
    assert kvcache_pod_memory(memory) == pod_memory


@pytest.mark.parametrize("eviction", ["lru", "lfu"])
def test_kvcache_command_is_the_real_cli_and_matches_ports_and_probes(eviction: str) -> None:
    """The rendered container runs a ``switchyard kvcache-server`` command line that the real
    CLI parser and config accept, with the spec's memory and eviction policy, listening on every
    interface at the container port that the probes and the Service use; the probe paths are
    routes of the real server app."""
    spec = KVCachePoolSpec.model_validate({**examples()["llama-pd-kv"], "evictionPolicy": eviction})
    ports = Ports(kvcache=9123)
    children = by_key(kvcache_children(owner("KVCachePool", "kv"), spec, service_spec(), ports))
    container = pod(children["StatefulSet", "kv-kvcache"])["containers"][0]
    program, *argv = container["command"]
    assert program == "switchyard"
    args = cli._build_parser().parse_args(argv)
    assert args.command == "kvcache-server" and args.log_format == "json"
    config = KVCacheServerConfig.model_validate(
        {f: getattr(args, f) for f in ("host", "port", "memory", "eviction") if hasattr(args, f)}
    )
    assert (config.host, config.port, config.eviction) == ("0.0.0.0", 9123, eviction)
    assert config.memory == 64 * 2**30
    assert container["ports"] == [{"name": "kvcache", "containerPort": 9123}]
    routes = {getattr(r, "path", None) for r in KVCacheServer(config).app.routes}
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"]["port"] == 9123
        assert container[probe]["httpGet"]["path"] in routes
    service = children["Service", "kv-kvcache"]
    assert [(p["name"], p["port"]) for p in service["spec"]["ports"]] == [("kvcache", 9123)]


def test_rendering_is_deterministic() -> None:
    """Same spec, same manifests: the basis of write-nothing-when-converged."""
    args = (owner("LLMService", "llama-pd"), service_spec(), {"p": pool_spec()})
    assert service_children(*args) == service_children(*args)
