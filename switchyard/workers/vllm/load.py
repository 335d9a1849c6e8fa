"""``SchedulerLoad``: the engine's load as vLLM's scheduler sees it, recorded every step.

Why a stat logger: vLLM hands per-step ``SchedulerStats`` only to ``StatLoggerBase`` objects
passed to ``AsyncLLM``; polling the engine core for them would cost a round trip per report.
``SchedulerStats`` is not a stable vLLM interface, hence the version pin in ``pyproject.toml``.
Load is its own concept: the engine adapter (``engine.py``) stays about requests.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from vllm.v1.metrics.loggers import StatLoggerBase

from switchyard.messages import LoadReport

__all__ = ["SchedulerLoad"]

logger = logging.getLogger(__name__)

_STEP_TIME_ALPHA = 0.2  # EWMA weight of the newest step: roughly the last 5-10 steps count


class SchedulerLoad(StatLoggerBase):  # type: ignore[misc]
    """Keeps the latest scheduler view and cumulative counters; vLLM calls ``record`` each step.

    Runs on the event loop (vLLM's output handler task), so it needs no locking.
    """

    def __init__(self) -> None:
        self.num_running = 0
        self.num_waiting = 0
        self.kv_usage = 0.0
        self.kv_blocks_total = 0
        self.step_time_s = 0.0
        self.prefix_queries_total = 0
        self.prefix_hits_total = 0
        self.preemptions_total = 0
        self._last_record: float | None = None
        self._busy = False  # whether the engine had work at the previous record

    def bind(self, vllm_config: Any, engine_index: int = 0) -> SchedulerLoad:
        """vLLM's logger factory: called once the engine core is up and its KV size known."""
        # The pool holds one reserved null block; vLLM's usage fraction excludes it too.
        self.kv_blocks_total = max(int(vllm_config.cache_config.num_gpu_blocks or 0) - 1, 0)
        return self

    def record(
        self,
        scheduler_stats: Any,
        iteration_stats: Any,
        mm_cache_stats: Any = None,
        engine_idx: int = 0,
    ) -> None:
        now = time.monotonic()
        if iteration_stats is not None:
            self.preemptions_total += iteration_stats.num_preempted_reqs
        if scheduler_stats is None:
            return
        # The gap since the previous record is one step only if the engine was busy in it.
        if self._busy and self._last_record is not None:
            dt = now - self._last_record
            prev = self.step_time_s or dt
            self.step_time_s = prev + _STEP_TIME_ALPHA * (dt - prev)
        self._last_record = now
        self.num_running = scheduler_stats.num_running_reqs
        self.num_waiting = scheduler_stats.num_waiting_reqs + scheduler_stats.num_skipped_waiting_reqs
        self._busy = self.num_running + self.num_waiting > 0
        self.kv_usage = scheduler_stats.kv_cache_usage
        self.prefix_queries_total += scheduler_stats.prefix_cache_stats.queries
        self.prefix_hits_total += scheduler_stats.prefix_cache_stats.hits

    def report(self, instance_id: str, *, waiting_prefill_tokens: int) -> LoadReport:
        """The latest stats as a ``LoadReport``; the adapter supplies what only it knows."""
        return LoadReport(
            instance_id=instance_id,
            timestamp=time.monotonic(),
            num_running=self.num_running,
            num_waiting=self.num_waiting,
            waiting_prefill_tokens=waiting_prefill_tokens,
            kv_blocks_used=round(self.kv_usage * self.kv_blocks_total),
            kv_blocks_total=self.kv_blocks_total,
            step_time_s=self.step_time_s,
            prefix_cache_queries_total=self.prefix_queries_total,
            prefix_cache_hits_total=self.prefix_hits_total,
            num_preemptions_total=self.preemptions_total,
        )

    def log_engine_initialized(self) -> None:
        logger.debug("vLLM engine ready with %d KV blocks", self.kv_blocks_total)
