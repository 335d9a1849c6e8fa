"""The package layout as rules: imports only run downwards, and curated surfaces stay curated.

Layers, lowest first. A module may import its own layer and those below, never one above,
so a reader can follow any import down and never back up:

0. ``messages``, ``errors``, ``config``, ``metrics``, ``event_loop``, ``aio``, ``cache``,
   ``testing`` (no Switchyard imports above them);
1. ``api`` (generated stubs and ``wire``, the protobuf <-> messages conversion);
2. ``workers`` (engines and the Ray runtime) and ``kvcache`` (the cache server);
3. ``router`` (core, policies, migration coordination, gateway);
4. ``operator``, ``serve`` and ``cli`` (compositions of the layers below).
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "switchyard"

LAYER = {
    "messages": 0,
    "errors": 0,
    "config": 0,
    "metrics": 0,
    "event_loop": 0,
    "aio": 0,
    "testing": 0,
    "cache": 0,
    "api": 1,
    "workers": 2,
    "kvcache": 2,
    "router": 3,
    "operator": 4,
    "serve": 4,
    "cli": 4,
}


def _top(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if parts[0] == "switchyard" and len(parts) > 1 else None


def _imports(path: Path) -> list[tuple[int, str]]:
    """Every ``switchyard.*`` module ``path`` imports (also inside functions), with line numbers."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{a.name}" for a in node.names] if node.module == "switchyard" else []
            found += [(node.lineno, n) for n in names or [node.module]]
        elif isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
    return [(line, m) for line, m in found if m.startswith("switchyard.")]


def _modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "api/v1" not in p.as_posix())


def test_every_top_level_module_has_a_layer() -> None:
    tops = {p.relative_to(PACKAGE).parts[0].removesuffix(".py") for p in _modules()} - {"__init__"}
    assert tops <= set(LAYER), f"give these a layer in test_layout.LAYER: {sorted(tops - set(LAYER))}"


def test_no_import_runs_up_a_layer() -> None:
    upward = []
    for path in _modules():
        rel = path.relative_to(PACKAGE)
        here = rel.parts[0].removesuffix(".py")
        if here == "__init__":
            continue
        for line, module in _imports(path):
            there = _top(module)
            if there is not None and LAYER[there] > LAYER[here]:
                upward.append(f"switchyard/{rel.as_posix()}:{line} imports {module}")
    assert not upward, "imports that run up a layer:\n" + "\n".join(upward)


def test_workers_and_router_do_not_import_each_other_backwards() -> None:
    """The two halves the issue tracker cares about most: workers never reach into the router."""
    back = [
        f"{p.relative_to(PACKAGE)}:{line} {m}"
        for p in (PACKAGE / "workers").rglob("*.py")
        for line, m in _imports(p)
        if _top(m) == "router"
    ]
    assert not back


@pytest.mark.parametrize("package", ["switchyard.workers", "switchyard.operator.crd"])
def test_curated_surface_resolves_to_the_package_itself(package: str) -> None:
    """Every exported name resolves, to something defined inside the package (ruff keeps the
    list sorted, RUF022)."""
    mod = importlib.import_module(package)
    names = list(mod.__all__)
    assert len(set(names)) == len(names)
    for name in names:
        value = getattr(mod, name)
        home = getattr(value, "__module__", None)
        if home is not None and isinstance(value, type):
            assert home.startswith(package + "."), f"{package}.{name} comes from {home}"


def test_workers_surface_names_the_ray_runtime_without_importing_ray_eagerly() -> None:
    import subprocess
    import sys

    code = (
        "import sys, switchyard.workers, switchyard.workers.sim.cost; "
        "print('ray' in sys.modules, sorted(switchyard.workers.__all__))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    eager, names = out.split(" ", 1)
    assert eager == "False", "importing switchyard.workers (or the simulator) imported Ray"
    for expected in ("InstanceActor", "Supervisor", "start_local_pools", "start_worker_server", "Engine"):
        assert expected in names
