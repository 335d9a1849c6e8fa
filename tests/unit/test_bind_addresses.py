"""Internal ports bind loopback or the one address they advertise, never every interface.

The router's gRPC port and each worker's are internal: reachable by whoever the network lets
through, and authenticated only by the internal token. ``--host`` exposing the gateway must
not expose the router's port with it, and a worker on a joined cluster binds the node (pod)
IP it advertises rather than ``0.0.0.0``.
"""

from __future__ import annotations

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from switchyard.cli import _build_parser, _serve_config
from switchyard.config import EngineConfig
from switchyard.workers import instance_actor


def test_gateway_host_does_not_move_the_router_grpc_port() -> None:
    config = _serve_config(_build_parser().parse_args(["serve", "--host", "0.0.0.0"]))
    assert (config.gateway.host, config.router.grpc_host) == ("0.0.0.0", "127.0.0.1")
    config = _serve_config(_build_parser().parse_args(["serve", "--router-host", "10.1.2.3"]))
    assert (config.gateway.host, config.router.grpc_host) == ("127.0.0.1", "10.1.2.3")


async def _serving(address: str) -> bool:
    async with grpc.aio.insecure_channel(address) as channel:
        try:
            reply = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=2
            )
        except grpc.aio.AioRpcError as exc:
            assert exc.code() is grpc.StatusCode.UNAVAILABLE
            return False
    return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)


async def test_a_worker_on_a_cluster_binds_only_the_node_ip_it_advertises(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``host=None`` (a joined cluster): the node IP Ray reports is both the advertised and the
    bound address. 127.0.0.2 stands in for the pod IP: were every interface bound, the port
    would also answer on 127.0.0.1."""
    monkeypatch.setattr(instance_actor.ray.util, "get_node_ip_address", lambda: "127.0.0.2")
    actor = instance_actor._InstanceActorImpl()
    info = await actor.start(
        EngineConfig(kind="sim"),
        instance_id="p-0",
        incarnation=0,
        model_dir=None,
        host=None,
        served_model_name="m",
    )
    try:
        host, port = info.address.rsplit(":", 1)
        assert host == "127.0.0.2"
        assert await _serving(info.address)
        assert not await _serving(f"127.0.0.1:{port}"), "the worker port is bound on other interfaces too"
    finally:
        await actor.stop(0)
