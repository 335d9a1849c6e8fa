"""DualMap against round robin on two real vLLM CPU instances: engine-reported prefix-cache hits.

Two engines (tiny model, block size 32, prefix caching on) each serve through a real Worker
gRPC server on port 0, and a real ``RouterCore`` routes to them over gRPC. The engines start
one after the other (vLLM's start holds the event loop): two starts racing in one process,
from two threads, failed about one run in seven, and hosting each engine in a spawned
process costs a third round of vLLM/torch imports, which on a busy two-core machine was no
faster than starting in turn.

The same workload goes through ``round_robin`` and then through ``dualmap``: 6 prefix
groups x 4 requests, each prompt a 4-block shared prefix plus a unique suffix, sent one at a
time in a fixed shuffled order. Each phase uses fresh prefixes, so neither inherits the
other's cache. The hit rate is what the engines report (``num_cached_tokens`` / prompt
tokens). Round robin spreads a group over both instances, so each instance misses the
group's prefix once; DualMap keeps a group on one of its two candidates (the warm one has
the lower estimated TTFT), so only the group's first request misses.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
import pytest_asyncio

from switchyard import metrics
from switchyard.config import EngineConfig, RouterConfig
from switchyard.messages import InstanceInfo, Membership, RoutingRequest, SamplingOptions
from switchyard.router.core import RouterCore
from switchyard.workers.vllm.engine import VLLMEngine
from switchyard.workers.worker_server import start_worker_server
from tests.helpers.waiting import eventually

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(420)]  # a safety net: ~60-100 s on a quiet machine

BLOCK = 32
GROUPS, PER_GROUP = 6, 4
PREFIX_TOKENS, SUFFIX_TOKENS = 4 * BLOCK, 40
MODEL = "switchyard-tiny"


@pytest_asyncio.fixture
async def members(tiny_model_dir: Path) -> AsyncIterator[list[InstanceInfo]]:
    """Two engines, each behind its own Worker gRPC server on port 0, started one after the other."""
    # Two engines share the machine's cores: one unpinned OpenMP thread each (engine.cpu_threads).
    cfg = EngineConfig(dtype="float32", block_size=BLOCK, max_model_len=512, max_num_seqs=8, cpu_threads=1)
    engines: list[VLLMEngine] = []
    servers: list[grpc.aio.Server] = []
    infos: list[InstanceInfo] = []
    try:
        for iid in ("vllm-a", "vllm-b"):
            engine = await VLLMEngine.start(cfg, instance_id=iid, model_dir=tiny_model_dir)
            engines.append(engine)

            def info(port: int, iid: str = iid, served: str = engine.served_model_name) -> InstanceInfo:
                return InstanceInfo(iid, f"127.0.0.1:{port}", served, block_size=BLOCK)

            server, port = await start_worker_server(engine, info, host="127.0.0.1", load_interval_s=0.02)
            servers.append(server)
            infos.append(info(port))
        yield infos
    finally:
        for server in servers:
            await server.stop(None)
        await asyncio.gather(*(e.close() for e in engines))


def workload(seed: int) -> list[RoutingRequest]:
    """GROUPS x PER_GROUP prompts (shared 4-block prefix + unique suffix) in a fixed shuffled order."""
    rng = random.Random(seed)
    prefixes = [[rng.randrange(5, 512) for _ in range(PREFIX_TOKENS)] for _ in range(GROUPS)]
    reqs = [
        RoutingRequest(
            f"s{seed}-g{g}-{i}",
            MODEL,
            prefixes[g] + [rng.randrange(5, 512) for _ in range(SUFFIX_TOKENS)],
            SamplingOptions(max_tokens=2, temperature=0.0, ignore_eos=True),
        )
        for g in range(GROUPS)
        for i in range(PER_GROUP)
    ]
    rng.shuffle(reqs)
    return reqs


def _quiet_since(core: RouterCore, t: float) -> Callable[[], bool]:
    """Every instance's latest report arrived after ``t`` and shows no work at all."""

    def quiet() -> bool:
        return all(
            s.report is not None
            and s.reported_at > t
            and s.report.num_running == s.report.num_waiting == s.report.waiting_prefill_tokens == 0
            and s.inflight_requests == 0
            for s in core.registry
        )

    return quiet


async def run_phase(
    policy: str, params: dict[str, Any], members: list[InstanceInfo], reqs: list[RoutingRequest]
) -> tuple[float, dict[str, set[str]], RouterCore]:
    """Send ``reqs`` one at a time through a fresh core; the engine-reported hit rate and placement."""
    core = RouterCore(RouterConfig(policy=policy, policy_params=params, load_report_interval_s=0.02))
    core.apply_membership(Membership(1, tuple(members)))
    await core.start()
    cached = prompt = 0
    placement: dict[str, set[str]] = {}
    try:
        await eventually(_quiet_since(core, time.monotonic()), within_s=20)
        for req in reqs:
            first = None
            async for out in core.generate(req):
                first = first or out
            assert first is not None and first.num_prompt_tokens == len(req.prompt_token_ids)
            cached += first.num_cached_tokens
            prompt += first.num_prompt_tokens
            placement.setdefault(req.request_id.rsplit("-", 1)[0], set()).add(first.instance_id)
            # Decide on fresh load, as a quiet fleet would: no report still showing the last request.
            await eventually(_quiet_since(core, time.monotonic()), within_s=10, interval_s=0.01)
    finally:
        await core.close()
    return cached / prompt, placement, core


async def test_dualmap_gets_more_engine_prefix_cache_hits_than_round_robin(
    members: list[InstanceInfo],
) -> None:
    """Same workload shape, fresh prefixes per phase: dualmap's hit rate beats round robin's and
    reaches the one-miss-per-group optimum; each group stays on one instance; decisions explain
    themselves and the TTFT estimate error is recorded."""
    assert len(members) == 2
    rr_rate, rr_placement, _ = await run_phase("round_robin", {}, members, workload(seed=1))
    dm_rate, dm_placement, core = await run_phase("dualmap", {}, members, workload(seed=2))  # defaults

    optimum = (PER_GROUP - 1) * PREFIX_TOKENS / (PER_GROUP * (PREFIX_TOKENS + SUFFIX_TOKENS))
    print(f"prefix-cache hit rate: round_robin {rr_rate:.3f}, dualmap {dm_rate:.3f}, optimum {optimum:.3f}")
    assert dm_rate > rr_rate
    assert dm_rate >= 0.95 * optimum
    assert all(len(used) == 1 for used in dm_placement.values()), dm_placement
    assert any(len(used) == 2 for used in rr_placement.values())

    decisions = core.recent_decisions()
    assert len(decisions) == GROUPS * PER_GROUP
    assert {d["outcome"] for d in decisions} == {"affinity"}
    assert all(len(d["candidates"]) == 2 and len(d["estimates"]) == 2 and d["reason"] for d in decisions)
    body, _ = metrics.render_latest()
    assert b'switchyard_router_ttft_estimate_error_seconds_count{policy="dualmap"}' in body
