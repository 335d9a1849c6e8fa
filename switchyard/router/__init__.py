"""The router: instance registry, routing policies, the router core and its gRPC service.

Import the public names from here; the submodules are the implementation. Nothing in this
package imports vLLM, torch or Ray, so a router process stays light.
"""

from switchyard.router.core import RouterCore
from switchyard.router.drain import DrainResult
from switchyard.router.grpc_server import RouterServicer, start_router_server
from switchyard.router.policies import (
    POLICIES,
    Policy,
    PolicyBase,
    PolicyParams,
    RoutingDecision,
    RoutingOutcome,
    make_policy,
    policy_params,
    register_policy,
)
from switchyard.router.rebalancer import Move, Rebalancer, plan_rebalance
from switchyard.router.registry import FleetView, InstanceRegistry, InstanceState, MembershipDiff
from switchyard.router.worker_client import WorkerClient

__all__ = [
    "POLICIES",
    "DrainResult",
    "FleetView",
    "InstanceRegistry",
    "InstanceState",
    "MembershipDiff",
    "Move",
    "Policy",
    "PolicyBase",
    "PolicyParams",
    "Rebalancer",
    "RouterCore",
    "RouterServicer",
    "RoutingDecision",
    "RoutingOutcome",
    "WorkerClient",
    "make_policy",
    "plan_rebalance",
    "policy_params",
    "register_policy",
    "start_router_server",
]
