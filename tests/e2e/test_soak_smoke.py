"""A short run of the soak benchmark (bench/soak.py) against a real `switchyard serve --engine sim`.

Sized for CI: 20 streams for 20 s with one instance killed, so it checks the wiring (serve
spawned, instance processes found and killed, the fleet restored, a report written) and the
soak's one hard rule, no lost request, not the long-run memory trend (that is the benchmark's).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from bench import soak

pytestmark = pytest.mark.ray


def test_a_short_soak_with_one_kill_loses_no_request(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SWITCHYARD_CACHE_DIR", str(tiny_model_dir.parent.parent))  # reuse the tokenizer
    out = tmp_path / "soak"
    code = soak.main(
        ["--streams", "20", "--minutes", str(20 / 60), "--kill-every-s", "8", "--instances", "2",
         "--max-tokens", "8,48", "--out", str(out)]
    )  # fmt: skip
    doc = json.loads((out / "results.json").read_text())
    s = doc["summary"]
    assert code == 0 and s["lost"] == 0, s["reasons"]
    assert s["kills"] >= 1 and s["kills_restored"] == s["kills"], doc["kills"]
    assert s["ok"] > 20 and s["ok"] + s["failed"] == s["requests"]
    assert s["serve_exit"]["status"] == 0
    assert (out / "soak.png").stat().st_size > 0
    assert os.path.getsize(out / "serve.log") > 0
