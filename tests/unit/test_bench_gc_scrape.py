"""The overhead benchmark reads the gateway's GC pauses from its real /metrics text."""

from __future__ import annotations

import gc

from prometheus_client import generate_latest

from bench.overhead_e2e import _GC_SERIES, gc_delta
from switchyard import metrics


def _scrape() -> dict[str, float]:
    text = generate_latest(metrics.REGISTRY).decode()
    return {f"{name}{labels}": float(value) for name, labels, value in _GC_SERIES.findall(text)}


def test_gc_delta_counts_the_pauses_between_two_scrapes() -> None:
    metrics.watch_gc_pauses()
    try:
        before = _scrape()
        assert any(k.startswith("switchyard_gc_pause_seconds_count") for k in before)
        gc.collect(0)
        gc.collect(2)
        delta = gc_delta(before, _scrape())
    finally:
        metrics.unwatch_gc_pauses()
    assert delta["pauses"] >= 2  # the two above (a collection may also trigger on its own)
    assert delta["total_ms"] > 0
    assert 0 <= delta["over_5ms"] <= delta["pauses"]
