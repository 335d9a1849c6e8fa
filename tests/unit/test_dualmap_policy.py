"""The ``dualmap`` policy as a pure decision function over a FleetView (no servers, fake clock)."""

from __future__ import annotations

import random
import statistics
import time

import pytest

from switchyard.errors import ConfigError
from switchyard.messages import LoadReport, Membership, RoutingRequest, SamplingOptions
from switchyard.router.policies import RoutingDecision, RoutingOutcome, make_policy
from switchyard.router.policies.dualmap import DualMapParams, DualMapPolicy
from switchyard.router.registry import InstanceRegistry
from switchyard.router.ttft_estimator import TtftFeedback
from tests.helpers.builders import FakeClock, make_info, make_registry

BLOCK = 32  # make_info's block size
PARAMS = {"prefix_blocks": 2, "record_chunk_blocks": 4, "record_sample_stride": 1}
_rng = random.Random(11)


def tokens(n: int, *, prefix: list[int] | None = None) -> list[int]:
    head = list(prefix or [])
    return head + [_rng.randrange(1, 50_000) for _ in range(n - len(head))]


def request(toks: list[int], rid: str = "r") -> RoutingRequest:
    return RoutingRequest(rid, "m", toks, SamplingOptions(max_tokens=4))


def dualmap(**params: object) -> DualMapPolicy:
    policy = make_policy("dualmap", {**PARAMS, **params}, clock=FakeClock())
    assert isinstance(policy, DualMapPolicy)
    return policy


def load(registry: InstanceRegistry, iid: str, *, waiting_tokens: int, running: int = 0) -> None:
    registry.on_load_report(
        iid,
        LoadReport(
            iid, 0.0, num_running=running, waiting_prefill_tokens=waiting_tokens, kv_blocks_total=1000
        ),
    )


def ring_pair(decision: RoutingDecision) -> tuple[str, str]:
    """(c1, c2) in ring order: the first two estimates."""
    (c1, _), (c2, _) = decision.estimates[:2]
    return c1, c2


def send(policy: DualMapPolicy, registry: InstanceRegistry, req: RoutingRequest) -> RoutingDecision:
    """What the core does around a decision: choose, count as pending, tell the policy."""
    decision = policy.choose(req, registry.fleet("m"))
    state = registry.get(decision.instance_id)
    assert state is not None
    registry.on_dispatched(state, len(req.prompt_token_ids))
    policy.on_dispatched(req, decision)
    return decision


def test_shared_prefix_gets_same_two_candidates_and_distinct_prefixes_spread() -> None:
    """Same first K blocks, any suffix: same (c1, c2). Different prefixes cover the fleet."""
    registry = make_registry(8)
    policy = dualmap()
    fleet = registry.fleet("m")
    prefix = tokens(2 * BLOCK)
    pairs = {ring_pair(policy.choose(request(tokens(300, prefix=prefix)), fleet)) for _ in range(20)}
    assert len(pairs) == 1
    c1, c2 = pairs.pop()
    assert c1 != c2
    seen = {iid for _ in range(100) for iid in ring_pair(policy.choose(request(tokens(300)), fleet))}
    assert seen == {f"w{i}" for i in range(8)}


def test_affinity_picks_the_candidate_with_the_lower_estimated_ttft() -> None:
    """With c1 carrying a prefill queue, c2 wins; the decision explains itself in TTFT seconds."""
    registry = make_registry(4)
    policy = dualmap()
    req = request(tokens(200))
    c1, c2 = ring_pair(policy.choose(req, registry.fleet("m")))
    load(registry, c1, waiting_tokens=4000)
    decision = policy.choose(req, registry.fleet("m"))
    assert decision.instance_id == c2
    assert decision.outcome is RoutingOutcome.AFFINITY
    assert decision.candidates == (c2, c1)
    est = dict(decision.estimates)
    assert set(est) == {c1, c2} and 0 < est[c2] < est[c1] < 1.0
    assert "lower estimated TTFT plus recompute" in decision.reason


def test_cache_aware_choice_sends_a_shared_prefix_to_the_warm_candidate() -> None:
    """Once c2 holds a long prefix, a request sharing it goes there although c1 is the primary and idle."""
    registry = make_registry(4)
    policy = dualmap()
    prefix = tokens(1024)
    first = request(tokens(1100, prefix=prefix), "first")
    c1, c2 = ring_pair(policy.choose(first, registry.fleet("m")))
    load(registry, c1, waiting_tokens=50_000)  # push the first request to c2
    assert send(policy, registry, first).instance_id == c2
    for iid in (c1, c2):
        load(registry, iid, waiting_tokens=0)  # both idle again
    decision = policy.choose(request(tokens(1100, prefix=prefix), "second"), registry.fleet("m"))
    assert decision.instance_id == c2 and decision.outcome is RoutingOutcome.AFFINITY
    est = dict(decision.estimates)
    assert est[c2] < est[c1]


@pytest.mark.parametrize("weight", [0.0, 1.0])
def test_recompute_weight_keeps_a_conversation_on_its_cache_over_a_shorter_queue(weight: float) -> None:
    """``recompute_weight`` reaches the choice: a conversation cached on c2 behind a short queue
    stays there at weight 1 although the cold c1 has the lower TTFT estimate (weight 0 takes it),
    because moving it would make the fleet recompute the whole history."""
    registry = make_registry(4)
    policy = dualmap(recompute_weight=weight)
    history = tokens(4096)
    first = request(tokens(4096, prefix=history), "turn-1")
    c1, c2 = ring_pair(policy.choose(first, registry.fleet("m")))
    load(registry, c1, waiting_tokens=50_000)  # the first turn goes to c2
    assert send(policy, registry, first).instance_id == c2
    load(registry, c1, waiting_tokens=0)
    load(registry, c2, waiting_tokens=5_000)  # c2 now has a short queue; c1 is idle and cold
    decision = policy.choose(request(tokens(4200, prefix=history), "turn-2"), registry.fleet("m"))
    est = dict(decision.estimates)
    assert est[c1] < est[c2] < 1.0  # by TTFT alone c1 is faster ...
    assert decision.outcome is RoutingOutcome.AFFINITY
    assert decision.instance_id == (c1 if weight == 0 else c2)  # ... but costs a recompute


def test_slo_switch_when_both_candidates_are_overloaded() -> None:
    """Both candidates over the SLO: the lowest estimate fleet-wide, outcome ``slo_switch``."""
    registry = make_registry(4)
    policy = dualmap(ttft_slo_ms=200)
    req = request(tokens(200))
    c1, c2 = ring_pair(policy.choose(req, registry.fleet("m")))
    load(registry, c1, waiting_tokens=40_000)
    load(registry, c2, waiting_tokens=30_000)
    others = sorted({"w0", "w1", "w2", "w3"} - {c1, c2})
    load(registry, others[0], waiting_tokens=2_000)
    decision = policy.choose(req, registry.fleet("m"))
    assert decision.instance_id == others[1]
    assert decision.outcome is RoutingOutcome.SLO_SWITCH
    assert decision.candidates == (c2, c1)
    est = dict(decision.estimates)
    assert set(est) == {c1, c2, others[1]} and est[others[1]] < 0.2 < est[c2] < est[c1]


def test_over_the_slo_everywhere_a_fastest_candidate_keeps_the_request() -> None:
    """If the better candidate is still the fleet's fastest, the request stays: outcome ``affinity``."""
    registry = make_registry(3)
    policy = dualmap(ttft_slo_ms=50)
    for iid in ("w0", "w1", "w2"):
        load(registry, iid, waiting_tokens=100_000)
    req = request(tokens(200))
    c1, _ = ring_pair(policy.choose(req, registry.fleet("m")))
    decision = policy.choose(req, registry.fleet("m"))
    assert decision.instance_id == c1 and decision.outcome is RoutingOutcome.AFFINITY
    assert "still the cheapest" in decision.reason


def test_two_policy_instances_with_the_same_membership_give_the_same_candidates() -> None:
    """Router replicas agree without sharing state, whatever order membership arrived in."""
    infos = [make_info(f"w{i}") for i in range(6)]
    registry = InstanceRegistry(clock=FakeClock())
    registry.apply(Membership(1, tuple(infos)))
    a, b = dualmap(), dualmap()
    a.on_membership(infos)
    b.on_membership(list(reversed(infos[:3])))
    b.on_membership(infos[::-1])
    fleet = registry.fleet("m")
    reqs = [request(tokens(100)) for _ in range(200)]
    assert [ring_pair(a.choose(r, fleet)) for r in reqs] == [ring_pair(b.choose(r, fleet)) for r in reqs]


def test_a_dead_candidate_leaves_the_other_warm_one_in_charge() -> None:
    """With c1 down, c2 stays a candidate, and being warm it gets the prefix."""
    registry = make_registry(5)
    policy = dualmap()
    prefix = tokens(1024)
    first = request(tokens(1100, prefix=prefix), "first")
    c1, c2 = ring_pair(policy.choose(first, registry.fleet("m")))
    load(registry, c1, waiting_tokens=50_000)
    assert send(policy, registry, first).instance_id == c2
    load(registry, c2, waiting_tokens=0)  # the first request is done
    registry.mark_down(c1)
    decision = policy.choose(request(tokens(1100, prefix=prefix), "second"), registry.fleet("m"))
    assert c1 not in decision.candidates and c2 in decision.candidates
    assert decision.instance_id == c2


def _uncached_on(policy: DualMapPolicy, registry: InstanceRegistry, req: RoutingRequest, iid: str) -> int:
    for part in policy.explain(req, registry.fleet("m"))["estimates_detail"]:
        if part["instance_id"] == iid:
            return int(part["uncached_tokens"])
    raise AssertionError(f"{iid} was not scored")


def test_engine_reported_misses_lower_trust_in_the_record() -> None:
    """When the engine reports no hit where the record predicted one, later estimates assume less cache."""
    registry = make_registry(2)
    policy = dualmap()
    prefix = tokens(1024)
    first = request(tokens(1100, prefix=prefix), "first")
    iid = send(policy, registry, first).instance_id
    probe = request(tokens(1100, prefix=prefix), "probe")
    before = _uncached_on(policy, registry, probe, iid)
    assert before < 1100 - 900, "the record predicts the shared 1024-token prefix as cached"
    for n in range(30):
        req = request(tokens(1100, prefix=prefix), f"miss-{n}")
        decision = send(policy, registry, req)
        policy.on_first_token(req.request_id, decision.instance_id, ttft_s=0.05, num_cached_tokens=0)
        policy.on_finished(req.request_id, decision.instance_id, num_cached_tokens=0)
    after = _uncached_on(policy, registry, probe, iid)
    assert after > before + 500


def test_measured_ttfts_train_the_estimator() -> None:
    """The core's first-token feedback (``TtftFeedback``) moves the chosen instance's cost model."""
    registry = make_registry(2)
    policy = dualmap()
    assert isinstance(policy, TtftFeedback)
    prior = policy.estimator.coefficients("w0")
    for n in range(50):
        req = request(tokens(500), f"r{n}")
        decision = send(policy, registry, req)
        policy.on_first_token(req.request_id, decision.instance_id, ttft_s=0.5, num_cached_tokens=0)
        policy.on_finished(req.request_id, decision.instance_id, num_cached_tokens=0)
        registry.on_finished(registry.get(decision.instance_id), 0, 500, prefilled=True)  # type: ignore[arg-type]
    fitted = [policy.estimator.coefficients(i) for i in ("w0", "w1")]
    assert all(f.fixed_s + f.per_token_s * 500 > 5 * prior.prefill_s(500) for f in fitted)


def test_departed_instances_are_forgotten() -> None:
    """Leaving membership drops an instance's record, trust and fitted model."""
    registry = make_registry(2)
    policy = dualmap()
    policy.on_membership(list(registry.membership.instances))
    req = request(tokens(500))
    iid = send(policy, registry, req).instance_id
    policy.on_first_token(req.request_id, iid, ttft_s=3.0, num_cached_tokens=0)
    assert iid in policy._records
    policy.on_membership([i for i in registry.membership.instances if i.instance_id != iid])
    assert iid not in policy._records
    assert policy.estimator.coefficients(iid) == policy.estimator.prior


def test_explain_breaks_each_estimate_into_components() -> None:
    """The debug view lists, per scored instance, queue, prefill and step seconds and the record's match."""
    registry = make_registry(3)
    policy = dualmap()
    view = policy.explain(request(tokens(300)), registry.fleet("m"))
    assert view["outcome"] == "affinity" and len(view["estimates_detail"]) == 2
    for part in view["estimates_detail"]:
        assert part["total_s"] == pytest.approx(view["estimates"][part["instance_id"]])
        assert {"queue_s", "prefill_s", "step_s", "record_matched_tokens", "trust"} <= set(part)


def test_promised_parameter_defaults() -> None:
    """The documented defaults, in one place."""
    p = DualMapParams()
    assert (p.ttft_slo_ms, p.prefix_blocks, p.virtual_nodes, p.hash_algo, p.hash_seed) == (
        2000.0,  # the router's default SLO (RouterConfig.ttft_slo_ms), which it passes anyway
        4,
        160,
        "sha256",
        None,
    )
    assert (p.record_chunk_blocks, p.record_sample_stride, p.record_capacity_tokens) == (32, 16, None)
    assert p.ring_seeds[0] != p.ring_seeds[1] and p.estimator.prior_profile is None


def test_bad_parameters_are_config_errors() -> None:
    """Equal ring seeds or an unknown prior profile fail when the policy is built."""
    with pytest.raises(ConfigError, match="ring_seeds"):
        make_policy("dualmap", {"ring_seeds": [3, 3]})
    with pytest.raises(ConfigError, match="no-such-gpu"):
        make_policy("dualmap", {"estimator": {"prior_profile": "no-such-gpu"}})


def test_prior_can_come_from_a_simulator_profile() -> None:
    """``estimator.prior_profile`` takes the profile's closed-form prefill fit as the prior."""
    policy = make_policy("dualmap", {"estimator": {"prior_profile": "llama3.1-8b-a100"}})
    assert isinstance(policy, DualMapPolicy)
    assert policy.estimator.prior.per_token_s == pytest.approx(0.074257e-3)


def test_decisions_for_8k_token_prompts_take_microseconds_not_milliseconds() -> None:
    """A guard against pathological regressions (the target is P99 < 100 µs on a quiet core):
    the median CPU time of choose + on_dispatched for fresh 8k-token prompts stays under 1 ms."""
    registry = make_registry(8)
    policy = dualmap(record_chunk_blocks=32, record_sample_stride=16)
    prefixes = [tokens(6144) for _ in range(8)]
    fleet = registry.fleet("m")
    held = []  # requests stay alive, as the core's streams keep them
    cpu = []
    for n in range(300):
        req = request(tokens(8192, prefix=prefixes[n % 8]), f"r{n}")
        t0 = time.thread_time_ns()
        decision = policy.choose(req, fleet)
        policy.on_dispatched(req, decision)
        cpu.append(time.thread_time_ns() - t0)
        policy.on_finished(req.request_id, decision.instance_id, num_cached_tokens=6144)
        held.append(req)
    assert statistics.median(cpu[50:]) < 1_000_000


def test_memoised_ring_pairs_match_the_rings_stay_bounded_and_follow_liveness(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The per-view memo of ring pairs answers as the rings do, holds at most its size, and a
    liveness change (a new fleet view) is seen at once."""
    monkeypatch.setattr("switchyard.router.policies.dualmap._PAIR_MEMO_SIZE", 4)
    registry = make_registry(6)
    policy = dualmap()
    fleet = registry.fleet("m")
    reqs = [request(tokens(200), f"r{n}") for n in range(10)]
    for req in reqs * 2:  # the second pass hits the memo for the last four keys
        decision = policy.choose(req, fleet)
        key = policy._key(req, policy._hasher.digest(req, BLOCK), BLOCK, 1 / len(fleet))
        expected = policy._rings["m"].candidates(key, lambda iid: fleet.get(iid) is not None)
        assert ring_pair(decision) == expected
        policy.on_dispatched(req, decision)
    assert len(policy._pairs["m"]) == 4
    c1, _ = ring_pair(policy.choose(reqs[-1], fleet))
    registry.mark_down(c1)
    assert c1 not in policy.choose(reqs[-1], registry.fleet("m")).candidates


def test_choose_is_pure_and_the_decision_carries_what_dispatch_records() -> None:
    """Decisions made back to back, dispatched later and out of order, each record their own
    prompt on their own instance (nothing was stashed in the policy between the two calls)."""
    registry = make_registry(8)
    policy = dualmap()
    fleet = registry.fleet("m")
    a, b = request(tokens(8 * BLOCK), "a"), request(tokens(8 * BLOCK), "b")
    da, db = policy.choose(a, fleet), policy.choose(b, fleet)
    policy.explain(request(tokens(8 * BLOCK), "probe"), fleet)  # a debug view in between
    policy.on_dispatched(b, db)
    policy.on_dispatched(a, da)
    for req, decision in ((a, da), (b, db)):
        again = policy.choose(request(list(req.prompt_token_ids), "again"), fleet)
        assert again.instance_id == decision.instance_id
        assert again.memo.raw_cached == len(req.prompt_token_ids) - BLOCK  # the record matched it
    assert da.as_dict().keys() == {"instance_id", "outcome", "candidates", "estimates", "reason"}


def test_a_decision_that_is_not_the_policys_own_records_nothing() -> None:
    registry = make_registry(2)
    policy = dualmap()
    req = request(tokens(4 * BLOCK))
    policy.on_dispatched(req, RoutingDecision("w0"))  # a caller overriding the policy
    again = policy.choose(request(list(req.prompt_token_ids), "again"), registry.fleet("m"))
    assert again.memo.raw_cached == 0
