"""The real ``kubectl`` against kmock's Kubernetes emulator: the committed manifests apply and read back.

Why: the CRDs, examples and operator manifests are what users feed to ``kubectl``; this runs
that binary (no cluster needed) with a temporary kubeconfig pointed at the emulator from
``emulator.py``. The emulator validates nothing, so schema checks live in ``test_crds.py``;
here we check that ``kubectl`` accepts the files, maps the kinds and short names from the
generated CRDs, and that what it stores is what the models accept.

``kubectl`` runs as an asyncio subprocess: the emulator serves from this test's event loop, so
a blocking ``subprocess.run`` would deadlock. The last test pins the emulator's known gaps
(docs/operations/kubernetes.md lists them); if one starts passing, update that page.
"""

from __future__ import annotations

import asyncio
import json
import shutil
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import kmock
import pytest
import pytest_asyncio
import yaml

from switchyard.operator.crd import API_GROUP, CRD_SPECS, ServingPoolStatus
from tests.operator.emulator import K8sEmulator

pytestmark = pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")

REPO = Path(__file__).resolve().parents[2]
CRDS = REPO / "deploy" / "crds"
EXAMPLES = REPO / "deploy" / "examples"
SPECS = {c.kind: c for c in CRD_SPECS}
ALL_KINDS = ",".join(c.plural for c in CRD_SPECS)

Kubectl = Callable[..., Awaitable[tuple[int, str, str]]]


@pytest_asyncio.fixture
async def kubectl(tmp_path: Path) -> AsyncIterator[Kubectl]:
    """``await kubectl("get", "sp")`` -> (rc, stdout, stderr); raises on rc != 0 unless ``check=False``."""
    async with K8sEmulator() as emu, kmock.Server(emu):
        emu.resources.load_bundled()
        server = str(emu.url).rstrip("/")
        kubeconfig = tmp_path / "kubeconfig"
        kubeconfig.write_text(
            yaml.safe_dump(
                {
                    "apiVersion": "v1",
                    "kind": "Config",
                    "current-context": "emulator",
                    "clusters": [{"name": "emulator", "cluster": {"server": server}}],
                    "contexts": [
                        {
                            "name": "emulator",
                            "context": {"cluster": "emulator", "user": "u", "namespace": "default"},
                        }
                    ],
                    "users": [{"name": "u", "user": {"token": "not-a-secret"}}],
                }
            )
        )
        env = {"HOME": str(tmp_path), "PATH": "/usr/local/bin:/usr/bin:/bin"}

        async def run(*args: str, check: bool = True) -> tuple[int, str, str]:
            proc = await asyncio.create_subprocess_exec(
                "kubectl",
                f"--kubeconfig={kubeconfig}",
                f"--cache-dir={tmp_path / 'cache'}",
                "--request-timeout=20s",
                *args,
                cwd=REPO,
                env=env,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
            out, err = await asyncio.wait_for(proc.communicate(), timeout=60)
            rc, stdout, stderr = proc.returncode or 0, out.decode(), err.decode()
            if check and rc != 0:
                raise AssertionError(f"kubectl {' '.join(args)} failed ({rc}): {stderr}")
            return rc, stdout, stderr

        yield run


def _example_docs(name: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all((EXAMPLES / name).read_text()) if d]


async def _apply_crds(kubectl: Kubectl) -> str:
    _, out, _ = await kubectl("apply", "--validate=false", "-f", str(CRDS))
    return out


async def test_crds_apply_and_reapply_unchanged(kubectl: Kubectl) -> None:
    out = await _apply_crds(kubectl)
    for crd in CRD_SPECS:
        assert f"customresourcedefinition.apiextensions.k8s.io/{crd.plural}.{API_GROUP} created" in out
    assert out.count("unchanged") == 0
    again = await _apply_crds(kubectl)
    assert again.count("unchanged") == len(CRD_SPECS)
    _, listing, _ = await kubectl("get", "customresourcedefinitions", "-o", "json")
    stored = {item["metadata"]["name"]: item for item in json.loads(listing)["items"]}
    assert set(stored) == {f"{c.plural}.{API_GROUP}" for c in CRD_SPECS}
    servingpools = stored[f"servingpools.{API_GROUP}"]["spec"]
    assert servingpools["versions"][0]["subresources"]["scale"]["specReplicasPath"] == ".spec.replicas"


async def test_examples_apply_and_read_back_as_valid_specs(kubectl: Kubectl) -> None:
    await _apply_crds(kubectl)
    _, out, _ = await kubectl("apply", "--validate=false", "-f", str(EXAMPLES))
    expected = _example_docs("llmservice-pd.yaml") + _example_docs("llmservice-unified.yaml")
    for doc in expected:
        assert f"{doc['kind'].lower()}.{API_GROUP}/{doc['metadata']['name']} created" in out

    _, listing, _ = await kubectl("get", ALL_KINDS, "-o", "json")
    stored = {(i["kind"], i["metadata"]["name"]): i for i in json.loads(listing)["items"]}
    assert set(stored) == {(d["kind"], d["metadata"]["name"]) for d in expected}
    for doc in expected:
        item = stored[(doc["kind"], doc["metadata"]["name"])]
        assert item["spec"] == doc["spec"]
        assert item["metadata"]["namespace"] == "default"
        SPECS[doc["kind"]].spec_model.model_validate(item["spec"])

    _, again, _ = await kubectl("apply", "--validate=false", "-f", str(EXAMPLES))
    assert again.count("unchanged") == len(expected), again


async def test_short_names_and_jsonpath(kubectl: Kubectl) -> None:
    await _apply_crds(kubectl)
    await kubectl("apply", "--validate=false", "-f", str(EXAMPLES / "llmservice-pd.yaml"))
    _, llms, _ = await kubectl("get", "llms", "-o", "name")
    assert llms.split() == [f"llmservice.{API_GROUP}/llama-pd"]
    _, pools, _ = await kubectl("get", "sp", "-o", "jsonpath={range .items[*]}{.spec.role} {end}")
    assert sorted(pools.split()) == ["decode", "prefill"]
    _, memory, _ = await kubectl("get", "kvp", "llama-pd-kv", "-o", "jsonpath={.spec.memoryPerReplica}")
    assert memory == "64Gi"


async def test_spec_and_status_patches(kubectl: Kubectl) -> None:
    await _apply_crds(kubectl)
    await kubectl("apply", "--validate=false", "-f", str(EXAMPLES / "llmservice-pd.yaml"))
    await kubectl("patch", "servingpool", "llama-pd-decode", "--type=merge", "-p", '{"spec":{"replicas":4}}')
    status = {
        "observedGeneration": 2,
        "replicas": 4,
        "readyReplicas": 1,
        "selector": "app.kubernetes.io/instance=llama-pd-decode",
        "conditions": [{"type": "Progressing", "status": "True", "reason": "PodsPending", "message": "1/4"}],
    }
    await kubectl(
        "patch",
        "servingpool",
        "llama-pd-decode",
        "--subresource=status",
        "--type=merge",
        "-p",
        json.dumps({"status": status}),
    )
    _, out, _ = await kubectl("get", "servingpool", "llama-pd-decode", "-o", "json")
    pool = json.loads(out)
    assert pool["spec"]["replicas"] == 4
    assert pool["metadata"]["generation"] == 2
    assert ServingPoolStatus.model_validate(pool["status"]).selector == status["selector"]
    await kubectl(
        "wait", "--for=jsonpath={.status.readyReplicas}=1", "servingpool/llama-pd-decode", "--timeout=10s"
    )


async def test_delete_removes_the_objects(kubectl: Kubectl) -> None:
    await _apply_crds(kubectl)
    await kubectl("apply", "--validate=false", "-f", str(EXAMPLES / "llmservice-unified.yaml"))
    _, out, _ = await kubectl("delete", "-f", str(EXAMPLES / "llmservice-unified.yaml"))
    assert "qwen-small" in out and "qwen-small-unified" in out
    _, left, _ = await kubectl("get", ALL_KINDS, "-o", "name")
    assert left.strip() == ""


async def test_operator_manifests_apply(kubectl: Kubectl) -> None:
    _, out, _ = await kubectl("apply", "--validate=false", "-k", str(REPO / "deploy" / "operator"))
    for line in (
        "serviceaccount/switchyard-operator created",
        "clusterrole.rbac.authorization.k8s.io/switchyard-operator created",
        "clusterrolebinding.rbac.authorization.k8s.io/switchyard-operator created",
        "deployment.apps/switchyard-operator created",
    ):
        assert line in out
    await kubectl("apply", "--validate=false", "-f", str(REPO / "deploy" / "operator" / "workloads"))
    _, role, _ = await kubectl("get", "clusterrole", "switchyard-operator", "-o", "json")
    committed = yaml.safe_load((REPO / "deploy" / "operator" / "clusterrole.yaml").read_text())
    assert json.loads(role)["rules"] == committed["rules"]
    _, accounts, _ = await kubectl("get", "serviceaccounts", "-A", "-o", "json")
    placed = {(i["metadata"]["namespace"], i["metadata"]["name"]) for i in json.loads(accounts)["items"]}
    assert ("switchyard-system", "switchyard-operator") in placed
    assert {("default", "switchyard-router"), ("default", "switchyard-worker")} <= placed


async def test_known_emulator_gaps(kubectl: Kubectl) -> None:
    """What a real API server does and the emulator does not; docs/operations/kubernetes.md explains each."""
    await _apply_crds(kubectl)
    await kubectl("apply", "--validate=false", "-f", str(EXAMPLES / "llmservice-pd.yaml"))
    # Client-side validation downloads /openapi/v3, which the emulator does not serve.
    rc, _, err = await kubectl("apply", "-f", str(EXAMPLES / "llmservice-pd.yaml"), check=False)
    assert rc != 0 and "openapi" in err
    rc, _, _ = await kubectl("explain", "servingpool.spec", check=False)
    assert rc != 0
    # No server-side printing: additionalPrinterColumns are not applied, only NAME and AGE.
    _, table, _ = await kubectl("get", "servingpools")
    assert table.split("\n")[0].split() == ["NAME", "AGE"]
    # The scale subresource is not served, so `kubectl scale` (and an HPA) cannot drive it.
    rc, _, _ = await kubectl("scale", "servingpool", "llama-pd-prefill", "--replicas=3", check=False)
    assert rc != 0
    # Categories are not registered from the CRD, so `kubectl get switchyard` finds nothing.
    rc, _, _ = await kubectl("get", "switchyard", check=False)
    assert rc != 0
    # No validation at all: a spec the CRD schema rejects (negative replicas, unknown role) is stored.
    bad_spec = {"replicas": -1, "role": "encode"}
    await kubectl(
        "patch", "servingpool", "llama-pd-prefill", "--type=merge", "-p", json.dumps({"spec": bad_spec})
    )
    _, role, _ = await kubectl("get", "servingpool", "llama-pd-prefill", "-o", "jsonpath={.spec.role}")
    assert role == "encode", "the emulator accepts what the CRD schema rejects (test_crds.py covers that)"
