"""The example NetworkPolicies (deploy/security/) fit the pods the operator renders.

Why a test: a NetworkPolicy whose selector matches nothing, or that allows a port nobody
listens on, fails silently, by isolating nothing or by cutting a path Switchyard needs. So
every policy's pod selector and every peer selector must match rendered pods of the example
service (deploy/examples/llmservice-pd.yaml), every allowed port must be one those pods
declare, and the default deny must cover every pod the service renders.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from switchyard.operator.crd import KVCachePoolSpec, LLMServiceSpec, ServingPoolSpec
from switchyard.operator.render.kvcache import kvcache_children
from switchyard.operator.render.objects import Owner
from switchyard.operator.render.pool import pool_children
from switchyard.operator.render.service import service_children
from tests.operator.harness import load_examples

REPO = Path(__file__).resolve().parents[2]
POLICIES = [
    d for d in yaml.safe_load_all((REPO / "deploy/security/networkpolicy-llama-pd.yaml").read_text()) if d
]


def _pods() -> list[dict[str, Any]]:
    """Pod templates (labels and container ports) of every workload the example renders."""
    docs = {d["metadata"]["name"]: d for d in load_examples("llmservice-pd.yaml", "prod")}

    def owner(kind: str, name: str) -> Owner:
        return Owner(kind=kind, name=name, namespace="prod", uid=f"uid-{name}")

    svc = LLMServiceSpec.model_validate(docs["llama-pd"]["spec"])
    pools = {
        n: ServingPoolSpec.model_validate(docs[n]["spec"]) for n in ("llama-pd-prefill", "llama-pd-decode")
    }
    children = [
        *service_children(owner("LLMService", "llama-pd"), svc, pools),
        *(c for n, p in pools.items() for c in pool_children(owner("ServingPool", n), p, svc)),
        *kvcache_children(
            owner("KVCachePool", "llama-pd-kv"),
            KVCachePoolSpec.model_validate(docs["llama-pd-kv"]["spec"]),
            svc,
        ),
    ]
    return [c["spec"]["template"] for c in children if c["kind"] in ("Deployment", "StatefulSet")]


def _matches(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for expr in selector.get("matchExpressions", []):
        assert expr["operator"] == "In", "extend _matches for other operators"
        if labels.get(expr["key"]) not in expr["values"]:
            return False
    return True


def _selected(selector: dict[str, Any]) -> list[dict[str, Any]]:
    return [p for p in _pods() if _matches(selector, p["metadata"]["labels"])]


def _ports(pod: dict[str, Any]) -> set[int]:
    return {p["containerPort"] for c in pod["spec"]["containers"] for p in c.get("ports", [])}


def test_the_default_deny_covers_every_rendered_pod() -> None:
    (deny,) = [p for p in POLICIES if p["metadata"]["name"].endswith("default-deny")]
    assert deny["spec"]["policyTypes"] == ["Ingress"] and "ingress" not in deny["spec"]
    assert len(_selected(deny["spec"]["podSelector"])) == len(_pods()) > 0


def test_every_selector_matches_rendered_pods_and_every_port_is_theirs() -> None:
    for policy in POLICIES:
        name = policy["metadata"]["name"]
        targets = _selected(policy["spec"]["podSelector"])
        assert targets, f"{name}: its podSelector matches no rendered pod"
        for rule in policy["spec"].get("ingress", []):
            for peer in rule["from"]:
                if "podSelector" in peer and "namespaceSelector" not in peer:
                    own_label = peer["podSelector"].get("matchLabels", {}).get("switchyard.dev/service")
                    if own_label is not None:  # a peer of the service itself must exist
                        assert _selected(peer["podSelector"]), f"{name}: a peer selector matches no pod"
            for port in rule.get("ports", []):
                assert all(port["port"] in _ports(t) for t in targets), f"{name}: no target listens on {port}"


def test_the_internal_paths_are_open_and_nothing_else_reaches_workers() -> None:
    """Routers reach workers (Worker gRPC on a port chosen at start: any port) and the head's
    Ray client port; Ray members reach each other; only those reach worker pods."""
    components = {"router", "ray-head", "worker", "kvcache"}
    allowed: dict[str, set[str]] = {c: set() for c in components}
    for policy in POLICIES:
        for target in _selected(policy["spec"]["podSelector"]):
            for rule in policy["spec"].get("ingress", []):
                for peer in rule["from"]:
                    for source in _selected(peer.get("podSelector", {"matchLabels": {"x": "none"}})):
                        allowed[target["metadata"]["labels"]["app.kubernetes.io/component"]].add(
                            source["metadata"]["labels"]["app.kubernetes.io/component"]
                        )
    assert allowed["worker"] == {"router", "ray-head", "worker"}
    assert allowed["ray-head"] == {"router", "ray-head", "worker"}
    assert allowed["router"] == set(), "router pods: only clients outside the service, by namespace or label"
    assert allowed["kvcache"] == {"worker"}
