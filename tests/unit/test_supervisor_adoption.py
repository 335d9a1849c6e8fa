"""What a (re)started supervisor does with the instance actors it finds (issue #16 item 4).

The pure half of re-adoption: actor names, the adopt/drain/kill/start decision, and the record a
restarted supervisor resumes from. The Ray half runs in tests/integration/test_supervisor_*_ray.py.
"""

from __future__ import annotations

import pytest
from pydantic import SecretStr

from switchyard.config import EngineConfig
from switchyard.messages import InstanceInfo
from switchyard.workers.adoption import FoundInstance, InstanceName, plan_adoption
from switchyard.workers.supervisor import PoolSpec, SupervisorRecord


def found(instance_id: str, incarnation: int, *, serving: bool = True) -> FoundInstance:
    info = InstanceInfo(instance_id, f"127.0.0.1:{5000 + incarnation}", "m", incarnation=incarnation)
    return FoundInstance(InstanceName(instance_id, incarnation), info if serving else None)


def test_instance_names_round_trip_and_carry_pool_and_index() -> None:
    name = InstanceName("pre-fill-12", 3)
    assert str(name) == "instance/pre-fill-12/3"
    assert InstanceName.parse(str(name)) == name
    assert (name.pool, name.index) == ("pre-fill", 12)


@pytest.mark.parametrize(
    "other",
    [
        "supervisor-pool",
        "pool-0.0",
        "instance/pool-0",
        "instance/pool/0",
        "instance/pool-x/0",
        "instance/-0/1",
    ],
)
def test_other_actor_names_are_not_instances(other: str) -> None:
    assert InstanceName.parse(other) is None


def test_serving_instances_are_adopted_and_the_rest_started() -> None:
    plan = plan_adoption([found("p-1", 2)], pool="p", instances=3)
    assert [f.name.instance_id for f in plan.adopt] == ["p-1"]
    assert plan.missing == ("p-0", "p-2")
    assert plan.drain == plan.kill == ()
    assert plan.last_incarnation == {"p-1": 2}


def test_the_newest_serving_incarnation_wins_and_stragglers_are_killed() -> None:
    """An older incarnation still alive, or one not serving (mid-start, wrong token), is killed;
    its incarnation still counts, so the replacement's name is not one in use."""
    old, new, starting = found("p-0", 0), found("p-0", 1), found("p-0", 2, serving=False)
    plan = plan_adoption([old, starting, new], pool="p", instances=1)
    assert plan.adopt == (new,)
    assert set(plan.kill) == {old, starting}
    assert plan.missing == ()
    assert plan.last_incarnation == {"p-0": 2}


def test_an_instance_with_nothing_serving_is_missing() -> None:
    plan = plan_adoption([found("p-0", 4, serving=False)], pool="p", instances=1)
    assert plan.adopt == () and plan.missing == ("p-0",)
    assert plan.last_incarnation == {"p-0": 4}


def test_serving_instances_beyond_the_pool_size_are_drained_not_adopted() -> None:
    """A scale-in the dead supervisor had not finished: the surplus keeps draining."""
    plan = plan_adoption([found("p-0", 0), found("p-1", 0), found("p-2", 0)], pool="p", instances=1)
    assert [f.name.instance_id for f in plan.adopt] == ["p-0"]
    assert [f.name.instance_id for f in plan.drain] == ["p-1", "p-2"]
    assert plan.kill == ()


def test_other_pools_instances_are_left_alone() -> None:
    """Pool ``p`` and pool ``p-x`` share a prefix; ``p-x-0`` is not ``p``'s."""
    plan = plan_adoption([found("p-x-0", 0), found("q-0", 0)], pool="p", instances=1)
    assert plan.adopt == plan.drain == plan.kill == ()
    assert plan.missing == ("p-0",)
    assert plan.last_incarnation == {}


def test_the_record_keeps_spec_and_incarnations_but_never_the_token() -> None:
    token = SecretStr("s3cret-token-value")
    spec = PoolSpec(
        name="p", instances=3, engine=EngineConfig(kind="sim"), served_model_name="m", internal_token=token
    )
    record = SupervisorRecord(actor_id="abc", spec=spec, incarnations={"p-0": 2})
    dumped = record.dump()
    assert token.get_secret_value() not in dumped and "internal_token" not in dumped
    restored = SupervisorRecord.model_validate_json(dumped)
    assert restored.spec == spec.model_copy(update={"internal_token": None})
    assert (restored.actor_id, restored.incarnations) == ("abc", {"p-0": 2})
