"""Metric definitions of the routing benchmark (bench/metrics.py) and one tiny replay."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from bench.metrics import Capacity, capacity, idle_ttft_s, imbalance, percentile, slo_attainment
from bench.replay import ReplayConfig, replay
from bench.traces import Trace, TraceRequest
from switchyard.router.policies import POLICIES
from switchyard.workers.sim.cost import StepCostModel, load_profile


def test_attainment_counts_missing_first_tokens_as_misses() -> None:
    """TTFT <= SLO passes (inclusive); NaN never does."""
    ttft = np.array([0.5, 2.0, 2.1, np.nan])
    assert slo_attainment(ttft, 2.0) == 0.5
    assert slo_attainment(np.array([]), 2.0) == 0.0


def test_percentile_ignores_nan() -> None:
    """TPOT is NaN for one-token outputs; percentiles skip them, and all-NaN gives None."""
    assert percentile(np.array([1.0, np.nan, 3.0]), 50) == 2.0
    assert percentile(np.array([np.nan]), 99) is None


def test_imbalance_is_max_over_mean() -> None:
    """1.0 when even or idle; max/mean otherwise."""
    assert imbalance({"a": 1.0, "b": 3.0}) == 1.5
    assert imbalance({"a": 0.0, "b": 0.0}) == 1.0


@pytest.mark.parametrize(
    ("points", "expected"),
    [
        pytest.param([(1, 0.99), (2, 0.95), (3, 0.5)], Capacity(2, 2 + 0.05 / 0.45, False), id="crossing"),
        pytest.param([(3, 0.95), (1, 0.99)], Capacity(3, 3, True), id="all-pass-unsorted"),
        pytest.param([(1, 0.5), (2, 0.95)], Capacity(None, None, False), id="lowest-fails"),
        pytest.param([(1, 0.95), (2, 0.8), (3, 0.92)], Capacity(1, 1 + 0.05 / 0.15, False), id="no-lucky"),
    ],
)
def test_capacity_is_highest_contiguous_passing_scale(
    points: list[tuple[float, float]], expected: Capacity
) -> None:
    """A pass above a failing scale does not count; the crossing is interpolated linearly."""
    got = capacity(points, 0.9)
    assert got.scale == expected.scale and got.saturated == expected.saturated
    if expected.scale_interp is None:
        assert got.scale_interp is None
    else:
        assert got.scale_interp is not None and math.isclose(got.scale_interp, expected.scale_interp)


def test_idle_ttft_matches_the_profile_prefill_fit() -> None:
    """Alone on an idle instance, the step model's chunked prefill agrees with the closed-form fit."""
    profile = load_profile("llama3.1-8b-h100")
    cost = StepCostModel.from_profile(profile)
    fit = profile.fits.prefill_ms
    for n in (2048, 32768):
        expected_ms = fit.a_n2 * n * n + fit.b_n * n + fit.c
        got_ms = 1000 * idle_ttft_s(cost, n, 0, profile.engine.max_num_batched_tokens)
        assert got_ms == pytest.approx(expected_ms, rel=0.06), f"{n=} {got_ms=} {expected_ms=}"
    cached = idle_ttft_s(cost, 32768, 16384, 8192)
    assert cached < idle_ttft_s(cost, 32768, 0, 8192)


def _tiny_trace() -> Trace:
    reqs = tuple(
        TraceRequest(i, 0.05 * i, 700 + 100 * (i % 3), 3 + i % 4, (i % 2, 100 + i)) for i in range(12)
    )
    return Trace("tiny", "mooncake", reqs)


@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_tiny_replay_finishes_every_request_deterministically(policy: str) -> None:
    """Every request gets a first token; two identical runs give identical numbers."""
    cfg = ReplayConfig(num_instances=2, scale=2.0)
    a, b = replay(_tiny_trace(), policy, cfg), replay(_tiny_trace(), policy, cfg)
    assert not np.isnan(a.ttft_s).any() and (a.ttft_s > 0).all()
    assert np.array_equal(a.ttft_s, b.ttft_s) and a.busy_s == b.busy_s
    assert sum(a.requests_per_instance.values()) == 12
    assert a.prompt_tokens == sum(700 + 100 * (i % 3) for i in range(12))
    assert 0 <= a.cached_tokens < a.prompt_tokens


def test_compare_decisions_flags_a_changed_or_missing_run(tmp_path: Path) -> None:
    from bench import compare_decisions

    def doc(digests: dict[float, str]) -> dict[str, Any]:
        runs = [{"scale": s, "decisions_sha256": d} for s, d in digests.items()]
        return {"policies": {"dualmap": {"runs": runs}}}

    same = compare_decisions.compare(doc({1.0: "aa", 2.0: "bb"}), doc({1.0: "aa", 2.0: "bb"}))
    assert [(s, x == y) for _, s, x, y in same] == [(1.0, True), (2.0, True)]
    (tmp_path / "a.json").write_text(json.dumps(doc({1.0: "aa", 2.0: "bb"})))
    (tmp_path / "b.json").write_text(json.dumps(doc({1.0: "aa", 2.0: "cc"})))
    (tmp_path / "c.json").write_text(json.dumps(doc({1.0: "aa"})))
    assert compare_decisions.main([str(tmp_path / "a.json"), str(tmp_path / "a.json")]) == 0
    assert compare_decisions.main([str(tmp_path / "a.json"), str(tmp_path / "b.json")]) == 1
    assert compare_decisions.main([str(tmp_path / "a.json"), str(tmp_path / "c.json")]) == 1


def test_several_routers_share_the_traffic_and_report_their_agreement() -> None:
    reqs = tuple(TraceRequest(i, 0.02 * i, 900, 4, (i % 4, 500 + i)) for i in range(120))
    trace = Trace("in-test", "mooncake", reqs)
    one = replay(trace, "dualmap", ReplayConfig(num_instances=4, scale=1.0))
    three = replay(trace, "dualmap", ReplayConfig(num_instances=4, scale=1.0, routers=3, agreement_every=5))
    assert one.routers == 1 and one.agreement == {}
    assert three.routers == 3 and set(three.agreement) == {"instance", "candidates"}
    assert all(0.0 <= v <= 1.0 for v in three.agreement.values())
    assert sum(three.requests_per_instance.values()) == 120


def test_the_oracle_replays_like_any_policy() -> None:
    reqs = tuple(TraceRequest(i, 0.05 * i, 900, 4, (i % 3, 500 + i)) for i in range(60))
    result = replay(Trace("in-test", "mooncake", reqs), "oracle", ReplayConfig(num_instances=3, scale=1.0))
    assert sum(result.requests_per_instance.values()) == 60 and result.cached_tokens > 0
