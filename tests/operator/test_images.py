"""The operator image's promise: ``switchyard operator`` needs only Kopf, kubernetes, pydantic,
prometheus-client and PyYAML, never the serving stack.

Why a test: docker/operator.Dockerfile installs the package with --no-deps plus exactly that
list (no Docker engine here to build it), so an import of vLLM, torch, Ray, gRPC or
transformers reaching the operator's code would break the image without any test noticing.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SERVING_STACK = (
    "vllm",
    "torch",
    "ray",
    "grpc",
    "transformers",
    "tokenizers",
    "starlette",
    "uvicorn",
    "msgspec",
)
# Import name -> distribution the Dockerfile installs.
OPERATOR_DEPS = {
    "kopf": "kopf",
    "kubernetes": "kubernetes",
    "pydantic": "pydantic",
    "prometheus_client": "prometheus-client",
    "yaml": "pyyaml",
}


def test_operator_entry_point_imports_no_serving_stack() -> None:
    code = (
        "import sys, json\n"
        "import switchyard.cli, switchyard.operator.handlers\n"
        "import switchyard.operator.run, switchyard.operator.crd.schema\n"
        "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], check=True, capture_output=True, text=True, timeout=120
    )
    loaded = set(json.loads(out.stdout))
    assert not loaded & set(SERVING_STACK), f"the operator imports {sorted(loaded & set(SERVING_STACK))}"
    assert set(OPERATOR_DEPS) <= loaded


def test_operator_dockerfile_installs_those_deps_and_pins_kopf_like_pyproject() -> None:
    dockerfile = (REPO / "docker" / "operator.Dockerfile").read_text()
    assert "--no-deps" in dockerfile
    for dist in OPERATOR_DEPS.values():
        assert f'"{dist}' in dockerfile, f"{dist} is not installed by docker/operator.Dockerfile"
    pyproject = (REPO / "pyproject.toml").read_text()
    kopf_pin = re.search(r'"kopf==([0-9.]+)"', pyproject)
    assert kopf_pin and f'"kopf=={kopf_pin.group(1)}"' in dockerfile
    assert "USER 1000" in dockerfile


def test_engine_dockerfile_pins_vllm_and_ray_like_pyproject_and_crd_default() -> None:
    from switchyard.operator.crd import RaySpec

    dockerfile = (REPO / "docker" / "engine.Dockerfile").read_text()
    pyproject = (REPO / "pyproject.toml").read_text()
    vllm = re.search(r'"vllm==([0-9.]+)"', pyproject)
    ray = re.search(r'"ray\[default\]==([0-9.]+)"', pyproject)
    assert vllm and f"FROM vllm/vllm-openai:v{vllm.group(1)}" in dockerfile
    assert ray and f'"ray[default]=={ray.group(1)}"' in dockerfile
    assert RaySpec().version == ray.group(1), "spec.ray.version must default to the image's Ray"
    assert "USER 1000" in dockerfile
