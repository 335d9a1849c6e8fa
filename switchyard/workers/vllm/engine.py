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

from vllm import AsyncEngineArgs
from vllm.inputs.engine import tokens_input
from vllm.platforms import current_platform
from vllm.v1.engine.async_llm import AsyncLLM

from switchyard.cache import cache_dir
from switchyard.config import EngineConfig, KvTransferConfig
from switchyard.errors import (
    ConfigError,
    EngineDeadError,
    InvalidRequestError,
    MigrationError,
    SwitchyardError,
)
from switchyard.messages import (
    EngineOutput,
    EngineRequest,
    KvSnapshot,
    LoadReport,
    SuspendedRequest,
)
from switchyard.testing.tiny_model import TINY_MODEL_NAME
from switchyard.workers.vllm.env import apply_vllm_env, cpu_threads_while_spawning, vllm_env
from switchyard.workers.vllm.errors import finish_reason, translate_vllm_error
from switchyard.workers.vllm.kv_transfer import (
    KvEndpoint,
    KvMigrationOps,
    kv_bytes_per_block,
    kv_transfer_engine_config,
)
from switchyard.workers.vllm.load import SchedulerLoad
from switchyard.workers.vllm.sampling import sampling_params

__all__ = ["VLLMEngine", "translate_vllm_error"]

logger = logging.getLogger(__name__)

_GIB = 1 << 30
# Engine arguments this adapter sets from typed config; ``extra_args`` may not repeat them.
_TYPED_ARGS = frozenset(
    {"model", "served_model_name", "dtype", "block_size", "max_model_len", "max_num_seqs", "seed"}
    | {"enable_prefix_caching", "prefix_caching_hash_algo", "enforce_eager", "kv_cache_memory_bytes"}
    | {"disable_log_stats", "enable_log_requests", "kv_transfer_config"}
)


@dataclass(slots=True)
class _InFlight:
    """What the adapter remembers about one running request."""

    prompt_len: int  # tokens of the engine's prompt (moved outputs included)
    request: EngineRequest  # as its client sent it: the base of a migration
    prior_outputs: tuple[int, ...] = ()  # outputs a migration moved into the engine's prompt
    started: bool = False  # produced its first output (its prefill is done)
    finished: bool = False


class VLLMEngine:
    """One vLLM instance behind the ``Engine`` protocol. Build it with :meth:`start`."""

    def __init__(
        self,
        llm: AsyncLLM,
        load: SchedulerLoad,
        *,
        instance_id: str,
        served_model_name: str,
        kv: KvMigrationOps | None = None,
    ) -> None:
        self._llm: AsyncLLM | None = llm
        self._load = load
        self._instance_id = instance_id
        self._served_model_name = served_model_name
        self._kv = kv
        self._block_size = int(llm.vllm_config.cache_config.block_size)
        self._kv_bytes_per_block = kv_bytes_per_block(llm.vllm_config)
        self._max_model_len = int(llm.model_config.max_model_len)
        self._inflight: dict[str, _InFlight] = {}
        self._waiting_prefill_tokens = 0

    @classmethod
    async def start(
        cls,
        cfg: EngineConfig,
        *,
        instance_id: str,
        model_dir: Path,
        kv_transfer: KvTransferConfig | None = None,
    ) -> VLLMEngine:
        """Start the engine core (a spawned child process) and wait until it serves.

        Must run inside the event loop that will use the engine. vLLM's start is synchronous
        and holds the loop for its duration (~12 s for the tiny model on a fast CPU). Process
        environment variables from :func:`vllm_env` that the host did not set are filled in
        with defaults first; the host should have applied them before importing vLLM.

        ``kv_transfer`` (default: ``cfg.kv_transfer``) loads the migration connector (NIXL): the
        engine can then be a migration source and destination (``snapshot``, ``suspend``, ...).
        """
        apply_vllm_env(vllm_env(cfg, cache_dir=cache_dir()), override=False)
        kv_transfer = kv_transfer or cfg.kv_transfer
        kv_args: dict[str, Any] = {}
        endpoint: KvEndpoint | None = None
        if kv_transfer is not None:
            if current_platform.is_cpu():  # NIXL over UCX: DRAM via TCP and shared memory
                apply_vllm_env({"UCX_TLS": kv_transfer.ucx_tls}, override=False)
            kv_args["kv_transfer_config"], endpoint = kv_transfer_engine_config(kv_transfer)
        name = cfg.served_model_name or (TINY_MODEL_NAME if cfg.model is None else model_dir.name)
        if clash := _TYPED_ARGS & cfg.extra_args.keys():
            raise ConfigError(f"engine.extra_args repeats typed engine settings: {sorted(clash)}")
        load = SchedulerLoad()
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
                **kv_args,
                **cfg.extra_args,
            )
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"invalid vLLM engine arguments: {exc}") from exc
        started = time.monotonic()
        try:
            # The engine's processes are spawned here and keep the thread settings they inherit;
            # set on purpose, they win over inherited values, and the host gets its own back.
            with cpu_threads_while_spawning(cfg):
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
        kv = None if endpoint is None else KvMigrationOps(llm, endpoint, instance_id=instance_id)
        if kv is not None:
            await kv.ping()
        return cls(llm, load, instance_id=instance_id, served_model_name=name, kv=kv)

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
    def kv_bytes_per_block(self) -> int:
        """Bytes one KV block holds here (migration moves whole blocks)."""
        return self._kv_bytes_per_block

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

    def generate(self, req: EngineRequest) -> AsyncGenerator[EngineOutput, None]:
        """Stream output deltas of ``req``; the first carries prompt and cached-token counts.

        Note: the consumer's pace sets the delta size. A slow consumer gets fewer, larger
        deltas (vLLM merges them), never an unbounded backlog.
        """
        return self._run(req, _InFlight(prompt_len=len(req.prompt_token_ids), request=req), None)

    async def _run(
        self, req: EngineRequest, state: _InFlight, kv_params: dict[str, Any] | None
    ) -> AsyncGenerator[EngineOutput, None]:
        """Run ``req`` (the engine's prompt; ``state.request`` the client's) and stream deltas.

        Outputs report the client's prompt length, so usage is right after a migration moved
        outputs into the engine's prompt.
        """
        llm = self._require_llm()
        rid = req.request_id
        if rid in self._inflight:
            raise InvalidRequestError(f"request {rid!r} is already running here", param="request_id")
        try:
            params = sampling_params(req.sampling, rid, kv_params)
        except Exception as exc:
            raise self._translate(exc, state) from exc
        self._inflight[rid] = state
        self._waiting_prefill_tokens += state.prompt_len
        stream = llm.generate(tokens_input(list(req.prompt_token_ids)), params, rid)
        num_prompt = len(state.request.prompt_token_ids)
        num_cached = 0
        try:
            async for out in stream:
                if not state.started:
                    self._mark_started(state)
                    num_cached = min(out.num_cached_tokens or 0, num_prompt)
                completion = out.outputs[0]
                reason = finish_reason(completion.finish_reason) if out.finished else None
                state.finished = out.finished
                yield EngineOutput(
                    request_id=rid,
                    token_ids=tuple(completion.token_ids),
                    finished=out.finished,
                    finish_reason=reason,
                    num_prompt_tokens=num_prompt,
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

    # -- migration (see kv_transfer.py) -----------------------------------------------------------

    @property
    def kv_endpoint(self) -> KvEndpoint | None:
        """The connector's handshake and control addresses; None without ``kv_transfer``."""
        return None if self._kv is None else self._kv.endpoint

    def _require_kv(self) -> KvMigrationOps:
        self._require_llm()
        if self._kv is None:
            raise MigrationError(f"engine {self._instance_id} was started without kv_transfer")
        return self._kv

    async def snapshot(
        self, request_id: str, *, after_tokens: int = 0, min_new_blocks: int = 1
    ) -> KvSnapshot:
        """Source: the running request's full KV blocks as a pull ticket; it keeps decoding."""
        kv = self._require_kv()
        if request_id not in self._inflight:
            raise MigrationError(f"request {request_id!r} is not running on {self._instance_id}")
        return await kv.snapshot(request_id, after_tokens=after_tokens, min_new_blocks=min_new_blocks)

    async def shadow_pull(self, snapshot: KvSnapshot) -> int:
        """Destination: pull a snapshot's blocks into the prefix cache; tokens it now holds."""
        return await self._require_kv().shadow_pull(snapshot)

    async def suspend(self, request_id: str) -> SuspendedRequest:
        """Source: stop the request, hold its blocks for a pull, return its authoritative state.

        Its stream ends with ``finish_reason=ABORT``; the caller continues it elsewhere.
        Refuses (``MigrationError``) requests whose output would change by moving.
        """
        kv = self._require_kv()
        state = self._inflight.get(request_id)
        if state is None or state.finished:
            raise MigrationError(f"request {request_id!r} is not running on {self._instance_id}")
        if (why := state.request.sampling.migration_refusal()) is not None:
            raise MigrationError(f"request {request_id!r} cannot migrate: {why}")
        base = state.request
        return await kv.suspend(
            request_id,
            prompt=list(base.prompt_token_ids),
            prior_outputs=state.prior_outputs,
            sampling=base.sampling,
        )

    def admit_migrated(self, req: SuspendedRequest) -> AsyncGenerator[EngineOutput, None]:
        """Destination: continue a suspended request: ``prompt + outputs``, pulling the KV tail.

        ``max_tokens``/``min_tokens`` shrink by the outputs already produced; without a ticket
        (``kv_transfer_params`` empty) the destination recomputes the prefix instead.
        """
        self._require_kv()
        engine_req = req.continuation()
        if engine_req is None:
            raise MigrationError(f"request {req.request_id!r} has nothing left to generate")
        prior = tuple(req.output_token_ids)
        state = _InFlight(len(engine_req.prompt_token_ids), req.request, prior_outputs=prior)
        return self._run(engine_req, state, dict(req.kv_transfer_params) or None)

    async def release_suspended(self, request_id: str) -> bool:
        """Source: free blocks held for a destination that will not pull them."""
        return await self._require_kv().release(request_id)

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
        return self._load.report(self._instance_id, waiting_prefill_tokens=self._waiting_prefill_tokens)

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
