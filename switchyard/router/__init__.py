"""The router: instance registry, routing policies, the router core and its gRPC service.

Import the public names from here; the submodules are the implementation. Nothing in this
package imports vLLM, torch or Ray, so a router process stays light.
"""

from switchyard.router.core import RouterCore
from switchyard.router.grpc_server import RouterServicer, start_router_server
from switchyard.router.policies import (
    POLICIES,
    Policy,
    PolicyBase,
    PolicyParams,
    RoutingDecision,
    RoutingOutcome,
    make_policy,
    register_policy,
)
from switchyard.router.registry import FleetView, InstanceRegistry, InstanceState, MembershipDiff
from switchyard.router.worker_client import WorkerClient

__all__ = [
    "POLICIES",
    "FleetView",
    "InstanceRegistry",
    "InstanceState",
    "MembershipDiff",
    "Policy",
    "PolicyBase",
    "PolicyParams",
    "RouterCore",
    "RouterServicer",
    "RoutingDecision",
    "RoutingOutcome",
    "WorkerClient",
    "make_policy",
    "register_policy",
    "start_router_server",
]
