"""The operator's RBAC and Deployment in deploy/operator/: least privilege, checked rule by rule.

Why a test: RBAC only grows. These checks refuse wildcards, any access to Secrets, the verbs
that hand out more rights (escalate, bind, impersonate), writes outside the objects the
operator renders, and a Deployment that would run as root or with a writable root filesystem.
They also tie the manifests to the code: every kind the operator's client touches is granted,
and the workload ServiceAccounts carry the names the renderer puts into pods.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from switchyard.operator.crd import API_GROUP, CRD_SPECS
from switchyard.operator.kube import KINDS
from switchyard.operator.render.objects import ROUTER_SERVICE_ACCOUNT, WORKER_SERVICE_ACCOUNT

OPERATOR_DIR = Path(__file__).resolve().parents[2] / "deploy" / "operator"
WRITE_VERBS = {"create", "update", "patch", "delete", "deletecollection"}
DANGEROUS_VERBS = {"escalate", "bind", "impersonate", "*"}
# (apiGroup, resource) the operator may write; everything else is read-only or absent.
WRITABLE = {
    *((API_GROUP, c.plural) for c in CRD_SPECS),
    *((API_GROUP, f"{c.plural}/status") for c in CRD_SPECS),
    *((API_GROUP, f"{c.plural}/finalizers") for c in CRD_SPECS),
    ("apps", "deployments"),
    ("apps", "statefulsets"),
    ("", "services"),
    ("", "configmaps"),
    ("", "pods"),
    ("", "events"),
}


def _docs(*names: str) -> list[dict[str, Any]]:
    return [d for n in names for d in yaml.safe_load_all((OPERATOR_DIR / n).read_text()) if d]


def _one(kind: str) -> dict[str, Any]:
    found = [d for d in _docs(*_kustomize_resources()) if d["kind"] == kind]
    assert len(found) == 1, f"expected one {kind} in deploy/operator, found {len(found)}"
    return found[0]


def _kustomize_resources() -> list[str]:
    resources: list[str] = yaml.safe_load((OPERATOR_DIR / "kustomization.yaml").read_text())["resources"]
    return resources


def _grants() -> dict[tuple[str, str], set[str]]:
    grants: dict[tuple[str, str], set[str]] = {}
    for rule in _one("ClusterRole")["rules"]:
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                grants.setdefault((group, resource), set()).update(rule["verbs"])
    return grants


def test_manifests_name_no_namespace() -> None:
    """Namespace-less: the install namespace is chosen once, in kustomization.yaml."""
    for doc in _docs(*_kustomize_resources(), "workloads/serviceaccounts.yaml"):
        assert "namespace" not in doc["metadata"], doc["metadata"]["name"]
        for subject in doc.get("subjects", []):
            assert "namespace" not in subject


def test_no_wildcards_no_secrets_no_escalation() -> None:
    for rule in _one("ClusterRole")["rules"]:
        assert "nonResourceURLs" not in rule and "resourceNames" not in rule
        for key in ("apiGroups", "resources", "verbs"):
            assert not any("*" in item for item in rule[key]), f"wildcard in {key}: {rule}"
        assert "secrets" not in rule["resources"], "the operator must not touch Secrets"
        assert not set(rule["verbs"]) & DANGEROUS_VERBS, rule


def test_writes_only_what_the_operator_renders_or_reports() -> None:
    for key, verbs in _grants().items():
        if verbs & WRITE_VERBS:
            assert key in WRITABLE, f"write access to {key}: {sorted(verbs & WRITE_VERBS)}"
    assert "deletecollection" not in set().union(*_grants().values())


def test_read_only_grants_stay_read_only() -> None:
    grants = _grants()
    assert grants[("", "persistentvolumeclaims")] == {"get"}
    assert grants[("apiextensions.k8s.io", "customresourcedefinitions")] == {"list", "watch"}
    assert grants[("", "events")] == {"create"}
    assert grants[("", "pods")] == {"get", "list", "patch"}, "pods are drained by annotation, never deleted"


def test_every_kind_the_client_uses_is_granted() -> None:
    grants = _grants()
    for kind in KINDS.values():
        group = kind.api_version.rpartition("/")[0]
        assert "get" in grants.get((group, kind.plural), set()), (
            f"{kind.plural} is used by kube.py but not granted"
        )


@pytest.mark.parametrize("crd", CRD_SPECS, ids=lambda c: c.kind)
def test_custom_resources_status_and_finalizers(crd: Any) -> None:
    grants = _grants()
    assert grants[(API_GROUP, crd.plural)] == {"get", "list", "watch", "patch"}
    assert grants[(API_GROUP, f"{crd.plural}/status")] == {"get", "patch"}
    assert grants[(API_GROUP, f"{crd.plural}/finalizers")] == {"update"}


def test_binding_ties_the_role_to_the_operator_account() -> None:
    binding, account = _one("ClusterRoleBinding"), _one("ServiceAccount")
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "ClusterRole",
        "name": _one("ClusterRole")["metadata"]["name"],
    }
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": account["metadata"]["name"]}]
    pod = _one("Deployment")["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == account["metadata"]["name"]


def test_operator_deployment_is_locked_down() -> None:
    deployment = _one("Deployment")
    assert deployment["spec"]["replicas"] == 1 and deployment["spec"]["strategy"]["type"] == "Recreate"
    pod = deployment["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    (container,) = pod["containers"]
    sc = container["securityContext"]
    assert sc["runAsNonRoot"] is True
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert not sc.get("privileged", False)
    assert container["command"][:2] == ["switchyard", "operator"]
    flags = " ".join(container["command"])
    assert "--peering" not in flags, "no peering rules are granted, so Kopf must run standalone"
    assert "--namespace" not in flags, "cluster-wide: the role grants no namespace listing"
    assert not any(v.get("hostPath") for v in pod.get("volumes", []))


def test_workload_accounts_match_the_renderer_and_mount_no_token() -> None:
    accounts = {d["metadata"]["name"]: d for d in _docs("workloads/serviceaccounts.yaml")}
    assert set(accounts) == {ROUTER_SERVICE_ACCOUNT, WORKER_SERVICE_ACCOUNT}
    for account in accounts.values():
        assert account["automountServiceAccountToken"] is False
    rbac = [d for d in _docs(*_kustomize_resources()) if d["kind"].endswith("Binding")]
    bound = {s["name"] for d in rbac for s in d["subjects"]}
    assert not bound & set(accounts), "router and workers need no Kubernetes API access"


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
def test_kustomize_sets_the_install_namespace_everywhere() -> None:
    out = subprocess.run(
        ["kubectl", "kustomize", str(OPERATOR_DIR)], check=True, capture_output=True, text=True, timeout=60
    ).stdout
    docs = [d for d in yaml.safe_load_all(out) if d]
    namespace = yaml.safe_load((OPERATOR_DIR / "kustomization.yaml").read_text())["namespace"]
    for doc in docs:
        if doc["kind"] not in ("ClusterRole", "ClusterRoleBinding"):
            assert doc["metadata"]["namespace"] == namespace
    (binding,) = [d for d in docs if d["kind"] == "ClusterRoleBinding"]
    assert binding["subjects"][0]["namespace"] == namespace
