"""Which code produced a benchmark's numbers, precisely enough to tell when they are stale.

Policies are developed while benchmarks run, so a results file must say what it measured. A
hash of the policy's own module is not enough: DualMap's decisions also depend on the prefix
hasher, the rings and the TTFT estimator. ``policy_digest`` therefore hashes the policy
module together with every ``switchyard.router`` module it imports, transitively (read from
the source with ``ast``, so nothing is executed). The package ``switchyard.router.policies``
itself is left out: it is the registry that imports every policy, and including it would make
each policy's digest change with any other policy. The simulator gets one digest of its own.
``--merge`` in ``bench.routing`` keeps earlier runs of a policy only while its digest holds.
"""

from __future__ import annotations

import ast
import datetime as dt
import hashlib
import importlib.util
import os
import platform
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from switchyard.router.policies import POLICIES

__all__ = ["policy_digest", "provenance", "run_header", "sim_digest"]

_TRACKED = "switchyard.router"
_REGISTRY = "switchyard.router.policies"
_SIM_MODULES = (
    "switchyard.workers.sim.cost",
    "switchyard.workers.sim.engine",
    "switchyard.workers.sim.fleet",
    "switchyard.workers.sim.instance",
    "switchyard.workers.sim.kv_pool",
    "switchyard.workers.sim.migration",
    "switchyard.workers.sim.request",
)


def _path(module: str) -> Path | None:
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):  # ``pkg.mod.Name``: a name, not a module
        return None
    return Path(spec.origin) if spec is not None and spec.origin else None


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)  # ``from pkg import mod``
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
    return names


def _closure(module: str) -> dict[str, Path]:
    """``module`` and the ``switchyard.router`` modules it imports, transitively."""
    seen: dict[str, Path] = {}
    todo = [module]
    while todo:
        name = todo.pop()
        if name in seen or name == _REGISTRY or not name.startswith(_TRACKED):
            continue
        path = _path(name)
        if path is None or path.suffix != ".py":
            continue
        seen[name] = path
        todo.extend(_imports(path))
    return seen


def _digest(paths: dict[str, Path]) -> str:
    h = hashlib.sha256()
    for name in sorted(paths):
        h.update(name.encode() + b"\0" + paths[name].read_bytes() + b"\0")
    return h.hexdigest()[:16]


def policy_digest(name: str) -> dict[str, Any]:
    """The digest of a registered policy's code and the router modules it depends on (the
    benchmark's ``oracle``: its own module, ``bench.oracle``, with the router modules it uses)."""
    if name == "oracle":
        module = "bench.oracle"
        closure = {
            module: Path(__file__).with_name("oracle.py"),
            **_closure("switchyard.router.policies.base"),
        }
        return {"module": module, "closure_sha256_16": _digest(closure), "closure": sorted(closure)}
    module = POLICIES[name].__module__
    closure = _closure(module)
    return {"module": module, "closure_sha256_16": _digest(closure), "closure": sorted(closure)}


def sim_digest() -> str:
    """The digest of the simulator's modules (the engine model every run shares)."""
    paths = {m: p for m in _SIM_MODULES if (p := _path(m)) is not None}
    return _digest(paths)


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return out.stdout.strip()


def provenance(policies: Sequence[str]) -> dict[str, Any]:
    """Commit, uncommitted router/worker files, the simulator digest and each policy's digest."""
    dirty = _git("status", "--porcelain", "--", "switchyard/router", "switchyard/workers")
    return {
        "git_commit": _git("rev-parse", "HEAD"),
        "uncommitted_switchyard_files": dirty.splitlines() if dirty else [],
        "sim_sha256_16": sim_digest(),
        "policy_sources": {name: policy_digest(name) for name in policies},
    }


def _cpu_model() -> str | None:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), None)
    except OSError:
        return None


def run_header(
    module: str, argv: Sequence[str] | None, started: dt.datetime, load_before: tuple[float, float, float]
) -> dict[str, Any]:
    """What every results file starts with: the command, when, how long, and on what machine.

    The load average before and after is recorded because these benchmarks run on a shared
    2-core box: a reader can tell a quiet run from a contended one.
    """
    return {
        "command": f"python -m {module} " + " ".join(sys.argv[1:] if argv is None else argv),
        "date_utc": started.isoformat(timespec="seconds"),
        "duration_s": (dt.datetime.now(dt.UTC) - started).total_seconds(),
        # A copy without .git (the device machine gets the working tree only) names its commit.
        "git_commit": _git("rev-parse", "HEAD") or os.environ.get("BENCH_GIT_COMMIT"),
        "machine": {
            "cpu_model": _cpu_model(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "cpu_count": os.cpu_count(),
            "loadavg_before": load_before,
            "loadavg_after": os.getloadavg(),
        },
    }
