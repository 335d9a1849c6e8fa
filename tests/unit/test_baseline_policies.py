"""The comparison baselines: ``power_of_two``, ``consistent_hash`` and ``prefix_tree``."""

from __future__ import annotations

import random
from collections import Counter

from switchyard.messages import LoadReport, Membership, RoutingRequest, SamplingOptions
from switchyard.router.policies import Policy, RoutingDecision, RoutingOutcome, make_policy
from switchyard.router.policies.power_of_two import PowerOfTwoParams, PowerOfTwoPolicy
from switchyard.router.policies.prefix_tree import PrefixTreePolicy
from switchyard.router.registry import InstanceRegistry
from tests.helpers.builders import FakeClock, make_info, make_registry, make_report

_rng = random.Random(2)


def tokens(n: int, *, prefix: list[int] | None = None) -> list[int]:
    head = list(prefix or [])
    return head + [_rng.randrange(1, 50_000) for _ in range(n - len(head))]


def request(toks: list[int], rid: str = "r") -> RoutingRequest:
    return RoutingRequest(rid, "m", toks, SamplingOptions(max_tokens=4))


def send(policy: Policy, registry: InstanceRegistry, req: RoutingRequest) -> RoutingDecision:
    decision = policy.choose(req, registry.fleet("m"))
    state = registry.get(decision.instance_id)
    assert state is not None
    registry.on_dispatched(state, len(req.prompt_token_ids))
    policy.on_dispatched(req, decision)
    return decision


# -- power_of_two ---------------------------------------------------------------------------------


def test_power_of_two_picks_the_shorter_queue_of_two_distinct_draws() -> None:
    """Each decision compares two different instances and takes the one with fewer requests."""
    registry = make_registry(6)
    for i in range(6):
        registry.on_load_report(f"w{i}", make_report(f"w{i}", running=i * 3))
    policy = make_policy("power_of_two", {"seed": 1})
    for _ in range(200):
        d = policy.choose(request(tokens(10)), registry.fleet("m"))
        (a, qa), (b, qb) = d.estimates
        assert a != b and d.instance_id == a and qa <= qb and d.outcome is RoutingOutcome.LOAD


def test_power_of_two_repeats_with_the_same_seed_and_never_picks_the_heaviest() -> None:
    """Seeded draws repeat exactly; the most loaded instance always loses its comparison."""
    registry = make_registry(4)
    registry.on_load_report("w3", make_report("w3", running=50))
    fleet = registry.fleet("m")

    def picks(seed: int) -> list[str]:
        policy = PowerOfTwoPolicy(PowerOfTwoParams(seed=seed), clock=FakeClock())
        return [policy.choose(request([1]), fleet).instance_id for _ in range(300)]

    assert picks(7) == picks(7) != picks(8)
    assert Counter(picks(7))["w3"] == 0
    single = make_registry(1)
    assert make_policy("power_of_two").choose(request([1]), single.fleet("m")).instance_id == "w0"


def test_power_of_two_uses_an_injected_rng() -> None:
    """A caller-supplied ``random.Random`` drives the draws (for replaying a benchmark)."""
    fleet = make_registry(8).fleet("m")
    a = PowerOfTwoPolicy(PowerOfTwoParams(), clock=FakeClock(), rng=random.Random(99))
    b = PowerOfTwoPolicy(PowerOfTwoParams(seed=99), clock=FakeClock())
    assert [a.choose(request([1]), fleet).instance_id for _ in range(50)] == [
        b.choose(request([1]), fleet).instance_id for _ in range(50)
    ]


# -- consistent_hash ------------------------------------------------------------------------------


def test_consistent_hash_sends_a_shared_prefix_to_one_instance_whatever_the_load() -> None:
    """Same first K blocks: same instance, even when it is by far the busiest (no load awareness)."""
    registry = make_registry(5)
    policy = make_policy("consistent_hash", {"prefix_blocks": 2})
    prefix = tokens(64)
    owner = policy.choose(request(tokens(200, prefix=prefix)), registry.fleet("m")).instance_id
    registry.on_load_report(owner, make_report(owner, running=100, waiting=50))
    picks = {
        policy.choose(request(tokens(200, prefix=prefix)), registry.fleet("m")).instance_id for _ in range(20)
    }
    assert picks == {owner}
    spread = {policy.choose(request(tokens(200)), registry.fleet("m")).instance_id for _ in range(100)}
    assert len(spread) == 5


def test_consistent_hash_removal_moves_only_the_removed_instances_prefixes() -> None:
    """After a scale-in, prefixes owned by the survivors stay where they were."""
    registry = make_registry(5)
    policy = make_policy("consistent_hash")
    policy.on_membership(list(registry.membership.instances))
    reqs = [request(tokens(200)) for _ in range(300)]
    before = [policy.choose(r, registry.fleet("m")).instance_id for r in reqs]
    survivors = tuple(i for i in registry.membership.instances if i.instance_id != "w2")
    registry.apply(Membership(2, survivors))
    policy.on_membership(list(survivors))
    after = [policy.choose(r, registry.fleet("m")).instance_id for r in reqs]
    assert all(a == b for a, b in zip(before, after, strict=True) if a != "w2")
    assert "w2" not in after


# -- prefix_tree ----------------------------------------------------------------------------------


def test_prefix_tree_sends_a_long_shared_prefix_to_its_holder() -> None:
    """After one request, another sharing most of its prompt goes to the same instance."""
    registry = make_registry(4)
    policy = make_policy("prefix_tree", {"sample_stride": 1, "chunk_blocks": 4})
    prefix = tokens(1024)
    first = send(policy, registry, request(tokens(1100, prefix=prefix), "a")).instance_id
    for i in range(4):
        registry.on_load_report(f"w{i}", make_report(f"w{i}", running=2))
    d = policy.choose(request(tokens(1100, prefix=prefix), "b"), registry.fleet("m"))
    assert d.instance_id == first and d.outcome is RoutingOutcome.AFFINITY
    assert d.estimates == ((first, 1024.0),)


def test_prefix_tree_without_a_good_match_fills_the_smallest_tree() -> None:
    """Unrelated prompts go to the instance holding the least, so prefixes spread over the fleet."""
    registry = make_registry(3)
    policy = make_policy("prefix_tree")
    picks = [send(policy, registry, request(tokens(600), f"r{i}")).instance_id for i in range(3)]
    assert sorted(picks) == ["w0", "w1", "w2"]
    assert policy.choose(request(tokens(600)), registry.fleet("m")).outcome is RoutingOutcome.LOAD


def test_prefix_tree_takes_the_shortest_queue_when_load_is_out_of_balance() -> None:
    """A holder far busier than the rest (absolute and relative gap) loses to the shortest queue."""
    registry = make_registry(3)
    policy = make_policy("prefix_tree", {"balance_abs_threshold": 8, "balance_rel_threshold": 2.0})
    prefix = tokens(1024)
    holder = send(policy, registry, request(tokens(1100, prefix=prefix), "a")).instance_id
    registry.on_load_report(holder, make_report(holder, running=40))
    others = sorted({"w0", "w1", "w2"} - {holder})
    registry.on_load_report(others[0], make_report(others[0], running=3))
    registry.on_load_report(others[1], make_report(others[1], running=1))
    d = policy.choose(request(tokens(1100, prefix=prefix), "b"), registry.fleet("m"))
    assert d.instance_id == others[1] and d.reason.startswith("load out of balance")


def test_prefix_tree_memory_is_bounded_and_departed_instances_leave_it() -> None:
    """The tree never exceeds ``max_tree_chunks`` nodes; a removed instance is purged from it."""
    registry = make_registry(2)
    policy = make_policy("prefix_tree", {"max_tree_chunks": 50})
    assert isinstance(policy, PrefixTreePolicy)
    for i in range(40):
        send(policy, registry, request(tokens(2048), f"r{i}"))
    assert len(policy._tree) <= 50
    assert sum(policy._size.values()) == sum(len(h) for h in policy._tree.values())
    policy.on_membership([make_info("w1")])
    assert all(set(h) <= {"w1"} for h in policy._tree.values()) and "w0" not in policy._size


def test_baselines_read_only_reported_fields() -> None:
    """Load reports are all these baselines need besides membership (``reads`` checks it)."""
    fields = set(LoadReport.__dataclass_fields__)
    for name in ("power_of_two", "consistent_hash", "prefix_tree"):
        assert set(make_policy(name).reads) <= fields
