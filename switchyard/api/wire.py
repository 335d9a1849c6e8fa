"""The one place where protobuf messages become Switchyard messages and back.

Servicers and clients never touch protobuf fields themselves: they call these converters, so
a change to the wire contract (``protos/switchyard/v1``) is absorbed here and nowhere else.
The outgoing error translation for gRPC (our error tree to a status code) lives here too,
because both servicers need exactly the same table.

Cost note: the per-chunk converters (``output_to_pb``/``output_from_pb``) run once per
streamed delta on the hot path; they copy only the delta's token IDs (a handful per chunk)
and build one object, nothing else.

The ``Worker.Dispatch`` stream (many requests on one call) adds its messages here too: a
start or an abort going to the worker (``DispatchAction``s, batched in a ``DispatchRequest``;
chunks come back batched in a ``DispatchReply``), and a request's error riding on its last
chunk (``error_chunk``/``chunk_status``), so a per-request failure crosses that stream with the
same status code and details a ``Generate`` call would have ended with.
"""

from __future__ import annotations

import json
from typing import Any

import grpc

from switchyard.api.v1 import router_pb2, worker_pb2
from switchyard.errors import SwitchyardError, grpc_code_name
from switchyard.messages import (
    EngineOutput,
    EngineRequest,
    FinishReason,
    InstanceInfo,
    KvSnapshot,
    LoadReport,
    Membership,
    RoutingRequest,
    SamplingOptions,
    SuspendedRequest,
)

__all__ = [
    "chunk_status",
    "dispatch_abort_to_pb",
    "dispatch_from_pb",
    "dispatch_start_to_pb",
    "engine_request_from_pb",
    "engine_request_to_pb",
    "error_chunk",
    "instance_info_from_pb",
    "instance_info_to_pb",
    "kv_snapshot_from_pb",
    "kv_snapshot_to_pb",
    "load_report_from_pb",
    "load_report_to_pb",
    "membership_from_pb",
    "membership_to_pb",
    "output_from_pb",
    "output_to_pb",
    "routing_request_from_pb",
    "routing_request_to_pb",
    "sampling_from_pb",
    "sampling_to_pb",
    "status_for_error",
    "suspended_from_pb",
    "suspended_to_pb",
]

_FINISH_REASONS: dict[str, FinishReason] = {r.value: r for r in FinishReason}


def _f32(value: float) -> float:
    """Undo float32 widening: 0.7 travels as 0.699999988 and comes back as 0.7.

    Sampling floats are ``float`` fields in the proto (float32); seven significant digits are
    all a float32 holds, so this recovers the value the sender wrote.
    """
    return float(f"{value:.7g}")


# -- sampling and requests ----------------------------------------------------------------


def sampling_to_pb(s: SamplingOptions) -> worker_pb2.SamplingParams:
    """Sampling options as the wire's ``SamplingParams``; ``seed`` stays unset when None."""
    pb = worker_pb2.SamplingParams(
        max_tokens=s.max_tokens,
        temperature=s.temperature,
        top_p=s.top_p,
        top_k=s.top_k,
        ignore_eos=s.ignore_eos,
        stop_token_ids=s.stop_token_ids,
        min_tokens=s.min_tokens,
        presence_penalty=s.presence_penalty,
        frequency_penalty=s.frequency_penalty,
        repetition_penalty=s.repetition_penalty,
    )
    if s.seed is not None:
        pb.seed = s.seed
    return pb


def sampling_from_pb(pb: worker_pb2.SamplingParams) -> SamplingOptions:
    """The inverse of ``sampling_to_pb``."""
    return SamplingOptions(
        max_tokens=pb.max_tokens,
        temperature=_f32(pb.temperature),
        top_p=_f32(pb.top_p),
        top_k=pb.top_k,
        seed=pb.seed if pb.HasField("seed") else None,
        ignore_eos=pb.ignore_eos,
        stop_token_ids=tuple(pb.stop_token_ids),
        min_tokens=pb.min_tokens,
        presence_penalty=_f32(pb.presence_penalty),
        frequency_penalty=_f32(pb.frequency_penalty),
        repetition_penalty=_f32(pb.repetition_penalty),
    )


def engine_request_to_pb(req: EngineRequest) -> worker_pb2.GenerateRequest:
    """An engine request as the Worker service's ``GenerateRequest``."""
    return worker_pb2.GenerateRequest(
        request_id=req.request_id,
        prompt_token_ids=req.prompt_token_ids,
        sampling=sampling_to_pb(req.sampling),
    )


def engine_request_from_pb(pb: worker_pb2.GenerateRequest) -> EngineRequest:
    """The inverse of ``engine_request_to_pb``; token IDs are copied out of the message."""
    return EngineRequest(
        request_id=pb.request_id,
        prompt_token_ids=list(pb.prompt_token_ids),
        sampling=sampling_from_pb(pb.sampling),
    )


def routing_request_to_pb(req: RoutingRequest) -> router_pb2.RouteRequest:
    """A routing request as the Router service's ``RouteRequest``."""
    return router_pb2.RouteRequest(
        request_id=req.request_id,
        model=req.model,
        prompt_token_ids=req.prompt_token_ids,
        sampling=sampling_to_pb(req.sampling),
    )


def routing_request_from_pb(pb: router_pb2.RouteRequest, *, request_id: str | None = None) -> RoutingRequest:
    """The inverse of ``routing_request_to_pb``; ``request_id`` overrides the message's (assigned ids)."""
    return RoutingRequest(
        request_id=pb.request_id if request_id is None else request_id,
        model=pb.model,
        prompt_token_ids=list(pb.prompt_token_ids),
        sampling=sampling_from_pb(pb.sampling),
    )


# -- streamed outputs (hot path) ------------------------------------------------------------


def output_to_pb(out: EngineOutput, *, instance_id: str | None = None) -> worker_pb2.GenerateChunk:
    """One output delta as a ``GenerateChunk``; ``instance_id`` overrides the output's own."""
    return worker_pb2.GenerateChunk(
        request_id=out.request_id,
        token_ids=out.token_ids,
        finished=out.finished,
        finish_reason=out.finish_reason.value if out.finish_reason is not None else "",
        num_prompt_tokens=out.num_prompt_tokens,
        num_cached_tokens=out.num_cached_tokens,
        instance_id=out.instance_id if instance_id is None else instance_id,
    )


def output_from_pb(pb: worker_pb2.GenerateChunk) -> EngineOutput:
    """The inverse of ``output_to_pb``; an empty ``finish_reason`` means still running."""
    return EngineOutput(
        request_id=pb.request_id,
        token_ids=list(pb.token_ids),
        finished=pb.finished,
        finish_reason=_FINISH_REASONS.get(pb.finish_reason) if pb.finish_reason else None,
        num_prompt_tokens=pb.num_prompt_tokens,
        num_cached_tokens=pb.num_cached_tokens,
        instance_id=pb.instance_id,
    )


# -- the Dispatch stream ------------------------------------------------------------------------

_STATUS_BY_VALUE: dict[int, grpc.StatusCode] = {code.value[0]: code for code in grpc.StatusCode}


def dispatch_start_to_pb(req: EngineRequest) -> worker_pb2.DispatchAction:
    """Start ``req`` on a Dispatch stream."""
    return worker_pb2.DispatchAction(start=engine_request_to_pb(req))


def dispatch_abort_to_pb(request_id: str) -> worker_pb2.DispatchAction:
    """Abort a request started on the same Dispatch stream."""
    return worker_pb2.DispatchAction(abort=worker_pb2.AbortRequest(request_id=request_id))


def dispatch_from_pb(pb: worker_pb2.DispatchAction) -> EngineRequest | str | None:
    """A Dispatch action as the worker acts on it: the request to start, the id of the request
    to abort (a ``str``), or None for an action with neither (a newer client's kind)."""
    kind = pb.WhichOneof("kind")
    if kind == "start":
        return engine_request_from_pb(pb.start)
    if kind == "abort":
        return str(pb.abort.request_id)
    return None


def error_chunk(request_id: str, code: grpc.StatusCode, details: str) -> worker_pb2.GenerateChunk:
    """The chunk that ends a failed request on a Dispatch stream (``code`` from ``status_for_error``)."""
    return worker_pb2.GenerateChunk(request_id=request_id, error_code=code.value[0], error_message=details)


def chunk_status(pb: worker_pb2.GenerateChunk) -> tuple[grpc.StatusCode, str] | None:
    """The status a chunk ends its request with, or None for a chunk of a request still fine.

    Note: read once per chunk consumed from a Dispatch stream; one int field check when fine.
    """
    value = pb.error_code
    if not value:
        return None
    code = _STATUS_BY_VALUE.get(value, grpc.StatusCode.UNKNOWN)
    return code, pb.error_message or code.name


# -- migration ----------------------------------------------------------------------------------


def _ticket_from_json(text: str) -> dict[str, Any]:
    value = json.loads(text) if text else {}
    return value if isinstance(value, dict) else {}


def kv_snapshot_to_pb(s: KvSnapshot) -> worker_pb2.KvSnapshot:
    """A pre-copy snapshot on the wire; the engine's ticket travels as JSON."""
    return worker_pb2.KvSnapshot(
        request_id=s.request_id,
        instance_id=s.instance_id,
        token_ids=s.token_ids,
        kv_transfer_params_json=json.dumps(dict(s.kv_transfer_params)) if s.kv_transfer_params else "",
    )


def kv_snapshot_from_pb(pb: worker_pb2.KvSnapshot) -> KvSnapshot:
    return KvSnapshot(
        request_id=pb.request_id,
        instance_id=pb.instance_id,
        token_ids=tuple(pb.token_ids),
        kv_transfer_params=_ticket_from_json(pb.kv_transfer_params_json),
    )


def suspended_to_pb(s: SuspendedRequest) -> worker_pb2.SuspendedRequest:
    """A suspended request on the wire (source -> router -> destination)."""
    return worker_pb2.SuspendedRequest(
        request_id=s.request_id,
        instance_id=s.instance_id,
        prompt_token_ids=s.prompt_token_ids,
        output_token_ids=s.output_token_ids,
        sampling=sampling_to_pb(s.sampling),
        kv_transfer_params_json=json.dumps(dict(s.kv_transfer_params)) if s.kv_transfer_params else "",
        finish_reason=s.finish_reason.value if s.finish_reason is not None else "",
    )


def suspended_from_pb(pb: worker_pb2.SuspendedRequest) -> SuspendedRequest:
    return SuspendedRequest(
        request_id=pb.request_id,
        instance_id=pb.instance_id,
        prompt_token_ids=tuple(pb.prompt_token_ids),
        output_token_ids=tuple(pb.output_token_ids),
        sampling=sampling_from_pb(pb.sampling),
        kv_transfer_params=_ticket_from_json(pb.kv_transfer_params_json),
        finish_reason=_FINISH_REASONS.get(pb.finish_reason) if pb.finish_reason else None,
    )


# -- load, identity, membership ---------------------------------------------------------------


def load_report_to_pb(r: LoadReport, *, instance_id: str | None = None) -> worker_pb2.LoadReport:
    """A load report on the wire; ``instance_id`` fills in for engines that do not know theirs."""
    return worker_pb2.LoadReport(
        instance_id=r.instance_id or (instance_id or ""),
        timestamp=r.timestamp,
        num_running=r.num_running,
        num_waiting=r.num_waiting,
        waiting_prefill_tokens=r.waiting_prefill_tokens,
        kv_blocks_used=r.kv_blocks_used,
        kv_blocks_total=r.kv_blocks_total,
        step_time_s=r.step_time_s,
        prefix_cache_queries_total=r.prefix_cache_queries_total,
        prefix_cache_hits_total=r.prefix_cache_hits_total,
        num_preemptions_total=r.num_preemptions_total,
    )


def load_report_from_pb(pb: worker_pb2.LoadReport) -> LoadReport:
    """The inverse of ``load_report_to_pb``."""
    return LoadReport(
        instance_id=pb.instance_id,
        timestamp=pb.timestamp,
        num_running=pb.num_running,
        num_waiting=pb.num_waiting,
        waiting_prefill_tokens=pb.waiting_prefill_tokens,
        kv_blocks_used=pb.kv_blocks_used,
        kv_blocks_total=pb.kv_blocks_total,
        step_time_s=pb.step_time_s,
        prefix_cache_queries_total=pb.prefix_cache_queries_total,
        prefix_cache_hits_total=pb.prefix_cache_hits_total,
        num_preemptions_total=pb.num_preemptions_total,
    )


def instance_info_to_pb(info: InstanceInfo) -> worker_pb2.InstanceInfo:
    """Identity and static facts of an instance on the wire."""
    return worker_pb2.InstanceInfo(
        instance_id=info.instance_id,
        address=info.address,
        model=info.model,
        engine=info.engine,
        role=info.role,
        block_size=info.block_size,
        max_model_len=info.max_model_len,
        incarnation=info.incarnation,
        kv_bytes_per_block=info.kv_bytes_per_block,
    )


def instance_info_from_pb(pb: worker_pb2.InstanceInfo) -> InstanceInfo:
    """The inverse of ``instance_info_to_pb``."""
    return InstanceInfo(
        instance_id=pb.instance_id,
        address=pb.address,
        model=pb.model,
        engine=pb.engine,
        role=pb.role,
        block_size=pb.block_size,
        max_model_len=pb.max_model_len,
        incarnation=pb.incarnation,
        kv_bytes_per_block=pb.kv_bytes_per_block,
    )


def membership_to_pb(m: Membership) -> router_pb2.InstanceList:
    """A membership snapshot as the Router service's ``InstanceList``."""
    return router_pb2.InstanceList(version=m.version, instances=[instance_info_to_pb(i) for i in m.instances])


def membership_from_pb(pb: router_pb2.InstanceList) -> Membership:
    """The inverse of ``membership_to_pb``."""
    return Membership(version=pb.version, instances=tuple(instance_info_from_pb(i) for i in pb.instances))


# -- errors leaving a servicer ------------------------------------------------------------------


def status_for_error(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status code and details a servicer sends for ``exc`` (the one outgoing table).

    Our own errors map through ``errors.grpc_code_name`` and keep their message, which was
    written for clients. Anything else is a bug on this side: it becomes ``INTERNAL`` with a
    generic message, so internals (paths, reprs) never leak to callers; the servicer logs it.
    """
    if isinstance(exc, SwitchyardError):
        return grpc.StatusCode[grpc_code_name(exc)], exc.message
    return grpc.StatusCode.INTERNAL, "internal error"
