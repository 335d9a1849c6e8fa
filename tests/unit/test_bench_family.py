"""``bench.family``'s summary: capacities against the best baseline and the oracle."""

from __future__ import annotations

import json
from pathlib import Path

from bench import family


def _doc(caps: dict[str, float | None]) -> dict[str, object]:
    runs = [
        {"scale": s, "prefix_hit_rate": 0.5, "decision_outcomes": {"affinity": 9, "slo_switch": 1}}
        for s in (1, 2)
    ]
    return {
        "cdf_scale": 2,
        "policies": {p: {"capacity_scale_interp": c, "runs": runs} for p, c in caps.items()},
    }


def test_rows_compare_dualmap_with_the_best_baseline_and_the_oracle(tmp_path: Path) -> None:
    caps = {"dualmap": 3.0, "oracle": 3.2, "prefix_tree": 2.0, "least_load": 2.4, "round_robin": None}
    (tmp_path / "mooncake-8").mkdir()
    (tmp_path / "mooncake-8" / "results.json").write_text(json.dumps(_doc(caps)))
    (tmp_path / "azure-code-32").mkdir()
    (tmp_path / "azure-code-32" / "results.json").write_text(
        json.dumps(_doc({"dualmap": 0.8, "least_load": 2.0}))
    )
    doc = family.summarize(tmp_path)
    rows = {(r["workload"], r["instances"]): r for r in doc["rows"]}
    moon = rows[("mooncake", 8)]
    assert moon["best_baseline"] == "least_load" and moon["dualmap_over_best_baseline"] == 3.0 / 2.4
    assert moon["dualmap_over_oracle"] == 3.0 / 3.2 and moon["within_one_rate_step_of_best"]
    assert moon["dualmap_outcomes_at_cdf_scale"] == {"affinity": 9, "slo_switch": 1}
    azure = rows[("azure-code", 32)]
    assert not azure["within_one_rate_step_of_best"]  # 0.8 is more than one step (1) below 2.0
    assert (tmp_path / "summary.md").read_text().count("| mooncake | 8 |") == 1
    assert (tmp_path / "capacity_vs_oracle.png").exists()


def test_router_table_reads_each_replica_count_at_the_reference_scale(tmp_path: Path) -> None:
    """One router from ``<w>-8/``, R routers from ``<w>-8-routers<R>/``; hit rate and agreement
    at the workload's reference scale, missing values shown as such."""
    at = family._ROUTER_REFERENCE_SCALE["mooncake"]

    def doc(hit: float, agree: float | None) -> dict[str, object]:
        run = {"scale": at, "prefix_hit_rate": hit, "slo_attainment": 0.9, "replica_agreement": {}}
        if agree is not None:
            run["replica_agreement"] = {"instance": agree, "candidates": 1.0}
        return {"policies": {"dualmap": {"capacity_scale_interp": 3.0, "runs": [run]}}}

    for name, d in (("mooncake-8", doc(0.30, None)), ("mooncake-8-routers4", doc(0.25, 0.5))):
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text(json.dumps(d))
    rows = {r["routers"]: r for r in family.summarize_routers(tmp_path)["rows"]}
    assert set(rows) == {1, 4}
    assert rows[1]["prefix_hit_rate"] == 0.30 and rows[1]["agree_instance"] is None
    assert rows[4]["prefix_hit_rate"] == 0.25 and rows[4]["agree_candidates"] == 1.0
    table = (tmp_path / "routers.md").read_text()
    assert "| mooncake (x3) | 4 | dualmap | 3.00 | 25.0 % | 90.0 % | 50 % | 100 % |" in table
    assert "| mooncake (x3) | 1 | dualmap | 3.00 | 30.0 % | 90.0 % | — | — |" in table
