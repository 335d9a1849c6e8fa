"""``oracle``: a perfect-information reference for the routing benchmark (simulator only).

Capacities of real policies need a yardstick that is not another estimate. This policy reads
what no router can: each simulated engine's exact prefix-cache contents and queue, and sends
each request where its TTFT would be lowest *now*, priced by the engines' own step-cost
model. It is **greedy**: it never sacrifices one request for the next (it will put a request
on the instance that caches its prefix even when that instance is about to be needed more by
the next one), so it is a strong reference, not a proof of optimality; a policy can exceed it
on a trace where greed is wrong.

The TTFT of a request on one instance, as the oracle prices it:

* prefill work ahead of it: the unprefilled tokens of the running requests, plus every
  waiting request's prompt minus what that instance's prefix cache holds for it right now;
* its own work: its prompt minus the blocks the instance's cache holds for it (whole blocks,
  the last token always computed, as the engine does);
* time: that many tokens in chunks of the instance's token budget, each chunk sharing the
  step with one decode token per running sequence, every step priced by the instance's cost
  model (its own profile and derating).

It ignores preemption and seat limits (``max_num_seqs``), which would only delay every
candidate alike. Cost per decision is O(instances x queued requests); fine for a benchmark.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from switchyard.messages import RoutingRequest
from switchyard.router.policies.base import PolicyBase, PolicyParams, RoutingDecision, RoutingOutcome
from switchyard.router.registry import FleetView
from switchyard.workers.sim.cost import StepCostModel, StepWork, prefill_pairs
from switchyard.workers.sim.instance import SimInstance
from switchyard.workers.sim.request import Status, chain_hashes

__all__ = ["ORACLE", "OraclePolicy", "oracle_ttft_s"]

ORACLE = "oracle"
"""The benchmark's name for this policy (it is not registered with the router)."""


def _cached_tokens(inst: SimInstance, hashes: list[int], num_tokens: int) -> int:
    """Prompt tokens ``inst``'s prefix cache would serve (whole blocks; one token recomputed)."""
    limit = min((num_tokens - 1) // inst.block_size, len(hashes))
    if limit <= 0:
        return 0
    return inst.cached_prefix_blocks_of(hashes, limit) * inst.block_size


def _queued_work(inst: SimInstance) -> tuple[int, int, int]:
    """``(prefill tokens ahead, decoding sequences, their summed context)`` on ``inst`` now."""
    ahead = decoding = context = 0
    bs = inst.block_size
    for sreq in inst.running_requests():
        if sreq.num_computed < sreq.prefill_len:
            ahead += sreq.prefill_len - sreq.num_computed
        else:
            decoding += 1
            context += sreq.num_computed + 1
    for sreq in inst.waiting_requests():
        if sreq.status is not Status.WAITING:
            continue
        if sreq.blocks:  # arrived by migration with its KV
            ahead += max(sreq.prefill_len - sreq.num_computed, 0)
            continue
        total = len(sreq.tokens)
        limit = (total - 1) // bs
        hit = inst.cached_prefix_blocks_of(sreq.block_hashes(limit, bs), limit) if limit > 0 else 0
        ahead += total - hit * bs
    return ahead, decoding, context


def _fresh_chunk_s(cost: StepCostModel, tokens: int, decoding: int, context: int) -> float:
    """One step prefilling ``tokens`` uncached tokens beside ``decoding`` decode rows."""
    work = StepWork(tokens + decoding, decoding, prefill_pairs(tokens, 0), context, decoding + 1)
    return cost.step_time_s(work)


def oracle_ttft_s(inst: SimInstance, hashes: list[int], num_tokens: int) -> float:
    """The TTFT the oracle prices for a ``num_tokens`` prompt (block ``hashes``) on ``inst``."""
    cached = _cached_tokens(inst, hashes, num_tokens)
    ahead, decoding, context = _queued_work(inst)
    mine = num_tokens - cached
    chunk = max(inst.max_num_batched_tokens - decoding, 1)
    cost = inst.cost
    # Work ahead: full chunks of fresh prefill (an upper-level approximation of their attention).
    t = 0.0
    if ahead:
        full, rest = divmod(ahead, chunk)
        t += full * _fresh_chunk_s(cost, chunk, decoding, context)
        if rest:
            t += _fresh_chunk_s(cost, rest, decoding, context)
    # Its own prefill, chunk by chunk over its cached prefix.
    done = cached
    for _ in range(math.ceil(mine / chunk)):
        q = min(chunk, num_tokens - done)
        last = done + q == num_tokens
        t += cost.step_time_s(
            StepWork(q + decoding, decoding + int(last), prefill_pairs(q, done), context, decoding + 1)
        )
        done += q
    return t


class OraclePolicy(PolicyBase):
    """Sends each request to the live instance with the lowest :func:`oracle_ttft_s`."""

    name = ORACLE
    Params = PolicyParams

    def __init__(self, instances: Mapping[str, SimInstance]) -> None:
        super().__init__(PolicyParams())
        self._instances = instances

    def choose(self, req: RoutingRequest, fleet: FleetView) -> RoutingDecision:
        tokens = req.prompt_token_ids
        by_block_size: dict[int, list[int]] = {}  # the engines' own block size, not the report's
        best_id, best = "", math.inf
        scores = []
        for state in fleet.instances:
            iid = state.info.instance_id
            inst = self._instances[iid]
            bs = inst.block_size
            hashes = by_block_size.get(bs)
            if hashes is None:
                hashes = by_block_size[bs] = chain_hashes(tokens, (len(tokens) - 1) // bs, bs)
            t = oracle_ttft_s(inst, hashes, len(tokens))
            scores.append((iid, t))
            if t < best:
                best_id, best = iid, t
        return RoutingDecision(best_id, RoutingOutcome.LOAD, (best_id,), tuple(scores), "lowest priced TTFT")
