"""Did two routing-benchmark runs route every request alike? Compares their decision digests.

A refactoring of the router (or of the benchmark's driver) must not change a single decision;
``bench.routing`` records a SHA-256 over every (request, instance, outcome) of each run
(``decisions_sha256``), so two ``results.json`` files of the same command, made before and
after the change, answer that exactly:

    python -m bench.compare_decisions bench/results/layout-check/before.json \\
        bench/results/layout-check/after.json

Prints one line per (policy, scale) and exits 1 when any run differs or is missing.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["compare", "main"]


def _digests(doc: dict[str, Any]) -> dict[tuple[str, float], str]:
    return {
        (policy, run["scale"]): run.get("decisions_sha256", "")
        for policy, entry in doc["policies"].items()
        for run in entry["runs"]
    }


def compare(before: dict[str, Any], after: dict[str, Any]) -> list[tuple[str, float, str, str]]:
    """``(policy, scale, before digest, after digest)`` for every run of either document."""
    a, b = _digests(before), _digests(after)
    return [
        (p, s, a.get((p, s), "missing"), b.get((p, s), "missing")) for p, s in sorted(a.keys() | b.keys())
    ]


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench.compare_decisions", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("before", type=Path)
    p.add_argument("after", type=Path)
    args = p.parse_args(argv)
    rows = compare(*(json.loads(path.read_text(encoding="utf-8")) for path in (args.before, args.after)))
    differ = 0
    for policy, scale, x, y in rows:
        same = x == y and x not in ("", "missing")
        differ += not same
        print(f"{policy:>16} x{scale:<5g} {'same' if same else 'DIFFERENT'}  {x[:16]}  {y[:16]}")
    print(f"{len(rows) - differ} of {len(rows)} runs routed every request alike", file=sys.stderr)
    return 1 if differ else 0


if __name__ == "__main__":
    raise SystemExit(main())
