"""Builders for router tests: instances, load reports, requests and fleets in one line each."""

from __future__ import annotations

from switchyard.messages import InstanceInfo, LoadReport, Membership, RoutingRequest, SamplingOptions
from switchyard.router.registry import InstanceRegistry

__all__ = ["FakeClock", "make_info", "make_registry", "make_report", "make_request"]


class FakeClock:
    """A monotonic clock that moves only when the test says so."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def make_info(instance_id: str, *, model: str = "m", incarnation: int = 0) -> InstanceInfo:
    return InstanceInfo(instance_id, f"{instance_id}.invalid:1", model, engine="sim", incarnation=incarnation)


def make_report(
    instance_id: str, *, running: int = 0, waiting: int = 0, prefill_tokens: int = 0, kv_used: int = 0
) -> LoadReport:
    return LoadReport(
        instance_id,
        timestamp=0.0,
        num_running=running,
        num_waiting=waiting,
        waiting_prefill_tokens=prefill_tokens,
        kv_blocks_used=kv_used,
        kv_blocks_total=100,
    )


def make_request(
    request_id: str = "r", *, model: str = "m", tokens: int = 8, max_tokens: int = 4
) -> RoutingRequest:
    return RoutingRequest(
        request_id, model, list(range(1, tokens + 1)), SamplingOptions(max_tokens=max_tokens)
    )


def make_registry(n: int, *, model: str = "m", clock: FakeClock | None = None) -> InstanceRegistry:
    """A registry whose membership (version 1) is instances ``w0 .. w{n-1}`` serving ``model``."""
    registry = InstanceRegistry(clock=clock or FakeClock())
    registry.apply(Membership(1, tuple(make_info(f"w{i}", model=model) for i in range(n))))
    return registry
