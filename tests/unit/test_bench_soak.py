"""The soak benchmark's report (bench/soak.py): counts, reasons, percentiles and growth."""

from __future__ import annotations

import math

from bench.soak import KillEvent, RequestRecord, ResourceSample, percentiles, summarize


def ok(start: float, ttft: float, total: float, tokens: int = 10) -> RequestRecord:
    return RequestRecord(start, "ok", ttft, total, tokens, tokens)


def test_percentiles_are_nearest_rank_and_empty_for_no_values() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentiles(values) == {"p50": 50.0, "p90": 90.0, "p99": 99.0, "p99.9": 100.0, "max": 100.0}
    assert percentiles([3.0], (50,)) == {"p50": 3.0, "max": 3.0}
    assert percentiles([]) == {}


def test_summary_counts_outcomes_groups_reasons_and_times_only_completed_requests() -> None:
    records = [
        ok(0.0, 0.01, 0.5),
        ok(1.0, 0.03, 0.7),
        RequestRecord(2.0, "failed", 0.02, None, 3, 10, "SSE error: instance is unavailable"),
        RequestRecord(3.0, "failed", None, None, 0, 10, "SSE error: instance is unavailable"),
        RequestRecord(4.0, "lost", 0.02, None, 4, 10, "stream ended without [DONE] or an error"),
    ]
    s = summarize(records, [], [], duration_s=10.0)
    assert (s["requests"], s["ok"], s["failed"], s["lost"]) == (5, 2, 2, 1)
    assert s["reasons"] == {
        "failed": {"SSE error: instance is unavailable": 2},
        "lost": {"stream ended without [DONE] or an error": 1},
    }
    assert s["requests_per_s"] == 0.5 and s["tokens_ok"] == 20
    assert s["ttft_s"]["max"] == 0.03 and s["total_s"]["p50"] == 0.5  # failures not timed
    assert s["rss_bytes"] is None and s["peak_rss_bytes"] == 0


def test_growth_compares_the_first_and_last_windows_and_kills_count_restores() -> None:
    samples = [ResourceSample(float(t), 100 + (t >= 80) * 50, 10, 3, 40, 5) for t in range(0, 101)]
    kills = [
        KillEvent(10.0, 1, "ray::InstanceActor", 2, 3.5),
        KillEvent(50.0, 2, "ray::InstanceActor", 2, None),
    ]
    s = summarize([], samples, kills, duration_s=100.0, window_s=20.0)
    assert s["rss_bytes"] == {"first": 100, "last": 150, "ratio": 1.5}
    assert s["fds"]["ratio"] == 1.0 and s["peak_rss_bytes"] == 150
    assert (s["kills"], s["kills_restored"], s["restore_s"]["max"]) == (2, 1, 3.5)


def test_growth_windows_never_overlap_in_a_short_run() -> None:
    """Ten seconds of samples with a 30 s window: each side takes a quarter of the run."""
    samples = [ResourceSample(float(t), 100 if t < 5 else 200, 1, 1, 1, 1) for t in range(11)]
    growth = summarize([], samples, [], duration_s=10.0, window_s=30.0)["rss_bytes"]
    assert growth["first"] == 100 and growth["last"] == 200 and math.isclose(growth["ratio"], 2.0)
