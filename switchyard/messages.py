"""Typed messages passed between Switchyard's components inside one process.

The gateway, the router core, the worker clients and the engines speak these; the wire form
(protobuf, in ``switchyard/api``) is converted to and from them in ``switchyard/api/wire.py`` only.
They are frozen, slotted dataclasses: cheap to build on the hot path and safe to share.

**The continuation rule** lives here, once: a request carries on elsewhere as its prompt plus
the outputs so far, with ``max_tokens``/``min_tokens`` reduced by as many
(:meth:`EngineRequest.continued`), and only when its options let a fresh sampler continue the
same output (:meth:`SamplingOptions.migration_refusal`). Failover (the router core), live
migration (the engines' ``admit_migrated``) and prefill/decode hand-off build their next leg
with it; the router's ``MovableStream`` keeps the client's usage (prompt and cached tokens as
first reported) across every leg.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "EngineOutput",
    "EngineRequest",
    "FinishReason",
    "InstanceInfo",
    "KvSnapshot",
    "LoadReport",
    "Membership",
    "RoutingRequest",
    "SamplingOptions",
    "SuspendedRequest",
]


class FinishReason(enum.StrEnum):
    """Why a request stopped generating (OpenAI's ``finish_reason`` plus ``abort``)."""

    STOP = "stop"
    LENGTH = "length"
    ABORT = "abort"


@dataclass(frozen=True, slots=True)
class SamplingOptions:
    """The sampling parameters Switchyard forwards to an engine.

    The gateway has validated every value; engines may trust them.
    """

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 disables top-k
    seed: int | None = None
    ignore_eos: bool = False
    stop_token_ids: tuple[int, ...] = ()
    min_tokens: int = 0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0

    def migration_refusal(self) -> str | None:
        """Why moving a request with these options would change its output, or None if it would not.

        The destination sees the outputs as prompt tokens and starts a fresh sampler, so:

        * a seeded request would continue from a different generator state;
        * presence/frequency penalties count *output* tokens only, and moved outputs are prompt;
        * repetition penalties are refused too, to keep the rule simple (vLLM 0.32 applies them
          to prompt and output tokens alike, so they may be safe; not tested yet).

        Failover continues such requests anyway (the alternative is failing them): from the
        same text, with fresh randomness. Structured output (a grammar whose state would
        restart), logprobs, LoRA and multimodal inputs are not in ``SamplingOptions`` yet; they
        must be refused here when they are added.
        """
        if self.seed is not None:
            return "seeded sampling would continue from a different generator state"
        if self.presence_penalty or self.frequency_penalty:
            return "presence/frequency penalties count output tokens, which would become prompt"
        if self.repetition_penalty != 1.0:
            return "repetition penalty is not supported across a migration"
        return None


@dataclass(frozen=True, slots=True)
class EngineRequest:
    """One generation request as an engine receives it: token IDs in, token IDs out."""

    request_id: str
    prompt_token_ids: Sequence[int]
    sampling: SamplingOptions

    def continued(self, outputs: Sequence[int]) -> EngineRequest | None:
        """This request carried on after ``outputs`` (the continuation rule, module docstring):
        ``prompt + outputs`` with ``max_tokens`` and ``min_tokens`` reduced by ``len(outputs)``;
        itself when nothing was generated, None when the budget is spent."""
        n = len(outputs)
        if not n:
            return self
        s = self.sampling
        if s.max_tokens <= n:
            return None
        sampling = dataclasses.replace(s, max_tokens=s.max_tokens - n, min_tokens=max(0, s.min_tokens - n))
        return EngineRequest(self.request_id, [*self.prompt_token_ids, *outputs], sampling)


@dataclass(frozen=True, slots=True)
class RoutingRequest:
    """A tokenized request as the router core receives it from a gateway (HTTP or gRPC)."""

    request_id: str
    model: str
    prompt_token_ids: Sequence[int]
    sampling: SamplingOptions

    def engine_request(self) -> EngineRequest:
        """The request as an engine receives it, before any output."""
        return EngineRequest(self.request_id, self.prompt_token_ids, self.sampling)


@dataclass(frozen=True, slots=True)
class EngineOutput:
    """A delta of one request's output stream.

    ``token_ids`` holds only the tokens produced since the previous output of the same
    request. The first output carries ``num_prompt_tokens`` and ``num_cached_tokens`` (prompt
    tokens served from the prefix cache); later ones repeat them unchanged.
    """

    request_id: str
    token_ids: Sequence[int]
    finished: bool = False
    finish_reason: FinishReason | None = None
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    instance_id: str = ""


@dataclass(frozen=True, slots=True)
class LoadReport:
    """What an instance tells routers about its load, pushed every ~50-100 ms.

    Counters ending in ``_total`` are cumulative since the engine started, so a router can
    difference two reports without losing anything between them.
    """

    instance_id: str
    timestamp: float  # seconds, the reporting engine's monotonic clock
    num_running: int = 0
    num_waiting: int = 0
    waiting_prefill_tokens: int = 0  # prompt tokens of waiting requests not yet computed
    kv_blocks_used: int = 0
    kv_blocks_total: int = 0
    step_time_s: float = 0.0  # recent mean duration of one engine step
    prefix_cache_queries_total: int = 0  # tokens looked up in the prefix cache
    prefix_cache_hits_total: int = 0  # tokens found there
    num_preemptions_total: int = 0

    @property
    def kv_usage(self) -> float:
        """Fraction of KV blocks in use (0 when the engine reports no capacity)."""
        return self.kv_blocks_used / self.kv_blocks_total if self.kv_blocks_total else 0.0


@dataclass(frozen=True, slots=True)
class InstanceInfo:
    """Identity and static facts of one engine instance, as membership publishes them."""

    instance_id: str
    address: str  # host:port of the instance's Worker gRPC service
    model: str  # the served model name
    engine: str = "vllm"  # "vllm" or "sim"
    role: str = "unified"  # "unified", "prefill" or "decode"
    block_size: int = 32
    max_model_len: int = 2048
    incarnation: int = 0  # bumped each time the supervisor restarts this instance
    kv_bytes_per_block: int = 0  # what one KV block weighs on the wire (migration bytes); 0 unknown


@dataclass(frozen=True, slots=True)
class Membership:
    """A versioned snapshot of the live instances; versions only grow."""

    version: int
    instances: tuple[InstanceInfo, ...] = field(default_factory=tuple)


@dataclass(frozen=True, slots=True)
class KvSnapshot:
    """The full KV blocks of a running request, readable by another instance (migration pre-copy).

    ``token_ids`` are the tokens those blocks hold (a whole number of blocks, from the start of
    the sequence); ``kv_transfer_params`` is the opaque ticket the destination's engine uses to
    pull them (vLLM's NIXL ``kv_transfer_params``; JSON-able). Empty when nothing is full yet.
    """

    request_id: str
    instance_id: str
    token_ids: Sequence[int]
    kv_transfer_params: Mapping[str, Any]

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)


@dataclass(frozen=True, slots=True)
class SuspendedRequest:
    """A request stopped on its source instance with its KV blocks held for a destination.

    ``prompt_token_ids`` and ``sampling`` are the request as its client sent it (this leg's
    engine request), ``output_token_ids`` every token generated so far, as the source engine
    counted them: authoritative, possibly more than a stream consumer has seen. A destination
    admits ``prompt + outputs`` with ``max_tokens``/``min_tokens`` reduced by the outputs and
    pulls the KV with ``kv_transfer_params`` (empty: recompute). ``finish_reason`` is set when
    the request finished on its own before the suspend took effect; nothing is left to move.
    """

    request_id: str
    instance_id: str
    prompt_token_ids: Sequence[int]
    output_token_ids: Sequence[int]
    sampling: SamplingOptions
    kv_transfer_params: Mapping[str, Any] = field(default_factory=dict)
    finish_reason: FinishReason | None = None

    @property
    def num_tokens(self) -> int:
        """Tokens whose KV the destination needs: prompt plus outputs."""
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def request(self) -> EngineRequest:
        """The request as the source ran it (this leg's engine request, before its outputs)."""
        return EngineRequest(self.request_id, self.prompt_token_ids, self.sampling)

    def continuation(self) -> EngineRequest | None:
        """What a destination admits: :meth:`EngineRequest.continued` after the outputs."""
        return self.request.continued(self.output_token_ids)
