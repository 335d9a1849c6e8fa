"""``SharedPrefixes`` and DualMap's adaptive key: keys start past popular heads, stay put for a
conversation, spread over the fleet, and agree across router replicas that share no state."""

from __future__ import annotations

import random

from switchyard.messages import RoutingRequest, SamplingOptions
from switchyard.router.policies import make_policy
from switchyard.router.policies.dualmap import DualMapPolicy
from switchyard.router.shared_prefixes import SharedPrefixes
from tests.helpers.builders import FakeClock, make_registry

BLOCK = 32  # make_info's block size
_rng = random.Random(5)


def tokens(n: int) -> list[int]:
    return [_rng.randrange(1, 50_000) for _ in range(n)]


def request(toks: list[int], rid: str) -> RoutingRequest:
    return RoutingRequest(rid, "m", toks, SamplingOptions(max_tokens=4))


def dualmap(**params: object) -> DualMapPolicy:
    policy = make_policy("dualmap", {"record_sample_stride": 1, **params}, clock=FakeClock())
    assert isinstance(policy, DualMapPolicy)
    return policy


def chain(*parts: int) -> list[int]:
    """Fingerprints of a path: each level names its whole prefix, so a tuple of the parts."""
    return [hash(tuple(parts[: k + 1])) for k in range(len(parts))]


def test_a_popular_head_that_branches_is_shared_and_its_inside_is_walked_past() -> None:
    shared = SharedPrefixes(fanout=4, min_count=4)
    for conv in range(40):  # 40 conversations behind a three-level head
        shared.observe(chain(1, 2, 3, 100 + conv, 7), 0.1, depth=5)
    path = chain(1, 2, 3, 999, 7)
    assert shared.is_branch_point(path[2], 0.1)  # the head's last level branches 40 ways
    assert not shared.is_branch_point(path[1], 0.1)  # inside the head: one way on
    assert shared.key_level(path, 0.1, depth=5) == 3  # the first level of the request's own
    assert shared.key_level(path, 0.1, depth=2) == 0  # not looked that deep: no head known


def test_a_long_conversation_is_not_a_branch_point() -> None:
    """Every turn extends the previous one: its prefix continues one way however often it is seen."""
    shared = SharedPrefixes(fanout=4, min_count=4)
    turns = [chain(*range(50, 50 + k)) for k in range(3, 30)]
    for turn in turns:
        shared.observe(turn, 0.01, depth=64)
    assert all(shared.key_level(turn, 0.01, depth=64) == 0 for turn in turns)


def test_an_unpopular_branching_prefix_stays_together_and_popularity_decays() -> None:
    shared = SharedPrefixes(fanout=2, min_count=1, half_life=16)
    for conv in range(8):
        shared.observe(chain(9, conv), 0.05, depth=2)
    for other in range(200):  # most traffic elsewhere, and the old observations fade
        shared.observe(chain(1000 + other, 1), 0.05, depth=2)
    assert not shared.is_branch_point(chain(9)[0], 0.05)


def test_memory_is_bounded() -> None:
    shared = SharedPrefixes(capacity=64)
    for n in range(1000):
        shared.observe(chain(n, n + 1), 0.0, depth=2)
    assert len(shared) <= 2 * 64


def conversations(head: list[int], n: int) -> list[RoutingRequest]:
    return [request(head + tokens(40 * BLOCK), f"c{k}") for k in range(n)]


def test_requests_behind_one_system_prompt_spread_over_the_fleet() -> None:
    """With a 2k-token head on every request, the old key gives every request the same two
    candidates; the adaptive key spreads the conversations behind it over all eight."""
    head = tokens(64 * BLOCK)
    registry = make_registry(8)
    fleet = registry.fleet("m")
    for key, expected in (("head", 2), ("adaptive", 8)):
        policy = dualmap(key=key)
        for req in conversations(head, 60):  # warm-up: the router learns the head
            policy.on_dispatched(req, policy.choose(req, fleet))
        seen = {c for req in conversations(head, 60) for c in policy.choose(req, fleet).candidates}
        assert len(seen) == expected, (key, seen)


def test_turns_of_one_conversation_keep_their_key() -> None:
    head = tokens(64 * BLOCK)
    registry = make_registry(8)
    fleet = registry.fleet("m")
    policy = dualmap()
    for req in conversations(head, 60):
        policy.on_dispatched(req, policy.choose(req, fleet))
    turn = head + tokens(40 * BLOCK)
    pairs = set()
    for k in range(6):  # each turn: the previous prompt, an answer and a new message
        turn = turn + tokens(20 * BLOCK)
        decision = policy.choose(request(turn, f"t{k}"), fleet)
        pairs.add(frozenset(decision.candidates))
        policy.on_dispatched(request(turn, f"t{k}"), decision)
    assert len(pairs) == 1


def test_replicas_with_random_shares_of_the_traffic_agree_on_candidates() -> None:
    """Two routers, each seeing a random half of the same stream and nothing of each other,
    give (almost) every new request the same two candidates."""
    heads = [tokens(48 * BLOCK) for _ in range(3)]
    registry = make_registry(8)
    fleet = registry.fleet("m")
    replicas = [dualmap(), dualmap()]
    pick = random.Random(1)
    stream = [request(heads[k % 3] + tokens(36 * BLOCK), f"s{k}") for k in range(300)]
    for req in stream:
        policy = replicas[pick.randrange(2)]
        policy.on_dispatched(req, policy.choose(req, fleet))
    probes = [request(heads[k % 3] + tokens(36 * BLOCK), f"p{k}") for k in range(90)]
    agree = sum(
        frozenset(replicas[0].choose(p, fleet).candidates)
        == frozenset(replicas[1].choose(p, fleet).candidates)
        for p in probes
    )
    assert agree == len(probes)
