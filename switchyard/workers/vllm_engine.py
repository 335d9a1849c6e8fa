"""``VLLMEngine``: the real engine, vLLM V1 ``AsyncLLM`` in this process, its core in a child.

Why an adapter rather than handing ``AsyncLLM`` around: the rest of Switchyard speaks token
IDs, ``EngineOutput`` deltas, ``LoadReport``s and its own error tree, and must not know
vLLM's request-output objects, its exceptions or its metrics plumbing. This module is the
one place that does, and it is written against vLLM 0.32.0 (``pyproject.toml`` pins it):

* Requests go in as vLLM's rendered token input (``{"type": "token", "prompt_token_ids":
  [...]}``), so vLLM never tokenizes, and come back with ``detokenize=False`` as
  ``RequestOutputKind.DELTA`` streams; the gateway detokenizes.
* Buffering is bounded by construction: each request's outputs wait in vLLM's own
  ``RequestOutputCollector``, a single slot that merges deltas while the consumer lags, and
  this adapter yields each one straight through without a queue of its own.
* Load comes from vLLM's scheduler, not from guesses: a ``StatLoggerBase`` passed to
  ``AsyncLLM`` receives ``SchedulerStats`` after every engine step (``SchedulerStats`` is not
  a stable vLLM interface, hence the pin).
* vLLM appends a random suffix to request IDs internally, but ``AsyncLLM.abort`` accepts
  the external ID and maps it (0.32.0), so we abort by our own ID and keep only a set of
  in-flight IDs to answer whether an abort hit anything.
* Errors cross into our tree in one table, :func:`translate_vllm_error`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vllm import AsyncEngineArgs, SamplingParams
from vllm.exceptions import GracefulHTTPError, VLLMClientError
from vllm.inputs.engine import tokens_input
from vllm.platforms import current_platform
from vllm.sampling_params import RequestOutputKind
from vllm.v1.engine.async_llm import AsyncLLM
from vllm.v1.engine.exceptions import EngineDeadError as VLLMEngineDeadError
from vllm.v1.engine.exceptions import EngineGenerateError
from vllm.v1.metrics.loggers import StatLoggerBase

from switchyard.config import EngineConfig
from switchyard.errors import (
    CapacityError,
    ConfigError,
    ContextLengthError,
    EngineDeadError,
    EngineRequestError,
    InvalidRequestError,
    SwitchyardError,
)
from switchyard.messages import EngineOutput, EngineRequest, FinishReason, LoadReport, SamplingOptions
from switchyard.workers.tiny_model import TINY_MODEL_NAME, default_cache_dir
from switchyard.workers.vllm_env import apply_vllm_env, vllm_env

__all__ = ["VLLMEngine", "translate_vllm_error"]

logger = logging.getLogger(__name__)

_GIB = 1 << 30
_STEP_TIME_ALPHA = 0.2  # EWMA weight of the newest step: roughly the last 5-10 steps count
_FINISH_REASONS = {
    "stop": FinishReason.STOP,
    "length": FinishReason.LENGTH,
    "abort": FinishReason.ABORT,
    "repetition": FinishReason.STOP,  # vLLM's hallucination guard stopped it: a normal stop
}
# Engine arguments this adapter sets from typed config; ``extra_args`` may not repeat them.
_TYPED_ARGS = frozenset(
    {"model", "served_model_name", "dtype", "block_size", "max_model_len", "max_num_seqs", "seed"}
    | {"enable_prefix_caching", "prefix_caching_hash_algo", "enforce_eager", "kv_cache_memory_bytes"}
    | {"disable_log_stats", "enable_log_requests"}
)


def translate_vllm_error(
    exc: BaseException, *, prompt_len: int, max_model_len: int, admitted: bool
) -> SwitchyardError:
    """The one table from vLLM's exceptions to Switchyard's (vLLM 0.32.0 classes).

    ``admitted`` is False until the request produced its first output: before that a plain
    ``ValueError``/``TypeError`` is vLLM rejecting the input (``AsyncLLM.generate`` wraps
    those in ``EngineGenerateError``); afterwards it is an engine fault.
    """
    if isinstance(exc, SwitchyardError):
        return exc
    if isinstance(exc, VLLMEngineDeadError):
        return EngineDeadError(f"the vLLM engine core died: {exc}")
    if isinstance(exc, GracefulHTTPError):  # admission limits (queue length, queued tokens)
        return CapacityError(f"the engine refused the request for now: {exc}")
    cause = exc.__cause__ if isinstance(exc, EngineGenerateError) and exc.__cause__ else exc
    rejected = isinstance(cause, VLLMClientError) or (
        not admitted and isinstance(cause, ValueError | TypeError)
    )
    if rejected and prompt_len >= max_model_len:
        return ContextLengthError(
            f"the prompt has {prompt_len} tokens but max_model_len is {max_model_len}, "
            f"which must also leave room for at least one generated token ({cause})",
            param="prompt",
        )
    if rejected:
        return InvalidRequestError(str(cause))
    return EngineRequestError(f"the request failed in vLLM: {type(exc).__name__}: {exc}")


def _sampling_params(opts: SamplingOptions) -> SamplingParams:
    """Map our sampling options one to one; both use ``top_k=0`` for "disabled"."""
    return SamplingParams(
        max_tokens=opts.max_tokens,
        temperature=opts.temperature,
        top_p=opts.top_p,
        top_k=opts.top_k,
        seed=opts.seed,
        ignore_eos=opts.ignore_eos,
        stop_token_ids=list(opts.stop_token_ids),
        min_tokens=opts.min_tokens,
        presence_penalty=opts.presence_penalty,
        frequency_penalty=opts.frequency_penalty,
        repetition_penalty=opts.repetition_penalty,
        detokenize=False,
        output_kind=RequestOutputKind.DELTA,
    )


class _SchedulerLoad(StatLoggerBase):  # type: ignore[misc]
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

    def bind(self, vllm_config: Any, engine_index: int = 0) -> _SchedulerLoad:
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

    def log_engine_initialized(self) -> None:
        logger.debug("vLLM engine ready with %d KV blocks", self.kv_blocks_total)


@dataclass(slots=True)
class _InFlight:
    """What the adapter remembers about one running request."""

    prompt_len: int
    started: bool = False  # produced its first output (its prefill is done)
    finished: bool = False


class VLLMEngine:
    """One vLLM instance behind the ``Engine`` protocol. Build it with :meth:`start`."""

    def __init__(
        self, llm: AsyncLLM, load: _SchedulerLoad, *, instance_id: str, served_model_name: str
    ) -> None:
        self._llm: AsyncLLM | None = llm
        self._load = load
        self._instance_id = instance_id
        self._served_model_name = served_model_name
        self._block_size = int(llm.vllm_config.cache_config.block_size)
        self._max_model_len = int(llm.model_config.max_model_len)
        self._inflight: dict[str, _InFlight] = {}
        self._waiting_prefill_tokens = 0

    @classmethod
    async def start(cls, cfg: EngineConfig, *, instance_id: str, model_dir: Path) -> VLLMEngine:
        """Start the engine core (a spawned child process) and wait until it serves.

        Must run inside the event loop that will use the engine. vLLM's start is synchronous
        and holds the loop for its duration (~12 s for the tiny model on a fast CPU). Process
        environment variables from :func:`vllm_env` that the host did not set are filled in
        with defaults first; the host should have applied them before importing vLLM.
        """
        apply_vllm_env(vllm_env(cfg, cache_dir=default_cache_dir()), override=False)
        name = cfg.served_model_name or (TINY_MODEL_NAME if cfg.model is None else model_dir.name)
        if clash := _TYPED_ARGS & cfg.extra_args.keys():
            raise ConfigError(f"engine.extra_args repeats typed engine settings: {sorted(clash)}")
        load = _SchedulerLoad()
        try:
            args = AsyncEngineArgs(
                model=str(model_dir),
                served_model_name=name,
                dtype=cfg.dtype,
                block_size=cfg.block_size,
                max_model_len=cfg.max_model_len,
                max_num_seqs=cfg.max_num_seqs,
                seed=cfg.seed,
                enable_prefix_caching=cfg.enable_prefix_caching,
                prefix_caching_hash_algo=cfg.prefix_caching_hash_algo,
                enforce_eager=cfg.enforce_eager,
                kv_cache_memory_bytes=cfg.cpu_kvcache_space_gib * _GIB if current_platform.is_cpu() else None,
                disable_log_stats=True,  # no periodic log lines; our stat logger still gets stats
                enable_log_requests=False,
                **cfg.extra_args,
            )
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"invalid vLLM engine arguments: {exc}") from exc
        started = time.monotonic()
        try:
            llm = AsyncLLM.from_engine_args(args, stat_loggers=[load.bind])
            # Cache the supported tasks now, so that later add_request calls do not await
            # before registering the request (an abort in that window would be lost).
            await llm.get_supported_tasks()
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"vLLM rejected the engine configuration: {exc}") from exc
        except Exception as exc:
            raise EngineDeadError(f"the vLLM engine failed to start: {exc}") from exc
        logger.info(
            "vLLM engine %s serving %s started in %.1f s", instance_id, name, time.monotonic() - started
        )
        return cls(llm, load, instance_id=instance_id, served_model_name=name)

    @property
    def instance_id(self) -> str:
        """Identity of this instance in load reports and outputs."""
        return self._instance_id

    @property
    def served_model_name(self) -> str:
        """The model name clients use."""
        return self._served_model_name

    @property
    def block_size(self) -> int:
        """Tokens per KV block, as the engine actually runs."""
        return self._block_size

    @property
    def max_model_len(self) -> int:
        """Longest prompt + completion, as the engine resolved it."""
        return self._max_model_len

    @property
    def async_llm(self) -> AsyncLLM:
        """The wrapped ``AsyncLLM``, for the KV connector and migration code in ``workers/``."""
        return self._require_llm()

    def _require_llm(self) -> AsyncLLM:
        llm = self._llm
        if llm is None:
            raise EngineDeadError(f"engine {self._instance_id} is closed")
        if llm.errored:
            raise EngineDeadError(f"engine {self._instance_id} died: {llm.dead_error}")
        return llm

    async def generate(self, req: EngineRequest) -> AsyncGenerator[EngineOutput, None]:
        """Stream output deltas of ``req``; the first carries prompt and cached-token counts.

        Note: the consumer's pace sets the delta size. A slow consumer gets fewer, larger
        deltas (vLLM merges them), never an unbounded backlog.
        """
        llm = self._require_llm()
        rid = req.request_id
        if rid in self._inflight:
            raise InvalidRequestError(f"request {rid!r} is already running here", param="request_id")
        state = _InFlight(prompt_len=len(req.prompt_token_ids))
        try:
            params = _sampling_params(req.sampling)
        except Exception as exc:
            raise self._translate(exc, state) from exc
        self._inflight[rid] = state
        self._waiting_prefill_tokens += state.prompt_len
        stream = llm.generate(tokens_input(list(req.prompt_token_ids)), params, rid)
        num_cached = 0
        try:
            async for out in stream:
                if not state.started:
                    self._mark_started(state)
                    num_cached = out.num_cached_tokens or 0
                completion = out.outputs[0]
                reason = _finish_reason(completion.finish_reason) if out.finished else None
                state.finished = out.finished
                yield EngineOutput(
                    request_id=rid,
                    token_ids=tuple(completion.token_ids),
                    finished=out.finished,
                    finish_reason=reason,
                    num_prompt_tokens=state.prompt_len,
                    num_cached_tokens=num_cached,
                    instance_id=self._instance_id,
                )
        except (asyncio.CancelledError, GeneratorExit):
            if not state.finished:
                await self._abort_quietly(llm, rid)
            raise
        except SwitchyardError:
            raise
        except Exception as exc:
            raise self._translate(exc, state) from exc
        finally:
            self._mark_started(state)
            del self._inflight[rid]
            await stream.aclose()

    async def abort(self, request_id: str) -> bool:
        """Stop a request and free its blocks; False when it is not (or no longer) running.

        The request's stream then ends with ``finish_reason=ABORT``.
        """
        state = self._inflight.get(request_id)
        if state is None or state.finished or self._llm is None:
            return False
        await self._llm.abort(request_id)
        return True

    def load(self) -> LoadReport:
        """Current load from vLLM's last scheduler stats plus this adapter's own bookkeeping.

        ``waiting_prefill_tokens`` is best effort: the prompt tokens of requests that have
        not produced their first token yet (queued, or prefilling in chunks). It does not
        subtract prefix-cache hits, which vLLM reports only with the first output, so it
        is an upper bound on the prefill work ahead.
        """
        s = self._load
        return LoadReport(
            instance_id=self._instance_id,
            timestamp=time.monotonic(),
            num_running=s.num_running,
            num_waiting=s.num_waiting,
            waiting_prefill_tokens=self._waiting_prefill_tokens,
            kv_blocks_used=round(s.kv_usage * s.kv_blocks_total),
            kv_blocks_total=s.kv_blocks_total,
            step_time_s=s.step_time_s,
            prefix_cache_queries_total=s.prefix_queries_total,
            prefix_cache_hits_total=s.prefix_hits_total,
            num_preemptions_total=s.preemptions_total,
        )

    async def check_health(self) -> None:
        """Raise ``EngineDeadError`` when the engine core process is gone or closed."""
        llm = self._llm
        if llm is None:
            raise EngineDeadError(f"vLLM engine {self._instance_id} is closed")
        try:
            await llm.check_health()
        except Exception as exc:
            raise EngineDeadError(f"vLLM engine {self._instance_id} is dead: {exc}") from exc

    async def close(self) -> None:
        """Abort everything and shut the engine core down; safe to call twice."""
        llm, self._llm = self._llm, None
        if llm is None:
            return
        if self._inflight:
            await self._abort_quietly(llm, list(self._inflight))
        # Shutdown joins the child processes (seconds); vLLM supports calling it off-loop.
        await asyncio.to_thread(llm.shutdown)
        logger.info("vLLM engine %s closed", self._instance_id)

    def _mark_started(self, state: _InFlight) -> None:
        if not state.started:
            state.started = True
            self._waiting_prefill_tokens -= state.prompt_len

    def _translate(self, exc: BaseException, state: _InFlight) -> SwitchyardError:
        return translate_vllm_error(
            exc, prompt_len=state.prompt_len, max_model_len=self._max_model_len, admitted=state.started
        )

    async def _abort_quietly(self, llm: AsyncLLM, request_ids: str | list[str]) -> None:
        """Abort on a path that is already failing or closing: a dead engine is no news."""
        try:
            await llm.abort(request_ids)
        except Exception:
            logger.debug("abort of %s failed", request_ids, exc_info=True)


def _finish_reason(reason: str | None) -> FinishReason:
    """vLLM's finish reason string as ours; ``error`` (a retryable engine fault) raises."""
    if reason is not None and (mapped := _FINISH_REASONS.get(reason)) is not None:
        return mapped
    raise EngineRequestError(f"vLLM finished the request with reason {reason!r}")
