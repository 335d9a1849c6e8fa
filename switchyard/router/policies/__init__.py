"""Routing policies, registered by name so configuration can pick one.

``@register_policy("name")`` puts a policy class into ``POLICIES``; ``make_policy`` validates
the parameters against the class's own ``Params`` model and builds it, turning every mistake
(unknown name, unknown or bad parameter, a ``reads`` field that load reports do not carry)
into a ``ConfigError`` at start-up rather than a failure mid-request. The built-in policies
are imported at the bottom of this module so that importing the package registers them.

This registry of *policies* is unrelated to ``router/registry.py``, the registry of
*instances*.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from pydantic import ValidationError

from switchyard.config import TTFT_SLO_PARAM, check_ttft_slo
from switchyard.errors import ConfigError
from switchyard.messages import LoadReport
from switchyard.router.policies.base import (
    Clock,
    Policy,
    PolicyBase,
    PolicyParams,
    RoutingDecision,
    RoutingOutcome,
)

__all__ = [
    "POLICIES",
    "Clock",
    "Policy",
    "PolicyBase",
    "PolicyParams",
    "RoutingDecision",
    "RoutingOutcome",
    "make_policy",
    "policy_params",
    "register_policy",
]

_LOAD_FIELDS = frozenset(f.name for f in dataclasses.fields(LoadReport))

POLICIES: dict[str, type[PolicyBase]] = {}
"""Registered policy name -> class. Filled by ``register_policy``; read it, do not write it."""

_P = TypeVar("_P", bound=type[PolicyBase])


def register_policy(name: str) -> Callable[[_P], _P]:
    """Class decorator: make a policy available to configuration under ``name``."""

    def decorate(cls: _P) -> _P:
        if name in POLICIES and POLICIES[name] is not cls:
            raise ConfigError(f"policy name {name!r} is already taken by {POLICIES[name].__qualname__}")
        unknown = cls.reads - _LOAD_FIELDS
        if unknown:
            raise ConfigError(f"policy {name!r} reads {sorted(unknown)}, which load reports do not carry")
        cls.name = name
        POLICIES[name] = cls
        return cls

    return decorate


def _policy_class(name: str) -> type[PolicyBase]:
    cls = POLICIES.get(name)
    if cls is None:
        raise ConfigError(f"unknown routing policy {name!r}; known policies: {', '.join(sorted(POLICIES))}")
    return cls


def policy_params(name: str, params: Mapping[str, Any] | None, *, ttft_slo_ms: float) -> dict[str, Any]:
    """``params`` of policy ``name`` with the router's TTFT SLO filled in, if the policy takes one.

    A policy takes it through a ``ttft_slo_ms`` parameter (``dualmap``'s SLO switch). The SLO
    belongs to the service (``RouterConfig.ttft_slo_ms``, an LLMService's ``slo.ttftMs``, a
    benchmark's ``--slo-ttft-ms``), so ``params`` may repeat it but not differ from it: a
    policy switching at another value would steer by an objective nothing else measures.
    Raises ``ConfigError`` for an unknown policy or a differing SLO.
    """
    merged = dict(params or {})
    if TTFT_SLO_PARAM in _policy_class(name).Params.model_fields:
        try:
            check_ttft_slo(merged, ttft_slo_ms)
        except ValueError as exc:
            raise ConfigError(f"routing policy {name!r}: {exc}") from None
        merged[TTFT_SLO_PARAM] = ttft_slo_ms
    return merged


def make_policy(
    name: str, params: Mapping[str, Any] | None = None, *, clock: Clock = time.monotonic
) -> Policy:
    """Build the policy registered as ``name`` with validated ``params``.

    Raises ``ConfigError`` naming the known policies for an unknown name, and carrying
    pydantic's field-level message for bad parameters.
    """
    cls = _policy_class(name)
    try:
        validated = cls.Params.model_validate(dict(params or {}))
    except ValidationError as exc:
        raise ConfigError(f"bad parameters for routing policy {name!r}: {exc}") from exc
    return cls(validated, clock=clock)


# Built-in policies register themselves on import; keep these after the definitions above.
from switchyard.router.policies import (  # noqa: E402, F401
    consistent_hash,
    dualmap,
    least_load,
    power_of_two,
    prefix_tree,
    round_robin,
)
