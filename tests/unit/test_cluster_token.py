"""Which internal token a router's pools use: given, adopted from a joined cluster, or generated.

On a joined Ray cluster (Kubernetes) the pools' supervisors are detached and shared: they
outlive the router that started them, and their instances accept only the token they started
with. A router with no token of its own must therefore adopt theirs (a token generated per
router process would lock out every replica but the first, and the first after a restart),
and a router given another token must be stopped at start-up with what to do.
"""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import SecretStr

from switchyard.config import EngineConfig
from switchyard.errors import ConfigError
from switchyard.workers import local_cluster
from switchyard.workers.supervisor import PoolSpec

A = SecretStr("token-of-the-running-pools-0001")
B = SecretStr("another-token-entirely-000000002")


def spec(name: str) -> PoolSpec:
    return PoolSpec(name=name, engine=EngineConfig(kind="sim"), served_model_name="m")


class _Remote:
    def __init__(self, value: SecretStr | None) -> None:
        self.value = value

    async def remote(self) -> SecretStr | None:
        return self.value


class FakeSupervisor:
    def __init__(self, token: SecretStr | None) -> None:
        self.internal_token = _Remote(token)


@pytest.fixture
def running(monkeypatch: pytest.MonkeyPatch) -> dict[str, FakeSupervisor]:
    """Supervisors "running" on the cluster, by pool name (ray.get_actor is faked)."""
    actors: dict[str, FakeSupervisor] = {}

    def get_actor(name: str, namespace: str) -> Any:
        assert namespace == "switchyard"
        try:
            return actors[name.removeprefix("supervisor-")]
        except KeyError:
            raise ValueError(f"no actor {name}") from None

    monkeypatch.setattr(local_cluster.ray, "get_actor", get_actor)
    return actors


async def test_local_runs_use_the_given_token_or_a_fresh_one(running: dict[str, FakeSupervisor]) -> None:
    running["a"] = FakeSupervisor(B)  # ignored: a local Ray is this process's own
    assert await local_cluster._cluster_token([spec("a")], A, shared=False) == A
    first = await local_cluster._cluster_token([spec("a")], None, shared=False)
    second = await local_cluster._cluster_token([spec("a")], None, shared=False)
    assert first != second and first not in (A, B)


async def test_a_joining_router_without_a_token_adopts_the_running_pools_token(
    running: dict[str, FakeSupervisor],
) -> None:
    running["a"] = FakeSupervisor(A)
    assert await local_cluster._cluster_token([spec("a"), spec("new")], None, shared=True) == A


async def test_the_first_router_on_a_cluster_generates_one(running: dict[str, FakeSupervisor]) -> None:
    token = await local_cluster._cluster_token([spec("a")], None, shared=True)
    assert len(token.get_secret_value()) >= 43


async def test_a_router_given_another_token_is_refused_with_what_to_do(
    running: dict[str, FakeSupervisor],
) -> None:
    running["a"] = FakeSupervisor(A)
    assert await local_cluster._cluster_token([spec("a")], A, shared=True) == A
    with pytest.raises(
        ConfigError, match=r"pools \['a'\] already run .* with another internal token"
    ) as raised:
        await local_cluster._cluster_token([spec("a")], B, shared=True)
    assert A.get_secret_value() not in str(raised.value) and B.get_secret_value() not in str(raised.value)


async def test_pools_with_different_tokens_cannot_share_a_router(running: dict[str, FakeSupervisor]) -> None:
    running["a"], running["b"] = FakeSupervisor(A), FakeSupervisor(B)
    with pytest.raises(ConfigError, match="different internal tokens"):
        await local_cluster._cluster_token([spec("a"), spec("b")], None, shared=True)


async def test_a_supervisor_keeps_the_token_its_instances_started_with() -> None:
    """Another router replica applies its spec (which may carry no token): the token stays."""
    from switchyard.workers.supervisor import _SupervisorImpl

    supervisor = _SupervisorImpl(spec("a").model_copy(update={"internal_token": A}))
    await supervisor.apply(spec("a").model_copy(update={"instances": 3}))
    assert await supervisor.internal_token() == A
