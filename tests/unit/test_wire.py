"""Protobuf <-> message converters: everything survives a round trip through the wire format."""

from __future__ import annotations

import grpc
import pytest

from switchyard.api import wire
from switchyard.api.v1 import router_pb2, worker_pb2
from switchyard.errors import CapacityError, ContextLengthError, EngineDeadError, ModelNotFoundError
from switchyard.messages import (
    EngineOutput,
    EngineRequest,
    FinishReason,
    InstanceInfo,
    LoadReport,
    Membership,
    RoutingRequest,
    SamplingOptions,
)

SAMPLING = SamplingOptions(
    max_tokens=17,
    temperature=0.7,
    top_p=0.95,
    top_k=40,
    seed=1234,
    ignore_eos=True,
    stop_token_ids=(2, 3),
    min_tokens=4,
    presence_penalty=0.1,
    frequency_penalty=-0.3,
    repetition_penalty=1.1,
)


def _through_bytes(pb: object) -> object:
    """Serialise and parse, so tests cover the real wire and not just object copies."""
    parsed = type(pb)()
    parsed.ParseFromString(pb.SerializeToString())  # type: ignore[attr-defined]
    return parsed


@pytest.mark.parametrize("sampling", [SAMPLING, SamplingOptions(max_tokens=1)], ids=["all-set", "defaults"])
def test_sampling_round_trip(sampling: SamplingOptions) -> None:
    """Every sampling field survives, float32 fields included (0.7 comes back as 0.7)."""
    assert wire.sampling_from_pb(_through_bytes(wire.sampling_to_pb(sampling))) == sampling  # type: ignore[arg-type]


def test_seed_none_and_zero_are_different() -> None:
    """An unset seed stays None; seed 0 stays 0 (the proto field is optional)."""
    assert wire.sampling_from_pb(wire.sampling_to_pb(SamplingOptions(max_tokens=1))).seed is None
    assert wire.sampling_from_pb(wire.sampling_to_pb(SamplingOptions(max_tokens=1, seed=0))).seed == 0


def test_engine_and_routing_requests_round_trip() -> None:
    """Requests keep id, tokens and sampling; a routing request's id can be assigned on the way in."""
    er = EngineRequest("r1", [1, 2, 3], SAMPLING)
    back = wire.engine_request_from_pb(_through_bytes(wire.engine_request_to_pb(er)))  # type: ignore[arg-type]
    assert (back.request_id, list(back.prompt_token_ids), back.sampling) == ("r1", [1, 2, 3], SAMPLING)

    rr = RoutingRequest("", "m", [9, 8], SAMPLING)
    pb = wire.routing_request_to_pb(rr)
    assert isinstance(pb, router_pb2.RouteRequest)
    assert wire.routing_request_from_pb(pb).request_id == ""
    assigned = wire.routing_request_from_pb(pb, request_id="fresh")
    assert (assigned.request_id, assigned.model, list(assigned.prompt_token_ids)) == ("fresh", "m", [9, 8])


@pytest.mark.parametrize(
    "out",
    [
        EngineOutput("r", [5, 6], num_prompt_tokens=10, num_cached_tokens=4, instance_id="w0"),
        EngineOutput("r", [], True, FinishReason.STOP, 10, 4, "w1"),
        EngineOutput("r", [7], True, FinishReason.LENGTH),
        EngineOutput("r", [], True, FinishReason.ABORT),
    ],
    ids=["running", "stop", "length", "abort"],
)
def test_output_round_trip(out: EngineOutput) -> None:
    """Output deltas round-trip; a running chunk's empty finish_reason becomes None."""
    back = wire.output_from_pb(_through_bytes(wire.output_to_pb(out)))  # type: ignore[arg-type]
    assert back == EngineOutput(
        out.request_id, list(out.token_ids), out.finished, out.finish_reason,
        out.num_prompt_tokens, out.num_cached_tokens, out.instance_id,
    )  # fmt: skip


def test_output_instance_id_override() -> None:
    """The worker stamps its own instance id on every chunk."""
    assert wire.output_to_pb(EngineOutput("r", [1]), instance_id="w9").instance_id == "w9"


def test_load_report_round_trip_and_instance_fill_in() -> None:
    """All load fields survive; an engine that does not know its id gets the worker's."""
    report = LoadReport("w0", 12.5, 3, 4, 500, 60, 100, 0.021, 1000, 400, 2)
    assert wire.load_report_from_pb(_through_bytes(wire.load_report_to_pb(report))) == report  # type: ignore[arg-type]
    anonymous = LoadReport("", 1.0)
    assert wire.load_report_to_pb(anonymous, instance_id="w7").instance_id == "w7"
    assert wire.load_report_to_pb(report, instance_id="w7").instance_id == "w0"


def test_instance_info_and_membership_round_trip() -> None:
    """Membership (the InstanceList on the wire) keeps version, order and every instance field."""
    infos = (
        InstanceInfo("w0", "10.0.0.1:5000", "m", "vllm", "prefill", 16, 8192, 3, kv_bytes_per_block=65536),
        InstanceInfo("w1", "10.0.0.2:5000", "m"),
    )
    assert wire.instance_info_from_pb(wire.instance_info_to_pb(infos[0])) == infos[0]
    membership = Membership(42, infos)
    pb = _through_bytes(wire.membership_to_pb(membership))
    assert isinstance(pb, router_pb2.InstanceList)
    assert wire.membership_from_pb(pb) == membership
    assert isinstance(wire.instance_info_to_pb(infos[1]), worker_pb2.InstanceInfo)


@pytest.mark.parametrize(
    ("exc", "code"),
    [
        (ModelNotFoundError("no such model"), grpc.StatusCode.NOT_FOUND),
        (ContextLengthError("too long"), grpc.StatusCode.INVALID_ARGUMENT),
        (CapacityError("busy"), grpc.StatusCode.UNAVAILABLE),
        (EngineDeadError("gone"), grpc.StatusCode.UNAVAILABLE),
    ],
)
def test_status_for_our_errors_keeps_the_message(exc: Exception, code: grpc.StatusCode) -> None:
    """Our errors map through the one table and keep their client-facing message."""
    assert wire.status_for_error(exc) == (code, str(exc))


def test_status_for_foreign_errors_hides_details() -> None:
    """A bug's exception becomes INTERNAL without leaking its text."""
    assert wire.status_for_error(KeyError("/secret/path")) == (grpc.StatusCode.INTERNAL, "internal error")
