"""What a Kubernetes API server does with a CRD's schema when an object arrives, without the server.

No cluster runs here and kmock's emulator validates nothing, so the CRD tests replay the
server's admission steps against the generated ``openAPIV3Schema``:

1. defaulting: ``default`` values are filled in where a field is absent (nested ones too, once
   their parent object exists);
2. schema validation: the OpenAPI schema translated to JSON Schema (``jsonschema``). Unknown
   fields are rejected, as with ``kubectl``'s default strict field validation, except under
   ``x-kubernetes-preserve-unknown-fields``;
3. ``x-kubernetes-validations``: each CEL rule evaluated with ``celpy`` (cel-python) on the node
   it is attached to, as the server does with ``self`` bound to that node.

Also here: ``structural_problems``, a checker for the structural-schema rules the generator
relies on (the server refuses a CRD that breaks them).
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any

import celpy
import jsonschema  # type: ignore[import-untyped]
from celpy.adapter import json_to_cel

__all__ = ["admission_errors", "apply_defaults", "cel_rules", "structural_problems", "to_json_schema"]

# $ref is never structural; the rest the server allows only in narrow forms the generator never needs.
_NOT_STRUCTURAL = ("$ref", "anyOf", "oneOf", "allOf", "not", "$defs", "definitions", "nullable")


def to_json_schema(node: dict[str, Any]) -> dict[str, Any]:
    """An OpenAPI v3 (Kubernetes dialect) node as JSON Schema 2020-12."""
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key.startswith("x-kubernetes-"):
            continue
        if key == "properties":
            out[key] = {name: to_json_schema(sub) for name, sub in value.items()}
        elif key in ("items", "additionalProperties") and isinstance(value, dict):
            out[key] = to_json_schema(value)
        elif key in ("exclusiveMinimum", "exclusiveMaximum"):
            if value:  # draft-4 boolean form -> 2020-12 numeric form
                bound = "minimum" if key == "exclusiveMinimum" else "maximum"
                out[key] = node[bound]
        else:
            out[key] = copy.deepcopy(value)
    if node.get("exclusiveMinimum"):
        out.pop("minimum", None)
    if node.get("exclusiveMaximum"):
        out.pop("maximum", None)
    if "properties" in node and not node.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False  # strict field validation rejects unknown fields
    return out


def apply_defaults(node: dict[str, Any], value: Any) -> Any:
    """``value`` with the schema's defaults filled in, as the API server stores it."""
    if isinstance(value, dict) and "properties" in node:
        value = dict(value)
        for name, sub in node["properties"].items():
            if name not in value and "default" in sub:
                value[name] = copy.deepcopy(sub["default"])
            if name in value:
                value[name] = apply_defaults(sub, value[name])
    elif isinstance(value, list) and "items" in node:
        value = [apply_defaults(node["items"], v) for v in value]
    return value


def cel_rules(node: dict[str, Any], path: str = "") -> Iterator[tuple[str, dict[str, Any], dict[str, str]]]:
    """Every (path, schema node, rule) of ``x-kubernetes-validations`` under ``node``."""
    for rule in node.get("x-kubernetes-validations", []):
        yield path, node, rule
    for name, sub in node.get("properties", {}).items():
        yield from cel_rules(sub, f"{path}.{name}")
    if isinstance(node.get("items"), dict):
        yield from cel_rules(node["items"], f"{path}[]")


def _cel_errors(node: dict[str, Any], value: Any, path: str) -> list[str]:
    errors: list[str] = []
    env = celpy.Environment()
    for rule in node.get("x-kubernetes-validations", []):
        result = env.program(env.compile(rule["rule"])).evaluate({"self": json_to_cel(value)})
        if not (isinstance(result, celpy.celtypes.BoolType) and bool(result)):
            errors.append(f"{path or '<root>'}: {rule['message']}")
    if isinstance(value, dict):
        for name, sub in node.get("properties", {}).items():
            if name in value:
                errors += _cel_errors(sub, value[name], f"{path}.{name}")
    elif isinstance(value, list) and isinstance(node.get("items"), dict):
        for i, item in enumerate(value):
            errors += _cel_errors(node["items"], item, f"{path}[{i}]")
    return errors


def admission_errors(openapi_schema: dict[str, Any], obj: dict[str, Any]) -> list[str]:
    """Why the API server would reject ``obj`` (empty: it would store it)."""
    defaulted = apply_defaults(openapi_schema, obj)
    validator = jsonschema.Draft202012Validator(to_json_schema(openapi_schema))
    errors = [
        f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
        for e in validator.iter_errors(defaulted)
    ]
    if errors:  # the server runs CEL only on schema-valid objects
        return errors
    return _cel_errors(openapi_schema, defaulted, "")


def structural_problems(node: dict[str, Any], path: str = "") -> list[str]:
    """Breaches of the structural-schema rules (and of the generator's own conventions) under ``node``."""
    where = path or "<root>"
    problems = [f"{where}: has {key}" for key in _NOT_STRUCTURAL if key in node]
    free_form = node.get("x-kubernetes-preserve-unknown-fields") is True
    if "type" not in node and not free_form:
        problems.append(f"{where}: no type")
    if "properties" in node and "additionalProperties" in node:
        problems.append(f"{where}: properties and additionalProperties together")
    if "additionalProperties" in node and not isinstance(node["additionalProperties"], dict):
        problems.append(f"{where}: additionalProperties must be a schema")
    for key in ("exclusiveMinimum", "exclusiveMaximum"):
        if key in node and not isinstance(node[key], bool):
            problems.append(f"{where}: {key} must be a boolean (OpenAPI v3.0)")
    shapeless = "properties" not in node and "additionalProperties" not in node and not free_form
    if node.get("type") == "object" and shapeless and path != ".metadata":  # the server knows ObjectMeta
        problems.append(f"{where}: object without properties, additionalProperties or preserve-unknown")
    for name in node.get("required", []):
        if name not in node.get("properties", {}):
            problems.append(f"{where}: required {name!r} is not a property")
    if "default" in node:
        try:
            jsonschema.validate(node["default"], to_json_schema(node))
        except jsonschema.ValidationError as exc:
            problems.append(f"{where}: default {node['default']!r} is invalid: {exc.message}")
    for name, sub in node.get("properties", {}).items():
        problems += structural_problems(sub, f"{path}.{name}")
    for key in ("items", "additionalProperties"):
        if isinstance(node.get(key), dict):
            problems += structural_problems(node[key], f"{path}[]")
    return problems
