"""A synchronous, clock-free performance model of one vLLM V1 instance (a simulator, not inference).

The control plane's behaviour at scale (routing, rebalancing, SLO switches) depends on what an
instance does with the requests it gets: how it batches them, when its KV cache fills, which
prefixes it still holds, when it preempts. ``SimInstance`` reproduces those mechanics of vLLM
V1 so that dozens of instances can be run without GPUs, and prices each step with the
calibrated ``StepCostModel``:

* **Scheduling** (vLLM V1, FCFS): running requests first, in order, then waiting ones, within a
  token budget (``max_num_batched_tokens``) and ``max_num_seqs``; prefills are chunked to fit
  the budget; waiting requests are admitted only in steps without a preemption.
* **Paged KV** of ``block_size`` tokens; a request holds ``ceil(computed/block_size)`` blocks.
* **Prefix cache**: full blocks are keyed by chained hashes of their tokens; freed blocks stay
  cached in an LRU free queue and are evicted, least recently freed first, only when a block is
  needed. A hit skips the linear-layer work of its tokens (they still count as attention keys).
  At least the last prompt token is always recomputed, as in vLLM.
* **Preemption** (recompute): when a running request needs a block and none is free, the last
  running request gives up its blocks and goes back to the head of the waiting queue; it later
  recomputes prompt + output so far (possibly hitting its own still-cached blocks).
* **Migration hooks** (``suspend``, ``precopy``, ``admit_migrated``): the engine-side effects of
  the live-migration protocol; its stages and costs are ``sim.migration``'s.

Time is not read here: ``step()`` returns the modeled duration and the caller advances its own
clock (``SimEngine`` sleeps it, ``SimFleet`` adds it to a virtual clock). A step's effects are
applied when it is computed; callers deliver its outputs after its duration. Emitted token IDs
are a deterministic function of (engine seed, request_id, position), so a recomputed or migrated
request produces the same tokens, and another ``EngineConfig.seed`` other ones. Per-step work is
proportional to the batch, never to all requests.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

from switchyard.config import EngineConfig
from switchyard.errors import ConfigError, ContextLengthError, EngineRequestError, InvalidRequestError
from switchyard.messages import EngineOutput, EngineRequest, FinishReason, LoadReport
from switchyard.workers.sim.cost import StepCostModel, StepWork, load_profile, prefill_pairs
from switchyard.workers.sim.kv_pool import KvBlockPool
from switchyard.workers.sim.request import (
    SimRequestState,
    SimSuspended,
    Status,
    chain_hashes,
    simulated_token_id,
    token_at,
)

__all__ = ["SimInstance", "StepResult", "simulated_token_id"]

_STEP_TIME_WINDOW = 16  # steps averaged into LoadReport.step_time_s


@dataclass(frozen=True, slots=True)
class StepResult:
    """One simulated engine step: how long it takes, what it computed, what it emitted."""

    duration_s: float
    outputs: tuple[EngineOutput, ...]
    work: StepWork
    num_preempted: int = 0


class SimInstance:
    """Continuous-batching scheduler, paged KV and prefix cache of one simulated vLLM V1 instance.

    Not thread-safe and never blocking: callers (one event loop, or the virtual-time fleet)
    interleave ``add_request``/``abort`` with ``step``.
    """

    def __init__(
        self,
        cost: StepCostModel,
        *,
        instance_id: str = "sim-0",
        block_size: int = 16,
        num_kv_blocks: int,
        max_model_len: int,
        max_num_seqs: int = 256,
        max_num_batched_tokens: int = 8192,
        vocab_size: int = 32000,
        enable_prefix_caching: bool = True,
        seed: int = 0,
    ) -> None:
        if max_model_len > num_kv_blocks * block_size:
            raise ConfigError(
                f"max_model_len {max_model_len} does not fit {num_kv_blocks} KV blocks of {block_size} "
                "tokens; raise num_kv_blocks or lower max_model_len"
            )
        self.instance_id = instance_id
        self.block_size = block_size
        self.max_model_len = max_model_len
        self.vocab_size = vocab_size
        self.seed = seed
        """``EngineConfig.seed``: with the request id, it decides the emitted token IDs."""
        self._cost = cost
        self._max_num_seqs = max_num_seqs
        self._max_num_batched_tokens = max_num_batched_tokens
        self._prefix_caching = enable_prefix_caching
        self._pool = KvBlockPool(num_kv_blocks)
        self._requests: dict[str, SimRequestState] = {}
        self._running: list[SimRequestState] = []
        self._waiting: deque[SimRequestState] = deque()
        self._num_waiting = 0
        self._pending_prefill = 0
        self._step_times: deque[float] = deque(maxlen=_STEP_TIME_WINDOW)
        self.prefix_cache_queries_total = 0  # tokens looked up at admissions
        self.prefix_cache_hits_total = 0  # tokens found cached at admissions
        self.num_preemptions_total = 0
        self.num_computed_tokens_total = 0  # tokens actually computed (prefill chunks + decodes)

    @classmethod
    def from_config(cls, cfg: EngineConfig, *, instance_id: str = "sim-0") -> SimInstance:
        """Build from ``EngineConfig`` (its ``sim`` section, block size, context, prefix caching, seed)."""
        sim = cfg.sim
        profile = load_profile(sim.profile)
        num_blocks = sim.num_kv_blocks or profile.engine.kv_cache_tokens // cfg.block_size
        return cls(
            StepCostModel.from_profile(profile, compute_derate=sim.compute_derate),
            instance_id=instance_id,
            block_size=cfg.block_size,
            num_kv_blocks=num_blocks,
            max_model_len=cfg.max_model_len or min(profile.model.max_model_len, num_blocks * cfg.block_size),
            max_num_seqs=sim.max_num_seqs or profile.engine.max_num_seqs,
            max_num_batched_tokens=sim.max_num_batched_tokens or profile.engine.max_num_batched_tokens,
            vocab_size=sim.vocab_size,
            enable_prefix_caching=cfg.enable_prefix_caching,
            seed=cfg.seed,
        )

    @property
    def cost(self) -> StepCostModel:
        return self._cost

    @property
    def has_work(self) -> bool:
        return bool(self._running) or self._num_waiting > 0

    @property
    def num_kv_blocks(self) -> int:
        return self._pool.num_blocks

    @property
    def num_free_blocks(self) -> int:
        """Blocks not referenced by any request (free cached blocks included)."""
        return self._pool.num_free

    @property
    def num_cached_blocks(self) -> int:
        return self._pool.num_cached

    @property
    def max_num_batched_tokens(self) -> int:
        """Token budget of one step (prefill chunks plus one token per decoding sequence)."""
        return self._max_num_batched_tokens

    def running_requests(self) -> Sequence[SimRequestState]:
        """The batch, read-only: for perfect-information references (the benchmark's oracle)."""
        return self._running

    def waiting_requests(self) -> Sequence[SimRequestState]:
        """The queue, head first, read-only (entries no longer ``WAITING`` are dropped lazily)."""
        return self._waiting

    def __contains__(self, request_id: object) -> bool:
        return request_id in self._requests

    def add_request(self, req: EngineRequest) -> None:
        """Queue ``req`` behind the waiting requests; raises on an unusable request."""
        n = len(req.prompt_token_ids)
        if req.request_id in self._requests:
            raise EngineRequestError(f"request {req.request_id!r} is already in {self.instance_id}")
        if n == 0:
            raise InvalidRequestError("the prompt must hold at least one token", param="prompt")
        if n > self.max_model_len:
            raise ContextLengthError(f"prompt of {n} tokens exceeds max_model_len {self.max_model_len}")
        sreq = SimRequestState.of(req, self.seed)
        self._requests[req.request_id] = sreq
        self._waiting.append(sreq)
        self._num_waiting += 1
        self._pending_prefill += n

    def abort(self, request_id: str) -> bool:
        """Drop a request and free its blocks; False when it is unknown or already finished."""
        return self._remove(request_id) is not None

    def _remove(self, request_id: str) -> SimRequestState | None:
        sreq = self._requests.pop(request_id, None)
        if sreq is None:
            return None
        self._pending_prefill -= sreq.pending_prefill()
        if sreq.status is Status.WAITING:
            self._num_waiting -= 1  # left in the deque, skipped when it reaches the head
        else:
            self._running.remove(sreq)  # O(batch)
        self._pool.release(sreq.blocks)  # a waiting request holds blocks only if a migration brought KV
        sreq.blocks = []
        sreq.status = Status.DONE
        return sreq

    # -- migration hooks (the protocol and its costs live in ``sim.migration``) -----------------

    def migration_view(self, request_id: str) -> tuple[int, Sequence[int]] | None:
        """(tokens with KV here, prompt + outputs: the live list, read-only) or None if not here."""
        sreq = self._requests.get(request_id)
        return None if sreq is None else (sreq.num_computed, sreq.tokens)

    def suspend(self, request_id: str) -> SimSuspended | None:
        """Take a request out (running or waiting) with its outputs and KV extent; frees its blocks.

        The freed full blocks stay in this instance's prefix cache, as after a vLLM abort.
        """
        sreq = self._remove(request_id)  # keeps ``tokens`` and ``num_computed``
        return None if sreq is None else sreq.suspended()

    def cached_prefix_blocks(self, tokens: Sequence[int], num_blocks: int) -> int:
        """How many of the first ``num_blocks`` full blocks of ``tokens`` this prefix cache holds."""
        return self.cached_prefix_blocks_of(chain_hashes(tokens, num_blocks, self.block_size), num_blocks)

    def cached_prefix_blocks_of(self, hashes: list[int], num_blocks: int) -> int:
        """:meth:`cached_prefix_blocks` for block hashes already computed (``chain_hashes``)."""
        if not self._prefix_caching:
            return 0
        return len(self._pool.lookup(hashes, num_blocks))

    def precopy(self, tokens: Sequence[int], num_blocks: int) -> int | None:
        """Land the first ``num_blocks`` full blocks of ``tokens`` in the prefix cache, as vLLM does
        with a migration's 1-token shadow request (``KvBlockPool.land``). Returns the blocks that
        had to be pulled; None when prefix caching is off (nowhere to keep them) or blocks are short.
        """
        if not self._prefix_caching:
            return None
        return self._pool.land(chain_hashes(tokens, num_blocks, self.block_size))

    def admit_migrated(self, state: SimSuspended) -> int | None:
        """Queue a suspended request with ``state.num_computed`` tokens of KV already computed.

        Cached leading blocks are hit; the others arrive by the pull, so they are allocated
        here, never recomputed. The request waits in the queue like any arrival (vLLM admits a
        remote-KV request through its waiting queue) and then decodes, or finishes its chunked
        prefill. Returns the blocks that had to be pulled; None when the pool is short (nothing
        changed: the caller may recompute instead). Without KV it is a plain arrival.
        """
        if state.request_id in self._requests:
            raise EngineRequestError(f"request {state.request_id!r} is already in {self.instance_id}")
        sreq = SimRequestState.resumed(state, self.seed)
        total, bs = len(sreq.tokens), self.block_size
        computed = min(state.num_computed, total - 1)
        pulled = 0
        if computed > 0:
            full = computed // bs
            hit = self._pool.lookup(sreq.block_hashes(full, bs), full) if self._prefix_caching else []
            pulled = -(-computed // bs) - len(hit)
            if not self._pool.allocate(sreq.blocks, hit, pulled):
                return None
            sreq.num_computed = computed
            sreq.num_registered = len(hit)
            sreq.prefill_len = computed if computed == total - 1 else total
        self._requests[sreq.request_id] = sreq
        self._waiting.append(sreq)
        self._num_waiting += 1
        self._pending_prefill += sreq.pending_prefill()
        return pulled

    def load(self, now: float) -> LoadReport:
        """Load as of ``now`` (the caller's clock).

        ``waiting_prefill_tokens`` also counts the unprefilled rest of running chunked prefills,
        since a router's queueing estimate must wait for those too; prefix-cache queries and hits
        are counted per admission, re-admissions after preemption included (as vLLM does).
        """
        times = self._step_times
        return LoadReport(
            instance_id=self.instance_id,
            timestamp=now,
            num_running=len(self._running),
            num_waiting=self._num_waiting,
            waiting_prefill_tokens=self._pending_prefill,
            kv_blocks_used=self._pool.num_blocks - self._pool.num_free,
            kv_blocks_total=self._pool.num_blocks,
            step_time_s=sum(times) / len(times) if times else 0.0,
            prefix_cache_queries_total=self.prefix_cache_queries_total,
            prefix_cache_hits_total=self.prefix_cache_hits_total,
            num_preemptions_total=self.num_preemptions_total,
        )

    def step(self) -> StepResult:
        """Schedule one batch, apply it, and return its modeled duration and output deltas."""
        budget = self._max_num_batched_tokens
        scheduled: list[tuple[SimRequestState, int]] = []
        preempted = 0
        running, bs = self._running, self.block_size
        i = 0
        while i < len(running) and budget > 0:
            sreq = running[i]
            num_new = min(len(sreq.tokens) - sreq.num_computed, budget)
            end = sreq.num_computed + num_new
            while end > len(sreq.blocks) * bs and not self._grow(sreq, end):
                victim = running.pop()  # FCFS: the latest running request yields its blocks
                self._preempt(victim)
                preempted += 1
                if victim is sreq:
                    break
            else:
                scheduled.append((sreq, num_new))
                budget -= num_new
                i += 1
        if not preempted:
            self._admit(scheduled, budget)
        return self._execute(scheduled, preempted)

    def _grow(self, sreq: SimRequestState, end: int) -> bool:
        """Give ``sreq`` blocks for KV up to token ``end``; False when the pool is short."""
        return self._pool.allocate(sreq.blocks, [], -(-end // self.block_size) - len(sreq.blocks))

    def _preempt(self, sreq: SimRequestState) -> None:
        self._pending_prefill += len(sreq.tokens) - sreq.pending_prefill()
        self._pool.release(sreq.blocks)
        sreq.blocks = []
        sreq.num_computed = sreq.num_registered = 0
        sreq.status = Status.WAITING
        self._waiting.appendleft(sreq)
        self._num_waiting += 1
        self.num_preemptions_total += 1

    def _admit(self, scheduled: list[tuple[SimRequestState, int]], budget: int) -> None:
        """Move waiting requests into the batch, head first, until budget, seats or blocks run out."""
        waiting, bs = self._waiting, self.block_size
        while waiting and budget > 0 and len(self._running) < self._max_num_seqs:
            sreq = waiting[0]
            if sreq.status is not Status.WAITING:
                waiting.popleft()  # aborted while waiting
                continue
            total = len(sreq.tokens)
            if sreq.blocks:  # a migration brought its KV: only room for this step's tokens is needed
                num_new = min(total - sreq.num_computed, budget)
                if not self._grow(sreq, sreq.num_computed + num_new):
                    break
            else:
                hit: list[int] = []
                if self._prefix_caching:  # at least the last token is recomputed, to sample from it
                    limit = (total - 1) // bs
                    hit = self._pool.lookup(sreq.block_hashes(limit, bs), limit)
                computed = len(hit) * bs
                num_new = min(total - computed, budget)
                if not self._pool.allocate(sreq.blocks, hit, -(-(computed + num_new) // bs) - len(hit)):
                    break
                self._pending_prefill -= computed
                sreq.num_computed = computed
                sreq.num_registered = len(hit)
                sreq.prefill_len = total
                if sreq.num_cached_tokens < 0:
                    sreq.num_cached_tokens = computed
                self.prefix_cache_queries_total += total
                self.prefix_cache_hits_total += computed
            waiting.popleft()
            self._num_waiting -= 1
            sreq.status = Status.RUNNING
            self._running.append(sreq)
            scheduled.append((sreq, num_new))
            budget -= num_new

    def _execute(self, scheduled: list[tuple[SimRequestState, int]], preempted: int) -> StepResult:
        """Advance every scheduled request, sample where a request caught up, price the step."""
        bs = self.block_size
        num_tokens = num_sampled = decode_context = 0
        pairs = 0.0
        outputs: list[EngineOutput] = []
        for sreq, n in scheduled:
            k = sreq.num_computed
            if k < sreq.prefill_len:
                pairs += prefill_pairs(n, k)
                self._pending_prefill -= n
            else:
                decode_context += k + 1
            num_tokens += n
            sreq.num_computed = k + n
            full = sreq.num_computed // bs
            if self._prefix_caching and full > sreq.num_registered:
                hashes = sreq.block_hashes(full, bs)
                for b in range(sreq.num_registered, full):
                    self._pool.register(sreq.blocks[b], hashes[b])
                sreq.num_registered = full
            if sreq.num_computed == len(sreq.tokens):
                num_sampled += 1
                outputs.append(self._sample(sreq))
        if any(out.finished for out in outputs):
            self._running = [s for s in self._running if s.status is Status.RUNNING]
        work = StepWork(num_tokens, num_sampled, pairs, decode_context, len(scheduled))
        duration = self._cost.step_time_s(work)
        if scheduled:
            self._step_times.append(duration)
        self.num_computed_tokens_total += num_tokens
        return StepResult(duration, tuple(outputs), work, preempted)

    def _sample(self, sreq: SimRequestState) -> EngineOutput:
        index = len(sreq.tokens) - sreq.num_prompt
        token = token_at(sreq.seed, index, self.vocab_size)
        sreq.tokens.append(token)
        reason: FinishReason | None = None
        if token in sreq.stop_ids and index + 1 >= sreq.min_tokens:
            reason = FinishReason.STOP
        elif index + 1 >= sreq.max_tokens or len(sreq.tokens) >= self.max_model_len:
            reason = FinishReason.LENGTH
        if reason is not None:
            sreq.status = Status.DONE
            self._pool.release(sreq.blocks)
            sreq.blocks = []
            del self._requests[sreq.request_id]
        return EngineOutput(
            request_id=sreq.request_id,
            token_ids=(token,),
            finished=reason is not None,
            finish_reason=reason,
            num_prompt_tokens=sreq.num_prompt,
            num_cached_tokens=sreq.num_cached_tokens,
            instance_id=self.instance_id,
        )
