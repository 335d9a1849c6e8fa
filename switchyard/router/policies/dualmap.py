"""``dualmap``: cache affinity and load balance from two hash rings and a TTFT estimate.

DualMap (``shared/DESIGN.md`` §3; ``research/papers.md`` #2) maps each request to two
candidate instances with two independently seeded consistent-hash rings over the request's
prefix key, then applies the power of two choices. Requests that share a prefix get the
same two candidates on every router replica with no shared state, so their KV stays warm
on at most two instances, while distinct prefixes spread evenly over the fleet.

Per request, on the hot path:

1. **Key.** The prompt's prefix one chunk past the deepest *shared branch point* on its path
   (``shared_prefixes.SharedPrefixes``: a prefix that much of the recent traffic passed
   through and continued from in several ways, such as a system prompt), and at least
   ``prefix_blocks`` blocks deep. So the key names the conversation or document behind a
   popular head, never the head itself, and every replica derives it by the same rule from
   its own share of the traffic. A request with nothing of its own past a shared head is
   keyed by its id (it spreads; the head is cached everywhere). ``key: head`` keeps the
   previous key, the vLLM-equal chain hash of the first ``prefix_blocks`` blocks.
2. **Candidates.** ``DualRing.candidates(key)``, skipping instances that are not live.
3. **Better of two.** For each candidate, the uncached part of the prompt comes from this
   router's record of what it routed there (``PrefixRecord`` over chunk fingerprints,
   bounded by the instance's KV capacity), scaled by how far the engine-reported hits have
   confirmed that record (``trust``); ``TtftEstimator`` turns queue and uncached tokens into
   seconds. The lower *cost* wins (outcome ``affinity``): the estimated TTFT plus
   ``recompute_weight`` times the request's own prefill there, because a recomputed prefix
   is paid twice, by the request's wait and by every request queued behind that compute.
4. **SLO switch.** If even the better candidate's estimate exceeds ``switch_at`` of the TTFT
   SLO (``ttft_slo_ms``, the service's one objective), the request goes to the lowest cost
   across the whole fleet: outcome ``slo_switch``, or still ``affinity`` when that is one of
   the candidates anyway.

The decision carries both candidates, their estimated TTFTs (seconds) and a reason;
:meth:`DualMapPolicy.explain` breaks the estimates into components for the debug view.
The router core feeds measured TTFTs back through ``on_first_token`` (the ``TtftFeedback``
protocol), which trains the estimator and corrects ``trust``.

``choose`` is pure: what ``on_dispatched`` needs of the choice (the prompt's digest, the
record's raw match, the load terms) travels in the decision's ``memo``. Hotspot rebalancing
and drain by migration (DESIGN §3 items 4-5) act outside the per-request decision:
``router/rebalancer.py`` and ``router/drain.py``.

NOTE: hashing dominates the decision cost: ~3 µs per key block plus the chunk fingerprints
of the whole prompt (``record_sample_stride`` trades their exactness for speed). The digest
is computed once per request and reused by ``on_dispatched`` through the decision.
"""

from __future__ import annotations

import bisect
import hashlib
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

from pydantic import Field, model_validator

from switchyard.config import DEFAULT_TTFT_SLO_MS, StrictModel
from switchyard.messages import InstanceInfo, RoutingRequest
from switchyard.router.dual_ring import DEFAULT_VIRTUAL_NODES, DualRing
from switchyard.router.policies import register_policy
from switchyard.router.policies.base import Clock, PolicyBase, PolicyParams, RoutingDecision, RoutingOutcome
from switchyard.router.prefix_hash import PrefixRecord, PromptDigest, PromptHasher
from switchyard.router.registry import FleetView, InstanceState
from switchyard.router.shared_prefixes import SharedPrefixes
from switchyard.router.ttft_estimator import PrefillCost, TtftEstimator

__all__ = ["DualMapParams", "DualMapPolicy", "EstimatorParams"]

_DEFAULT_CAPACITY_TOKENS = 1 << 20  # record size before an instance reports its KV capacity
_MAX_INFLIGHT = 1 << 16  # dispatch records kept for feedback; older ones are dropped
_U64 = (1 << 64) - 1
_PAIR_MEMO_SIZE = 1 << 14  # ring pairs memoised per model (~2 MB at most)
_REASON_BETTER = "lower estimated TTFT plus recompute of the two ring candidates"
_REASON_SINGLE = "the only live instance on the rings"
_REASON_SWITCH = "both candidates over the TTFT SLO: lowest TTFT plus recompute fleet-wide"
_REASON_STAY = "both candidates over the TTFT SLO, but a candidate is still the cheapest"


class EstimatorParams(StrictModel):
    """The TTFT estimator's prior and how fast measurements override it."""

    prior_profile: str | None = None
    """Simulator profile (``switchyard/workers/sim/profiles``) whose ``fits.prefill_ms`` is the prior;
    None takes the ``prior_*`` fields below."""
    prior_fixed_ms: float = Field(default=1.54, ge=0)
    """Fixed part of one prefill, ms (default: the qwen2.5-7b-h100 profile's fit)."""
    prior_per_token_ms: float = Field(default=0.024245, gt=0)
    """Prefill cost per uncached or queued token, ms."""
    prior_per_token2_ms: float = Field(default=3.224e-7, ge=0)
    """Attention's quadratic prefill term, ms per token²; kept fixed (not fitted)."""
    per_instance: bool = False
    """Fit one cost model per instance (mixed hardware under one model name) instead of one
    per served model; pooling is less noisy, so candidates differ by queue and cache only."""
    forgetting: float = Field(default=0.99, ge=0.5, le=1.0)
    """RLS forgetting factor: 0.99 follows roughly the last 100 observations per instance."""
    prior_weight: float = Field(default=10.0, gt=0)
    """How many observations the prior is worth."""
    throughput_window_s: float = Field(default=1.0, gt=0)
    """Backlogged time summed into one throughput sample from load reports, s."""

    def build(self) -> TtftEstimator:
        if self.prior_profile is not None:
            from switchyard.workers.sim.cost import load_profile  # data only, no engine imports

            fit = load_profile(self.prior_profile).fits.prefill_ms
            prior = PrefillCost.from_fit_ms(a_n2=fit.a_n2, b_n=fit.b_n, c=fit.c)
        else:
            prior = PrefillCost(
                fixed_s=self.prior_fixed_ms * 1e-3,
                per_token_s=self.prior_per_token_ms * 1e-3,
                per_token2_s=self.prior_per_token2_ms * 1e-3,
            )
        return TtftEstimator(
            prior,
            per_instance=self.per_instance,
            forgetting=self.forgetting,
            prior_weight=self.prior_weight,
            throughput_window_s=self.throughput_window_s,
        )


class DualMapParams(PolicyParams):
    """Parameters of ``dualmap``."""

    ttft_slo_ms: float = Field(default=DEFAULT_TTFT_SLO_MS, gt=0)
    """TTFT objective, ms: above it on both candidates, routing switches to fleet-wide load. The
    router core sets it from its own ``ttft_slo_ms`` (an LLMService's ``slo.ttftMs``), so this
    default only applies to a policy built on its own (tools, tests) and equals the router's."""
    prefix_blocks: int = Field(default=4, ge=1, le=1024)
    """Least depth of the routing key, in blocks (128 tokens at block size 32): long enough to
    tell system prompts apart; with ``key: head``, the whole key."""
    key: Literal["adaptive", "head"] = "adaptive"
    """``adaptive``: the key starts past the shared heads the router learned (see the module
    docstring); ``head``: the vLLM-equal hash of the first ``prefix_blocks`` blocks, which puts
    every request behind one system prompt on the same two instances."""
    switch_at: float = Field(default=0.5, gt=0, le=1)
    """Fraction of the TTFT SLO above which the better candidate's estimate sends the request to
    the fleet-wide lowest estimate. Why not 1: an estimate is made before the request queues,
    and the queue ahead of it grows while it waits; switching only once the estimate already
    misses the SLO leaves it to miss. On the routing benchmark (8 instances, 2 s SLO) 0.5 met
    the SLO for 84 % of requests where 1.0 met it for 75 % (8k shared head, 3.5x) and 82 % vs
    77 % (Mooncake arXiv slice, 5x), on par with the perfect-information oracle; 0.35 and
    0.65 were within a point of 0.5."""
    recompute_weight: float = Field(default=1.0, ge=0, le=100)
    """How much the prefill a choice makes the fleet do counts against it, on top of its share
    in the request's own TTFT estimate (cost = TTFT + weight x own prefill). Why: choosing by
    TTFT alone is greedy for one request: at high load it leaves a conversation's instance for
    a shorter queue and recomputes its whole history there, which delays everyone behind it.
    On the routing benchmark's multi-turn sessions (8 instances) weight 0 (the greedy TTFT
    choice, like the oracle) held 26.3x the base rate against prefix_tree's 34.0x; 1 held 30.5x,
    3 held 32.2x, 12 held 36.8x. But the weight also keeps requests on busy instances for
    their cache where a shared head is cached everywhere: with one 8k-token head, 0 held 3.02x,
    3 held 2.72x and 6 fell under 2.5x. 1 is the untuned middle: the recompute counted once
    for the request and once for the fleet."""
    switch_scan: int = Field(default=16, ge=1, le=4096)
    """Most instances the SLO switch estimates (besides the two candidates). Fleets up to this
    size are scanned whole; beyond it the best of this many, spread over the fleet. Each costs
    ~3 µs on the 2-core CI box, so a whole 1,024-instance fleet would make a 3 ms decision, and
    16 keeps the switch path near the 100 µs budget; on Mooncake with 32 instances at 19x,
    16 met the SLO for 96.8 % of requests against 97.2 % scanning all 32."""
    shared_min_share: float | None = Field(default=None, gt=0, le=1)
    """Share of the recent traffic above which a branching prefix counts as shared (its
    requests are keyed past it); None is one instance's fair share, 1 / live instances: a
    prefix that two candidates can carry stays on them."""
    shared_fanout: int = Field(default=4, ge=2, le=64)
    """Distinct continuations that make a popular prefix a branch point (a conversation
    continues one way, a system prompt as many as there are conversations behind it)."""
    shared_half_life: int = Field(default=4096, ge=16)
    """Requests after which an observation of prefix popularity weighs half."""
    shared_max_tokens: int = Field(default=32_768, ge=1)
    """Deepest prefix considered as a shared head; deeper content is the request's own."""
    virtual_nodes: int = Field(default=DEFAULT_VIRTUAL_NODES, ge=1, le=10_000)
    """Points per instance on each ring."""
    ring_seeds: tuple[int, int] = (0x6475_616C_3031, 0x6475_616C_3032)
    """Seeds of ring 1 and ring 2; every router replica must use the same two."""
    hash_algo: Literal["sha256", "sha256_cbor"] = "sha256"
    """The engines' ``prefix_caching_hash_algo``, so keys equal engine block hashes."""
    hash_seed: str | None = None
    """The engines' ``NONE_HASH`` seed (their ``PYTHONHASHSEED`` if set); None is vLLM's default."""
    record_chunk_blocks: int = Field(default=32, ge=1, le=1024)
    """Largest fingerprinted chunk of the per-instance record, in blocks (chunks double up to it):
    cost per prompt vs. resolution of long prefixes; see ``prefix_hash.chunk_ends``."""
    record_sample_stride: int = Field(default=16, ge=1, le=64)
    """Fingerprint every n-th token of a chunk (1 = exact): a differing run of n tokens or more
    is always seen; see ``prefix_hash``."""
    record_capacity_tokens: int | None = Field(default=None, ge=1)
    """Tokens remembered per instance; None sizes it from the instance's reported KV blocks."""
    trust_alpha: float = Field(default=0.1, gt=0, le=1)
    """EWMA weight of one engine-reported hit when correcting the record's predictions."""
    estimator: EstimatorParams = Field(default_factory=EstimatorParams)
    """The TTFT estimator."""

    @model_validator(mode="after")
    def _seeds_differ(self) -> DualMapParams:
        a, b = self.ring_seeds
        if a == b or not (0 <= a < 1 << 64 and 0 <= b < 1 << 64):
            raise ValueError("ring_seeds must be two different unsigned 64-bit integers")
        return self


@dataclass(slots=True)
class _Dispatch:
    """What the policy expected of one dispatched request, kept until feedback arrives."""

    instance_id: str
    num_tokens: int
    predicted_cached: int  # tokens the record matched, before the trust correction
    queued_tokens: float  # the estimator's load terms at the choice
    step_s: float
    corrected: bool = False


class _Memo(NamedTuple):
    """What ``on_dispatched`` needs of one choice (``RoutingDecision.memo``)."""

    digest: PromptDigest
    raw_cached: int  # tokens the record matched on the chosen instance, before the trust correction
    capacity: int  # the chosen instance's record size in tokens (0: not known yet)
    queued_tokens: float  # the estimator's load terms at the choice
    step_s: float
    shared_share: float  # the popularity floor the key was read with, to learn with the same


class _Score(NamedTuple):
    """One instance scored for one request."""

    state: InstanceState
    iid: str
    uncached: int
    raw: int  # cached tokens the record matched, before the trust correction
    e: float  # estimated TTFT, s
    cost: float  # what the choice minimises: e + recompute_weight x own prefill, s


@register_policy("dualmap")
class DualMapPolicy(PolicyBase):
    """Two seeded rings, the better candidate by estimated TTFT, fleet-wide fallback over the SLO."""

    Params = DualMapParams
    reads = frozenset(
        {"num_running", "num_waiting", "waiting_prefill_tokens", "step_time_s", "kv_blocks_total"}
        | {"prefix_cache_queries_total", "prefix_cache_hits_total"}
    )

    def __init__(self, params: PolicyParams, *, clock: Clock, estimator: TtftEstimator | None = None) -> None:
        super().__init__(params, clock=clock)
        p = params if isinstance(params, DualMapParams) else DualMapParams()
        self._p = p
        self._slo_s = p.ttft_slo_ms * 1e-3
        self._switch_s = p.switch_at * self._slo_s
        self._kw = p.recompute_weight
        self.estimator = estimator or p.estimator.build()
        self._adaptive = p.key == "adaptive"
        self._shared = SharedPrefixes(half_life=p.shared_half_life, fanout=p.shared_fanout)
        self._hasher = PromptHasher(
            prefix_blocks=0 if self._adaptive else p.prefix_blocks,
            chunk_blocks=p.record_chunk_blocks,
            sample_stride=p.record_sample_stride,
            algo=p.hash_algo,
            seed=p.hash_seed,
        )
        self._rings: dict[str, DualRing] = {}
        self._synced: dict[str, FleetView] = {}  # model -> the fleet view last checked against its ring
        self._pairs: dict[str, OrderedDict[bytes, tuple[str, str]]] = {}  # model -> key -> pair, for _synced
        self._infos: dict[str, InstanceInfo] = {}
        self._records: dict[str, PrefixRecord] = {}
        self._trust: dict[str, float] = {}
        self._inflight: dict[str, _Dispatch] = {}

    # -- membership -------------------------------------------------------------------------------

    def on_membership(self, instances: Sequence[InstanceInfo]) -> None:
        new = {i.instance_id: i for i in instances}
        for iid, info in list(self._infos.items()):
            if new.get(iid) != info:  # departed or restarted: what we knew of its cache is void
                self._forget(iid)
        self._infos = new
        by_model: dict[str, list[str]] = {}
        for info in instances:
            by_model.setdefault(info.model, []).append(info.instance_id)
        for model in list(self._rings):
            if model not in by_model:
                del self._rings[model]
        for model, ids in by_model.items():
            self._ring_of(model).sync(ids)
        self._synced.clear()
        self._pairs.clear()

    def _forget(self, instance_id: str) -> None:
        self._records.pop(instance_id, None)
        self._trust.pop(instance_id, None)
        self.estimator.forget(instance_id)

    def _ring_of(self, model: str) -> DualRing:
        ring = self._rings.get(model)
        if ring is None:
            p = self._p
            ring = self._rings[model] = DualRing(seeds=p.ring_seeds, virtual_nodes=p.virtual_nodes)
        return ring

    def _candidates(self, key: bytes, fleet: FleetView) -> tuple[str, str]:
        """The ring pair for ``key`` among ``fleet``'s live instances, memoised per fleet view.

        A view fixes membership and liveness, so the pair of a key cannot change while the view
        lasts; requests sharing a prefix share the key and skip the two ring walks (~3.5 µs of
        the ~45 µs decision). A new view, or a membership change, starts a new memo.
        """
        model = fleet.model
        if self._synced.get(model) is not fleet:  # a new view: membership or liveness changed
            ring = self._ring_of(model)
            for s in fleet.instances:  # covers use without on_membership (tests, tools)
                if s.info.instance_id not in ring:
                    ring.add(s.info.instance_id)
            self._synced[model] = fleet
            self._pairs[model] = OrderedDict()
        pairs = self._pairs[model]
        pair = pairs.get(key)
        if pair is None:
            get = fleet.get
            pair = self._rings[model].candidates(key, lambda iid: get(iid) is not None)
            if len(pairs) >= _PAIR_MEMO_SIZE:
                pairs.popitem(last=False)  # oldest first, O(1); a hot key evicted comes right back
            pairs[key] = pair
        return pair

    # -- the decision -----------------------------------------------------------------------------

    def _uncached(self, state: InstanceState, d: PromptDigest) -> tuple[int, int]:
        """``(uncached tokens as estimated, cached tokens the record matched before trust)``."""
        rec = self._records.get(state.info.instance_id)
        if rec is None:
            return d.num_tokens, 0
        matched = rec.match(d.fingerprints)
        if not matched:
            return d.num_tokens, 0
        raw = d.cached_tokens(matched)
        return d.num_tokens - int(raw * self._trust.get(state.info.instance_id, 1.0)), raw

    def choose(self, req: RoutingRequest, fleet: FleetView) -> RoutingDecision:
        block_size = fleet.instances[0].info.block_size
        d = self._hasher.digest(req, block_size)
        share = self._shared_share(len(fleet.instances))
        key = self._key(req, d, block_size, share) if self._adaptive else d.key
        get = fleet.get
        c1, c2 = self._candidates(key, fleet)
        s1 = get(c1)
        assert s1 is not None
        first = self._score(s1, d)
        if c2 == c1:
            only = ((c1, first.e),)
            return self._decide(d, share, first, RoutingOutcome.AFFINITY, (c1,), only, _REASON_SINGLE)
        s2 = get(c2)
        assert s2 is not None
        second = self._score(s2, d)
        best, other = (first, second) if first.cost <= second.cost else (second, first)
        cands = (best.iid, other.iid)
        pair = ((c1, first.e), (c2, second.e))
        if best.e <= self._switch_s:
            return self._decide(d, share, best, RoutingOutcome.AFFINITY, cands, pair, _REASON_BETTER)
        # Over the SLO on both: the lowest cost fleet-wide (ties: the candidate stays, else the
        # lowest id, so every replica breaks them alike).
        # The hot loop of the switch path: _score inlined, a _Score built for the winner only.
        estimate, prefill_s, kw = self.estimator.estimate, self.estimator.prefill_s, self._kw
        records, trust = self._records, self._trust
        fps, n = d.fingerprints, d.num_tokens
        best_state = best.state
        low_e, low_iid, low_state = best.cost, best.iid, best_state
        for s in self._switch_pool(fleet.instances, key):
            if s is s1 or s is s2:
                continue
            iid = s.info.instance_id
            uncached = n
            rec = records.get(iid)
            if rec is not None and (matched := rec.match(fps)):
                uncached = n - int(d.cached_tokens(matched) * trust.get(iid, 1.0))
            e = estimate(s, uncached)
            if kw:
                e += kw * prefill_s(s, uncached)
            if e < low_e or (e == low_e and low_state is not best_state and iid < low_iid):
                low_e, low_iid, low_state = e, iid, s
        low = best if low_state is best.state else self._score(low_state, d)
        if low is best:
            return self._decide(d, share, best, RoutingOutcome.AFFINITY, cands, pair, _REASON_STAY)
        triple = (*pair, (low.iid, low.e))
        return self._decide(d, share, low, RoutingOutcome.SLO_SWITCH, cands, triple, _REASON_SWITCH)

    def _shared_share(self, live: int) -> float:
        p = self._p
        return p.shared_min_share if p.shared_min_share is not None else 1.0 / max(live, 1)

    def _key_level(self, d: PromptDigest, block_size: int, share: float) -> int:
        """The chunk the routing key ends at (``len(d.ends)``: none of the request's own)."""
        p = self._p
        depth = bisect.bisect_right(d.ends, p.shared_max_tokens)
        level = self._shared.key_level(d.fingerprints, share, depth=depth)
        least = bisect.bisect_left(d.ends, p.prefix_blocks * block_size)
        if level < least:  # never shallower than prefix_blocks, if the prompt reaches that deep
            level = min(least, len(d.ends) - 1) if d.ends else 0
        return level

    def _key(self, req: RoutingRequest, d: PromptDigest, block_size: int, share: float) -> bytes:
        level = self._key_level(d, block_size, share)
        if level < len(d.fingerprints):
            return (d.fingerprints[level] & _U64).to_bytes(8, "little")
        # Nothing of its own past a shared head: spread by the request id (stable across replicas).
        return hashlib.blake2b(req.request_id.encode(), digest_size=8).digest()

    def _switch_pool(self, instances: tuple[InstanceState, ...], key: bytes) -> Sequence[InstanceState]:
        """The instances the SLO switch compares: all of them up to ``switch_scan``, else that
        many spread evenly over the (sorted) fleet from an offset the key fixes, so the switch
        stays O(1) per request on a large fleet and every replica scans the same ones."""
        n, k = len(instances), self._p.switch_scan
        if n <= k:
            return instances
        stride = n // k
        offset = int.from_bytes(key[:4], "little") % n
        return [instances[(offset + i * stride) % n] for i in range(k)]

    def _score(self, state: InstanceState, d: PromptDigest) -> _Score:
        uncached, raw = self._uncached(state, d)
        e = self.estimator.estimate(state, uncached)
        cost = e + self._kw * self.estimator.prefill_s(state, uncached) if self._kw else e
        return _Score(state, state.info.instance_id, uncached, raw, e, cost)

    def _decide(
        self,
        d: PromptDigest,
        share: float,
        chosen: _Score,
        outcome: RoutingOutcome,
        candidates: tuple[str, ...],
        estimates: tuple[tuple[str, float], ...],
        reason: str,
    ) -> RoutingDecision:
        state = chosen.state
        r = state.report
        capacity = self._p.record_capacity_tokens or (
            r.kv_blocks_total * state.info.block_size if r is not None and r.kv_blocks_total else 0
        )
        # Load terms as of the choice: the core counts the request as pending before on_dispatched.
        queued, step = self.estimator.load_terms(state)
        memo = _Memo(d, chosen.raw, capacity, queued, step, share)
        return RoutingDecision(chosen.iid, outcome, candidates, estimates, reason, memo)

    # -- feedback ---------------------------------------------------------------------------------

    def on_dispatched(self, req: RoutingRequest, decision: RoutingDecision) -> None:
        memo = decision.memo
        if not isinstance(memo, _Memo):
            return  # not our choice (a caller overriding the policy): nothing sound to record
        iid = decision.instance_id
        d, raw_cached, capacity, queued, step, _ = memo
        self._hasher.release(req)
        if self._adaptive:
            depth = bisect.bisect_right(d.ends, self._p.shared_max_tokens)
            self._shared.observe(d.fingerprints, memo.shared_share, depth=depth)
        rec = self._records.get(iid)
        if rec is None:
            rec = self._records[iid] = PrefixRecord(capacity or _DEFAULT_CAPACITY_TOKENS)
        elif capacity:
            rec.capacity = capacity
        rec.insert(d.fingerprints, d.ends)
        inflight = self._inflight
        inflight[req.request_id] = _Dispatch(iid, d.num_tokens, raw_cached, queued, step)
        if len(inflight) > _MAX_INFLIGHT:
            del inflight[next(iter(inflight))]

    def _correct(self, disp: _Dispatch, num_cached_tokens: int) -> None:
        """Move ``trust`` towards the share of the predicted hit that the engine confirmed."""
        disp.corrected = True
        if disp.predicted_cached > 0:
            ratio = min(num_cached_tokens / disp.predicted_cached, 1.0)
            t = self._trust.get(disp.instance_id, 1.0)
            self._trust[disp.instance_id] = t + self._p.trust_alpha * (ratio - t)

    def on_first_token(
        self, request_id: str, instance_id: str, *, ttft_s: float, num_cached_tokens: int
    ) -> None:
        """Measured TTFT and engine-reported hit of a request this policy placed (``TtftFeedback``)."""
        disp = self._inflight.get(request_id)
        if disp is None or disp.instance_id != instance_id or disp.corrected:
            return
        self._correct(disp, num_cached_tokens)
        self.estimator.observe_ttft(
            instance_id,
            queued_tokens=disp.queued_tokens,
            uncached_tokens=max(disp.num_tokens - num_cached_tokens, 0),
            step_s=disp.step_s,
            ttft_s=ttft_s,
        )

    def on_finished(self, request_id: str, instance_id: str, *, num_cached_tokens: int) -> None:
        disp = self._inflight.pop(request_id, None)
        # Without on_first_token, a positive hit is certain news; 0 may mean "no output at all".
        if disp is not None and disp.instance_id == instance_id and not disp.corrected and num_cached_tokens:
            self._correct(disp, num_cached_tokens)

    # -- debug view -------------------------------------------------------------------------------

    def explain(self, req: RoutingRequest, fleet: FleetView) -> dict[str, Any]:
        """Why ``req`` would go where it goes now: candidates, record matches and estimate parts."""
        decision = self.choose(req, fleet)
        block_size = fleet.instances[0].info.block_size
        d = self._hasher.digest(req, block_size)
        parts = []
        for iid, _ in decision.estimates:
            state = fleet.get(iid)
            assert state is not None
            uncached, raw = self._uncached(state, d)
            parts.append(
                {
                    **self.estimator.explain(state, uncached).as_dict(),
                    "cost_s": self._score(state, d).cost,
                    "record_matched_tokens": raw,
                    "trust": self._trust.get(iid, 1.0),
                    "miss_ratio": self.estimator.miss_ratio(iid),
                }
            )
        if self._adaptive:
            share = self._shared_share(len(fleet.instances))
            level = self._key_level(d, block_size, share)
            key = self._key(req, d, block_size, share).hex()
            key_tokens = d.ends[level] if level < len(d.ends) else None  # None: keyed by request id
        else:
            key, key_tokens = d.key.hex(), self._p.prefix_blocks * block_size
        return {
            **decision.as_dict(),
            "key": key,
            "key_prefix_tokens": key_tokens,
            "slo_s": self._slo_s,
            "switch_s": self._switch_s,
            "estimates_detail": parts,
        }
