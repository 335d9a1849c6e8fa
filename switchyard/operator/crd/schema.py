"""CustomResourceDefinition manifests generated from the pydantic models in ``models.py``.

Why generate: the operator validates specs with those models, so a hand-written schema would
drift from them. The generated YAML is committed under ``deploy/crds/`` (Helm and ``kubectl
apply`` read it there) and a test fails when it differs from what this module produces now.
Regenerate with ``switchyard crds`` or ``python -m switchyard.operator.crd.schema``.

Pydantic emits JSON Schema 2020-12; Kubernetes wants a *structural* OpenAPI v3 schema:
every node typed, no ``$ref``, no ``anyOf``/``oneOf`` that alternate types, no
``additionalProperties`` next to ``properties``, boolean ``exclusiveMinimum``. ``to_structural``
does that translation and refuses any construct it cannot flatten, so an unsupported model
field fails generation instead of producing a CRD the API server rejects. Free-form maps of
``Any`` (``extraArgs``, ``policyParams``) become ``x-kubernetes-preserve-unknown-fields``.
"""

from __future__ import annotations

import argparse
import copy
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from switchyard.operator.crd import API_GROUP, API_VERSION, CRD_SPECS, CrdSpec

__all__ = [
    "DEFAULT_OUT_DIR",
    "PRINTER_COLUMNS",
    "SchemaError",
    "add_arguments",
    "crd_filename",
    "generate_crd",
    "generate_crds",
    "main",
    "render_yaml",
    "run",
    "stale_files",
    "to_structural",
    "write_crds",
]

DEFAULT_OUT_DIR = Path("deploy/crds")
CATEGORIES = ["switchyard"]

_HEADER = "# Generated from switchyard/operator/crd/models.py by `switchyard crds`; do not edit by hand.\n"
_DROPPED_KEYS = frozenset({"title", "$defs", "additionalProperties"})
_KEY_ORDER = ("description", "type", "format", "enum", "default", "minimum", "exclusiveMinimum", "maximum")

_AGE = {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}
_READY_COND = {
    "name": "Status",
    "type": "string",
    "jsonPath": '.status.conditions[?(@.type=="Ready")].status',
    "description": "Status of the Ready condition.",
}
_SLO = {
    "name": "SLO",
    "type": "number",
    "format": "float",
    "jsonPath": ".status.sloAttainment",
    "description": "Share of recent requests that met their latency objectives (see status).",
}
_READY = {"name": "Ready", "type": "integer", "jsonPath": ".status.readyReplicas"}
_SERVICE = {"name": "Service", "type": "string", "jsonPath": ".spec.serviceRef.name"}

PRINTER_COLUMNS: dict[str, list[dict[str, Any]]] = {
    "LLMService": [
        {"name": "Policy", "type": "string", "jsonPath": ".spec.router.policy"},
        {"name": "Routers", "type": "integer", "jsonPath": ".spec.router.replicas"},
        _READY,
        _SLO,
        _READY_COND,
        _AGE,
    ],
    "ServingPool": [
        _SERVICE,
        {"name": "Role", "type": "string", "jsonPath": ".spec.role"},
        {"name": "Replicas", "type": "integer", "jsonPath": ".spec.replicas"},
        _READY,
        _SLO,
        {
            "name": "KV",
            "type": "number",
            "format": "float",
            "jsonPath": ".status.kvUsage",
            "description": "Mean KV-cache usage of the pool's instances.",
        },
        _READY_COND,
        _AGE,
    ],
    "KVCachePool": [
        _SERVICE,
        {"name": "Replicas", "type": "integer", "jsonPath": ".spec.replicas"},
        _READY,
        {"name": "Memory", "type": "string", "jsonPath": ".spec.memoryPerReplica"},
        {"name": "Eviction", "type": "string", "jsonPath": ".spec.evictionPolicy", "priority": 1},
        _READY_COND,
        _AGE,
    ],
}
"""``kubectl get`` columns per kind; ``priority: 1`` columns show only with ``-o wide``."""


class SchemaError(ValueError):
    """A model construct that has no structural OpenAPI equivalent."""


def _clean_description(text: str) -> str:
    """Docstring prose as ``kubectl explain`` shows it: one paragraph, Markdown code quotes."""
    return " ".join(text.replace("``", "`").split())


def to_structural(
    schema: Mapping[str, Any], defs: Mapping[str, Any] | None = None, where: str = ""
) -> dict[str, Any]:
    """Translate one pydantic JSON-Schema node (and its children) into a structural OpenAPI node."""
    defs = schema.get("$defs", {}) if defs is None else defs
    node = dict(schema)
    while "$ref" in node or "anyOf" in node:  # resolve before translating, so each node is translated once
        ref = node.pop("$ref", None)
        if ref is not None:  # the field's own description/default win over the class's
            node = {**copy.deepcopy(defs[ref.rsplit("/", 1)[-1]]), **node}
            continue
        branches = [b for b in node.pop("anyOf") if b != {"type": "null"}]
        if len(branches) != 1:
            raise SchemaError(f"{where or '<root>'}: a union of {len(branches)} types is not structural")
        node = {**branches[0], **{k: v for k, v in node.items() if k != "default" or v is not None}}
    if "oneOf" in node or "allOf" in node or "not" in node:
        raise SchemaError(f"{where or '<root>'}: oneOf/allOf/not are not supported")
    if node.get("default", 0) is None:
        del node["default"]

    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in _DROPPED_KEYS:
            continue
        if key == "description":
            out[key] = _clean_description(value)
        elif key == "exclusiveMinimum" or key == "exclusiveMaximum":
            out["minimum" if key == "exclusiveMinimum" else "maximum"] = value
            out[key] = True
        elif key == "properties":
            out[key] = {name: to_structural(sub, defs, f"{where}.{name}") for name, sub in value.items()}
        elif key == "items":
            out[key] = to_structural(value, defs, f"{where}[]")
        else:
            out[key] = copy.deepcopy(value)

    extra = node.get("additionalProperties")
    if out.get("type") == "object" and "properties" not in out:
        if isinstance(extra, Mapping) and extra:
            out["additionalProperties"] = to_structural(extra, defs, f"{where}{{}}")
        else:  # dict[str, Any]: free-form by design
            out["x-kubernetes-preserve-unknown-fields"] = True
    if isinstance(out.get("default"), Mapping) and "properties" in out:
        out["default"] = {}  # the API server fills nested defaults itself; keep one source of them
    if "type" not in out and not out.get("x-kubernetes-preserve-unknown-fields"):
        raise SchemaError(f"{where or '<root>'}: untyped schema node")
    first = [k for k in _KEY_ORDER if k in out]
    return {k: out[k] for k in [*first, *(k for k in out if k not in _KEY_ORDER)]}


def _without_defaults(node: dict[str, Any]) -> dict[str, Any]:
    """Status is written by the operator only; defaults there would invent observations."""
    out = {k: v for k, v in node.items() if k != "default"}
    if "properties" in out:
        out["properties"] = {k: _without_defaults(v) for k, v in out["properties"].items()}
    if "items" in out:
        out["items"] = _without_defaults(out["items"])
    return out


def _version_schema(crd: CrdSpec) -> dict[str, Any]:
    spec = to_structural(crd.spec_model.model_json_schema(by_alias=True, mode="validation"), where="spec")
    spec["description"] = f"Desired state of the {crd.kind}."
    status = _without_defaults(
        to_structural(crd.status_model.model_json_schema(by_alias=True, mode="serialization"), where="status")
    )
    return {
        "type": "object",
        "description": _clean_description(crd.spec_model.__doc__ or crd.kind),
        "properties": {
            "apiVersion": {"type": "string"},
            "kind": {"type": "string"},
            "metadata": {"type": "object"},
            "spec": spec,
            "status": status,
        },
        "required": ["spec"],
    }


def generate_crd(crd: CrdSpec) -> dict[str, Any]:
    """The CustomResourceDefinition object of one kind."""
    subresources: dict[str, Any] = {"status": {}}
    if crd.kind == "ServingPool":
        subresources["scale"] = {
            "specReplicasPath": ".spec.replicas",
            "statusReplicasPath": ".status.replicas",
            "labelSelectorPath": ".status.selector",
        }
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": f"{crd.plural}.{API_GROUP}",
            "labels": {"app.kubernetes.io/part-of": "switchyard"},
        },
        "spec": {
            "group": API_GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": crd.kind,
                "listKind": f"{crd.kind}List",
                "plural": crd.plural,
                "singular": crd.singular,
                "shortNames": list(crd.short_names),
                "categories": list(CATEGORIES),
            },
            "versions": [
                {
                    "name": API_VERSION,
                    "served": True,
                    "storage": True,
                    "schema": {"openAPIV3Schema": _version_schema(crd)},
                    "subresources": subresources,
                    "additionalPrinterColumns": PRINTER_COLUMNS[crd.kind],
                }
            ],
        },
    }


def generate_crds() -> dict[str, dict[str, Any]]:
    """Every CRD, keyed by the file name it is written to."""
    return {crd_filename(c): generate_crd(c) for c in CRD_SPECS}


def crd_filename(crd: CrdSpec) -> str:
    """``switchyard.dev_servingpools.yaml``: the kubebuilder naming, sorted by plural."""
    return f"{API_GROUP}_{crd.plural}.yaml"


def render_yaml(obj: Mapping[str, Any]) -> str:
    """Stable YAML text (key order kept, no line wrapping) with the do-not-edit header."""
    text: str = yaml.safe_dump(dict(obj), sort_keys=False, width=1_000_000, allow_unicode=True)
    return _HEADER + text


def write_crds(out_dir: Path = DEFAULT_OUT_DIR) -> list[Path]:
    """Write every CRD into ``out_dir``; returns the paths written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, crd in generate_crds().items():
        path = out_dir / name
        path.write_text(render_yaml(crd))
        paths.append(path)
    return paths


def stale_files(out_dir: Path = DEFAULT_OUT_DIR) -> list[str]:
    """Names of CRD files in ``out_dir`` that are missing or differ from freshly generated ones."""
    return [
        name
        for name, crd in generate_crds().items()
        if not (out_dir / name).is_file() or (out_dir / name).read_text() != render_yaml(crd)
    ]


def main(argv: Sequence[str] | None = None) -> int:
    """``switchyard crds [--out DIR] [--check]``."""
    parser = argparse.ArgumentParser(prog="switchyard crds", description="write the Switchyard CRD manifests")
    add_arguments(parser)
    return run(parser.parse_args(argv))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``crds`` options, shared by ``switchyard crds`` and ``python -m``."""
    parser.add_argument(
        "--out", type=Path, default=DEFAULT_OUT_DIR, help=f"directory (default {DEFAULT_OUT_DIR})"
    )
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 if the files are stale")


def run(args: argparse.Namespace) -> int:
    """Write (or with ``--check`` compare) the CRD files; the exit status."""
    if args.check:
        stale = stale_files(args.out)
        for name in stale:
            print(f"stale: {args.out / name} (run `switchyard crds`)", file=sys.stderr)
        return 1 if stale else 0
    for path in write_crds(args.out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
