"""``watch_gc_pauses``: every garbage collection is timed into ``switchyard_gc_pause_seconds``."""

from __future__ import annotations

import gc

from switchyard import metrics


def _count(generation: int) -> float:
    value = metrics.REGISTRY.get_sample_value(
        "switchyard_gc_pause_seconds_count", {"generation": str(generation)}
    )
    return value or 0.0


def test_each_collection_is_timed_by_generation_and_installing_twice_adds_nothing() -> None:
    metrics.watch_gc_pauses()
    metrics.watch_gc_pauses()
    enabled = gc.isenabled()
    gc.disable()  # only the collections below: threads left by earlier tests allocate too
    try:
        assert sum(cb is metrics._gc_watch[0] for cb in gc.callbacks) == 1
        full, young = _count(2), _count(0)
        gc.collect(2)
        gc.collect(0)
        assert _count(2) == full + 1 and _count(0) == young + 1
        total = metrics.REGISTRY.get_sample_value("switchyard_gc_pause_seconds_sum", {"generation": "2"})
        assert total is not None and total > 0
    finally:
        metrics.unwatch_gc_pauses()
        if enabled:
            gc.enable()
    before = _count(2)
    gc.collect(2)
    assert _count(2) == before and not metrics._gc_watch  # unhooked: no longer timed
