"""The generated CRDs: committed YAML is current, schemas are structural, and bad specs are refused.

Bad specs are checked twice, as the design promises: by the CRD schema as the API server would
apply it (``schema_admission``: defaults, OpenAPI validation, CEL rules) and by the pydantic
model the operator validates with.
"""

from __future__ import annotations

import copy
import typing
from pathlib import Path
from typing import Any

import celpy
import pytest
import yaml
from pydantic import ValidationError

from switchyard.config import MAX_POOL_INSTANCES, PoolConfig
from switchyard.operator.crd import (
    API_GROUP,
    CRD_SPECS,
    AutoscalingSpec,
    ModelSource,
    PolicyName,
    RatioBand,
    ServingPoolStatus,
)
from switchyard.operator.crd import schema as crds
from switchyard.router.policies import POLICIES
from tests.operator.schema_admission import admission_errors, apply_defaults, cel_rules, structural_problems

REPO = Path(__file__).resolve().parents[2]
CRD_DIR = REPO / "deploy" / "crds"
EXAMPLES = sorted((REPO / "deploy" / "examples").glob("*.yaml"))
SPECS = {c.kind: c for c in CRD_SPECS}
REGENERATE = (
    "regenerate with `switchyard crds` (or `python -m switchyard.operator.crd.schema`)"
    " and commit deploy/crds/"
)


def _schema(kind: str) -> dict[str, Any]:
    crd = crds.generate_crd(SPECS[kind])
    schema: dict[str, Any] = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    return schema


def _obj(kind: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": f"{API_GROUP}/v1alpha1", "kind": kind, "metadata": {"name": "x"}, "spec": spec}


def _example_objects() -> list[dict[str, Any]]:
    return [doc for path in EXAMPLES for doc in yaml.safe_load_all(path.read_text()) if doc]


# ----------------------------------------------------------------------------- drift


def test_committed_crds_match_the_models() -> None:
    generated = crds.generate_crds()
    committed = {p.name for p in CRD_DIR.glob("*.yaml")}
    assert committed == set(generated), f"deploy/crds/ holds {sorted(committed)}; {REGENERATE}"
    for name, crd in generated.items():
        assert (CRD_DIR / name).read_text() == crds.render_yaml(crd), f"{name} is stale: {REGENERATE}"


def test_crds_command_check_mode_reports_stale_files(tmp_path: Path) -> None:
    assert crds.main(["--out", str(tmp_path), "--check"]) == 1
    assert crds.main(["--out", str(tmp_path)]) == 0
    assert crds.main(["--out", str(tmp_path), "--check"]) == 0


def test_policy_enum_is_the_router_registry() -> None:
    """A policy registered in the router but missing from the CRD enum could never be selected."""
    assert sorted(typing.get_args(PolicyName)) == sorted(POLICIES)


# ----------------------------------------------------------------------------- shape


@pytest.mark.parametrize("kind", sorted(SPECS))
def test_schema_is_structural(kind: str) -> None:
    assert structural_problems(_schema(kind)) == []


@pytest.mark.parametrize(
    ("kind", "free_form"),
    [
        ("LLMService", {".spec.router.policyParams", ".spec.engine.extraArgs"}),
        ("ServingPool", {".spec.engine.extraArgs"}),
        ("KVCachePool", set()),
    ],
)
def test_unknown_fields_are_kept_only_in_free_form_args(kind: str, free_form: set[str]) -> None:
    found: set[str] = set()

    def walk(node: dict[str, Any], path: str) -> None:
        if node.get("x-kubernetes-preserve-unknown-fields"):
            found.add(path)
        for name, sub in node.get("properties", {}).items():
            walk(sub, f"{path}.{name}")
        if isinstance(node.get("items"), dict):
            walk(node["items"], f"{path}[]")

    walk(_schema(kind), "")
    assert found == free_form


@pytest.mark.parametrize("kind", sorted(SPECS))
def test_every_spec_field_is_described(kind: str) -> None:
    """Field docstrings are the `kubectl explain` text; a field without one is undocumented API."""
    missing: list[str] = []

    def walk(node: dict[str, Any], path: str) -> None:
        for name, sub in node.get("properties", {}).items():
            if not sub.get("description"):
                missing.append(f"{path}.{name}")
            walk(sub, f"{path}.{name}")
        if isinstance(node.get("items"), dict):
            walk(node["items"], f"{path}[]")

    walk(_schema(kind)["properties"]["spec"], ".spec")
    walk(_schema(kind)["properties"]["status"], ".status")
    assert missing == []


@pytest.mark.parametrize("kind", sorted(SPECS))
def test_names_subresources_and_printer_columns(kind: str) -> None:
    crd = crds.generate_crd(SPECS[kind])
    names, version = crd["spec"]["names"], crd["spec"]["versions"][0]
    assert crd["metadata"]["name"] == f"{names['plural']}.{API_GROUP}"
    assert names["categories"] == ["switchyard"]
    assert (
        names["shortNames"] == {"LLMService": ["llms"], "ServingPool": ["sp"], "KVCachePool": ["kvp"]}[kind]
    )
    assert "status" in version["subresources"]
    schema = version["schema"]["openAPIV3Schema"]
    for column in version["additionalPrinterColumns"]:
        # The API server decodes these fields strictly (priority is an int32, not "1").
        assert set(column) <= {"name", "type", "format", "description", "priority", "jsonPath"}, column
        assert column["type"] in {"integer", "number", "string", "boolean", "date"}, column
        assert isinstance(column.get("priority", 0), int), column
        assert all(isinstance(column[k], str) for k in column if k != "priority"), column
        path = column["jsonPath"].split("[")[0].lstrip(".").split(".")
        if path[0] == "metadata":
            continue
        node = schema
        for part in path:
            assert part in node.get("properties", {}), (
                f"printer column {column['name']}: no {column['jsonPath']}"
            )
            node = node["properties"][part]
        if "[" not in column["jsonPath"]:
            assert node["type"] == column["type"], f"printer column {column['name']}: type {node['type']}"


def test_servingpool_scale_subresource_points_at_real_fields() -> None:
    version = crds.generate_crd(SPECS["ServingPool"])["spec"]["versions"][0]
    scale, schema = version["subresources"]["scale"], version["schema"]["openAPIV3Schema"]
    assert scale == {
        "specReplicasPath": ".spec.replicas",
        "statusReplicasPath": ".status.replicas",
        "labelSelectorPath": ".status.selector",
    }
    props = schema["properties"]
    assert props["spec"]["properties"]["replicas"]["type"] == "integer"
    assert props["status"]["properties"]["replicas"]["type"] == "integer"
    assert props["status"]["properties"]["selector"]["type"] == "string"


@pytest.mark.parametrize("kind", sorted(SPECS))
def test_cel_rules_compile(kind: str) -> None:
    env = celpy.Environment()
    for path, _, rule in cel_rules(_schema(kind)):
        env.compile(rule["rule"])  # raises CELParseError on a syntax error
        assert rule["message"], path


# ----------------------------------------------------------------------------- admission

PD_POOL = {"serviceRef": {"name": "llm"}, "role": "prefill"}
SERVICE = {"model": {"path": "/models/m"}}
KV_POOL = {"serviceRef": {"name": "llm"}}
MINIMAL: dict[str, dict[str, Any]] = {"LLMService": SERVICE, "ServingPool": PD_POOL, "KVCachePool": KV_POOL}


def _with(base: dict[str, Any], **changes: Any) -> dict[str, Any]:
    spec = copy.deepcopy(base)
    spec.update(changes)
    return spec


BAD_SPECS: list[tuple[str, str, dict[str, Any], str]] = [
    # (case, kind, spec, a fragment the API server's error must contain: the right reason, not any)
    ("missing model", "LLMService", {}, "'model' is a required"),
    (
        "model without a source",
        "LLMService",
        {"model": {"tokenizer": "t"}},
        "exactly one of path, pvc or uri",
    ),
    (
        "two model sources",
        "LLMService",
        {"model": {"path": "/m", "uri": "hf://a/b"}},
        "exactly one of path, pvc or uri",
    ),
    ("pvc without claim", "LLMService", {"model": {"pvc": {"subPath": "m"}}}, "claimName"),
    ("unsupported uri scheme", "LLMService", {"model": {"uri": "ftp://host/m"}}, "spec.model.uri"),
    ("unknown policy", "LLMService", _with(SERVICE, router={"policy": "random"}), "spec.router.policy"),
    ("no routers", "LLMService", _with(SERVICE, router={"replicas": 0}), "spec.router.replicas"),
    ("zero ttft slo", "LLMService", _with(SERVICE, router={"slo": {"ttftMs": 0}}), "ttftMs"),
    (
        "rebalance without migration",
        "LLMService",
        _with(SERVICE, router={"migration": {"enabled": False, "rebalance": True}}),
        "rebalance needs migration.enabled",
    ),
    (
        "too many pre-copy stages",
        "LLMService",
        _with(SERVICE, router={"migration": {"maxStages": 9}}),
        "spec.router.migration.maxStages",
    ),
    ("port out of range", "LLMService", _with(SERVICE, gateway={"port": 70000}), "spec.gateway.port"),
    ("block size not a power of two", "LLMService", _with(SERVICE, engine={"blockSize": 24}), "blockSize"),
    ("misspelt field", "LLMService", _with(SERVICE, routr={"policy": "dualmap"}), "'routr' was unexpected"),
    ("bad ray head memory", "LLMService", _with(SERVICE, ray={"headMemory": "8 GB"}), "headMemory"),
    ("negative replicas", "ServingPool", _with(PD_POOL, replicas=-1), "spec.replicas"),
    (
        "replicas above the pool bound",
        "ServingPool",
        _with(PD_POOL, replicas=MAX_POOL_INSTANCES + 1),
        "spec.replicas",
    ),
    (
        "autoscaling above the pool bound",
        "ServingPool",
        _with(PD_POOL, autoscaling={"maxReplicas": MAX_POOL_INSTANCES + 1}),
        "spec.autoscaling.maxReplicas",
    ),
    ("unknown role", "ServingPool", _with(PD_POOL, role="encode"), "spec.role"),
    ("missing serviceRef", "ServingPool", {"role": "decode"}, "'serviceRef' is a required"),
    (
        "serviceRef not a DNS label",
        "ServingPool",
        _with(PD_POOL, serviceRef={"name": "Bad_Name"}),
        "spec.serviceRef.name",
    ),
    (
        "min > max replicas",
        "ServingPool",
        _with(PD_POOL, autoscaling={"minReplicas": 5, "maxReplicas": 2}),
        "minReplicas must not exceed maxReplicas",
    ),
    (
        "min > default max",
        "ServingPool",
        _with(PD_POOL, autoscaling={"minReplicas": 9}),
        "minReplicas must not exceed maxReplicas",
    ),
    (
        "ratio band inverted",
        "ServingPool",
        _with(PD_POOL, autoscaling={"prefillDecodeRatio": {"min": 3, "max": 1}}),
        "min must not exceed max",
    ),
    (
        "slo target of 0",
        "ServingPool",
        _with(PD_POOL, autoscaling={"targetSloAttainment": 0}),
        "targetSloAttainment",
    ),
    ("kv target above 1", "ServingPool", _with(PD_POOL, autoscaling={"targetKvUsage": 1.5}), "targetKvUsage"),
    ("negative gpus", "ServingPool", _with(PD_POOL, resources={"gpus": -1}), "resources.gpus"),
    ("bad cpu quantity", "ServingPool", _with(PD_POOL, resources={"cpu": "two"}), "resources.cpu"),
    (
        "bad toleration operator",
        "ServingPool",
        _with(PD_POOL, tolerations=[{"operator": "Maybe"}]),
        "operator",
    ),
    ("bad memory quantity unit", "KVCachePool", _with(KV_POOL, memoryPerReplica="16GB"), "memoryPerReplica"),
    (
        "memory quantity not a number",
        "KVCachePool",
        _with(KV_POOL, memoryPerReplica="lots"),
        "memoryPerReplica",
    ),
    ("negative memory", "KVCachePool", _with(KV_POOL, memoryPerReplica="-1Gi"), "memoryPerReplica"),
    ("unknown eviction policy", "KVCachePool", _with(KV_POOL, evictionPolicy="fifo"), "evictionPolicy"),
    ("negative kv replicas", "KVCachePool", _with(KV_POOL, replicas=-2), "spec.replicas"),
]


@pytest.mark.parametrize(("case", "kind", "spec", "reason"), BAD_SPECS, ids=[c[0] for c in BAD_SPECS])
def test_bad_spec_is_rejected_by_crd_schema_and_model(
    case: str, kind: str, spec: dict[str, Any], reason: str
) -> None:
    errors = admission_errors(_schema(kind), _obj(kind, spec))
    assert any(reason in e for e in errors), f"{case}: expected {reason!r} among {errors}"
    with pytest.raises(ValidationError):
        SPECS[kind].spec_model.model_validate(spec)


def test_servingpool_replicas_share_the_pool_instance_bound() -> None:
    """``replicas`` and the autoscaler's bounds have the maximum a ``PoolConfig`` accepts, in the
    model and in the generated schema, so an admitted pool always renders a valid serve.json."""
    spec = _schema("ServingPool")["properties"]["spec"]["properties"]
    autoscaling = spec["autoscaling"]["properties"]
    maxima = [spec["replicas"], autoscaling["minReplicas"], autoscaling["maxReplicas"]]
    assert [node["maximum"] for node in maxima] == [MAX_POOL_INSTANCES] * 3
    assert PoolConfig.model_json_schema()["properties"]["instances"]["maximum"] == MAX_POOL_INSTANCES
    assert PoolConfig(instances=MAX_POOL_INSTANCES).instances == MAX_POOL_INSTANCES
    with pytest.raises(ValidationError):
        PoolConfig(instances=MAX_POOL_INSTANCES + 1)


@pytest.mark.parametrize(
    ("model", "bad", "rule"),
    [
        (ModelSource, {"path": "/m", "pvc": {"claimName": "c"}}, "has(self.pvc)"),
        (AutoscalingSpec, {"minReplicas": 3, "maxReplicas": 2}, "self.minReplicas <= self.maxReplicas"),
        (RatioBand, {"min": 2.0, "max": 1.0}, "self.min <= self.max"),
    ],
)
def test_cross_field_rules_live_in_model_and_crd(model: type[Any], bad: dict[str, Any], rule: str) -> None:
    """Each cross-field rule is a pydantic validator and a CEL rule on the same schema node."""
    with pytest.raises(ValidationError):
        model.model_validate(bad)
    rules = [r["rule"] for crd in CRD_SPECS for _, node, r in cel_rules(_schema(crd.kind))]
    assert any(rule in r for r in rules), f"no CEL rule containing {rule!r} in the CRDs"


@pytest.mark.parametrize(
    "obj",
    _example_objects(),
    ids=lambda o: f"{o['kind']}/{o['metadata']['name']}" if isinstance(o, dict) else "",
)
def test_examples_are_accepted_by_schema_and_model(obj: dict[str, Any]) -> None:
    assert obj["apiVersion"] == f"{API_GROUP}/v1alpha1"
    assert admission_errors(_schema(obj["kind"]), obj) == []
    SPECS[obj["kind"]].spec_model.model_validate(obj["spec"])


def test_examples_cover_pd_kv_and_unified() -> None:
    names = {p.name for p in EXAMPLES}
    assert {"llmservice-pd.yaml", "llmservice-unified.yaml"} <= names
    pd = list(yaml.safe_load_all((REPO / "deploy/examples/llmservice-pd.yaml").read_text()))
    roles = {d["spec"]["role"] for d in pd if d["kind"] == "ServingPool"}
    assert roles == {"prefill", "decode"} and any(d["kind"] == "KVCachePool" for d in pd)


@pytest.mark.parametrize("kind", sorted(SPECS))
def test_schema_defaults_agree_with_model_defaults(kind: str) -> None:
    """The server's defaulting and the model's defaults give the operator the same spec."""
    minimal = MINIMAL[kind]
    full = {**minimal, "autoscaling": {}} if kind == "ServingPool" else minimal
    defaulted = apply_defaults(_schema(kind)["properties"]["spec"], full)
    model = SPECS[kind].spec_model
    assert model.model_validate(defaulted) == model.model_validate(full)


@pytest.mark.parametrize(
    "obj", _example_objects(), ids=lambda o: o["metadata"]["name"] if isinstance(o, dict) else ""
)
def test_model_dump_round_trips_through_the_schema(obj: dict[str, Any]) -> None:
    """What the operator writes back (a dumped spec) is something the API server accepts."""
    spec = (
        SPECS[obj["kind"]].spec_model.model_validate(obj["spec"]).model_dump(mode="json", exclude_none=True)
    )
    assert admission_errors(_schema(obj["kind"]), _obj(obj["kind"], spec)) == []


def test_status_written_by_the_operator_fits_the_status_schema() -> None:
    status = ServingPoolStatus.model_validate(
        {
            "observedGeneration": 3,
            "conditions": [
                {
                    "type": "Ready",
                    "status": "True",
                    "reason": "AllReady",
                    "lastTransitionTime": "2026-01-01T00:00:00Z",
                }
            ],
            "replicas": 2,
            "readyReplicas": 2,
            "selector": "app.kubernetes.io/instance=p",
            "sloAttainment": 0.97,
        }
    ).model_dump(mode="json", exclude_none=True)
    obj = {**_obj("ServingPool", PD_POOL), "status": status}
    assert admission_errors(_schema("ServingPool"), obj) == []
    bad = {**obj, "status": {**status, "conditions": [{"type": "Happy", "status": "True"}]}}
    assert admission_errors(_schema("ServingPool"), bad)
