"""Router settings of an LLMService reach the router they configure, end to end.

Each test goes the way a cluster does: an ``LLMServiceSpec`` is rendered into the ConfigMap's
``serve.json``, that JSON is parsed as the ``ServeConfig`` a router pod starts from, and a
``RouterCore`` is built from its ``router`` section; then the test observes the setting's
effect on what the router does, not merely its value in a model.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
from pydantic import ValidationError

from switchyard.config import MigrationConfig, ServeConfig
from switchyard.messages import (
    EngineOutput,
    EngineRequest,
    FinishReason,
    InstanceInfo,
    LoadReport,
    Membership,
    RoutingRequest,
    SamplingOptions,
)
from switchyard.operator.crd import LLMServiceSpec
from switchyard.operator.render.objects import Owner
from switchyard.operator.render.service import service_children
from switchyard.router.core import RouterCore
from switchyard.router.migration import MigrationOutcome
from switchyard.workers.sim.engine import SimEngine
from switchyard.workers.worker_server import start_worker_server
from tests.helpers.builders import make_info
from tests.helpers.waiting import eventually
from tests.unit.test_sim_migration import BS, KV, expected_tokens, make_instance

OWNER = Owner(kind="LLMService", name="llm", namespace="ns", uid="uid-llm")


def rendered(router: dict[str, Any]) -> ServeConfig:
    """The ServeConfig a router pod of an LLMService with ``spec.router = router`` reads."""
    spec = LLMServiceSpec.model_validate({"model": {"path": "/models/m"}, "router": router})
    (configmap,) = [c for c in service_children(OWNER, spec, {}) if c["kind"] == "ConfigMap"]
    return ServeConfig.model_validate_json(configmap["data"]["serve.json"])


class AnsweringWorker:
    """Stands in for an instance's ``WorkerClient``: every request gets one token and finishes."""

    def __init__(self, info: InstanceInfo) -> None:
        self.instance_id = info.instance_id

    async def generate(self, req: EngineRequest) -> AsyncIterator[EngineOutput]:
        n = len(req.prompt_token_ids)
        yield EngineOutput(req.request_id, (7,), True, FinishReason.LENGTH, n, 0, self.instance_id)

    async def close(self) -> None:
        return None


async def route(core: RouterCore, request_id: str) -> dict[str, Any]:
    """Send one 200-token request through ``core``; its routing decision (the debug view's record)."""
    req = RoutingRequest(request_id, "m", list(range(1, 201)), SamplingOptions(max_tokens=1))
    async for _ in core.generate(req):
        pass
    decision: dict[str, Any] = core.recent_decisions()[-1]
    assert decision["request_id"] == request_id
    return decision


@pytest.mark.parametrize(("ttft_ms", "outcome"), [(3000, "affinity"), (2000, "slo_switch")])
async def test_slo_ttft_ms_is_where_dualmap_switches(ttft_ms: int, outcome: str) -> None:
    """``slo.ttftMs`` is the SLO of the router's ``dualmap`` switch, which fires at half of it
    (``switch_at``): with both ring candidates estimated at ~1.2 s and the rest of the fleet
    idle, a 3 s SLO keeps the request on a candidate (``affinity``) and a 2 s SLO sends it to an
    idle instance (``slo_switch``). Before the SLO reached the router, dualmap switched at its
    own 1 s default whatever the service's SLO."""
    config = rendered({"policy": "dualmap", "slo": {"ttftMs": ttft_ms}})
    assert config.router.ttft_slo_ms == ttft_ms
    core = RouterCore(config.router, connector=AnsweringWorker)  # type: ignore[arg-type]
    core.apply_membership(Membership(1, tuple(make_info(f"w{i}") for i in range(4))))

    def load(iid: str, waiting_tokens: int) -> None:
        report = LoadReport(iid, 0.0, waiting_prefill_tokens=waiting_tokens, kv_blocks_total=1000)
        core.registry.on_load_report(iid, report)

    try:
        for i in range(4):
            load(f"w{i}", 0)
        candidates = (await route(core, "idle"))["candidates"]
        for iid in candidates:
            load(iid, 50_000)  # ~1.2 s of queued prefill at the estimator's prior
        decision = await route(core, "busy")
        estimates = decision["estimates"]
        assert all(1.0 < estimates[c] < 1.5 for c in candidates), estimates
        assert decision["outcome"] == outcome
        assert (decision["instance_id"] in candidates) is (outcome == "affinity")
    finally:
        await core.close()


def test_a_second_slo_in_policy_params_fails_the_render() -> None:
    """``policyParams.ttft_slo_ms`` that differs from ``slo.ttftMs`` is refused by the spec itself,
    naming both values (the operator reports it as InvalidConfig), so nothing is rendered."""
    with pytest.raises(ValidationError) as exc:
        rendered({"policy": "dualmap", "policyParams": {"ttft_slo_ms": 1000}, "slo": {"ttftMs": 1500}})
    assert "ttft_slo_ms=1000 ms" in str(exc.value) and "is 1500 ms" in str(exc.value)
    same = rendered({"policy": "dualmap", "policyParams": {"ttft_slo_ms": 1500}, "slo": {"ttftMs": 1500}})
    assert same.router.ttft_slo_ms == 1500


def test_every_coordinator_setting_is_rendered() -> None:
    """``router.migration``'s coordinator fields (camelCase, MigrationConfig's own) arrive in the
    router's ``serve.json`` unchanged; left out, they are MigrationConfig's defaults."""
    tuned = {
        "maxStages": 1,
        "lastStageMaxBlocks": 4,
        "admissionMarginBlocks": 0,
        "maxConcurrentPerInstance": 2,
        "stepTimeoutS": 2.5,
    }
    assert rendered({"migration": tuned}).router.migration == MigrationConfig(
        max_stages=1,
        last_stage_max_blocks=4,
        admission_margin_blocks=0,
        max_concurrent_per_instance=2,
        step_timeout_s=2.5,
    )
    assert rendered({}).router.migration == MigrationConfig()


@pytest.mark.parametrize("max_stages", [None, 0])
async def test_max_stages_reaches_the_routers_coordinator(max_stages: int | None) -> None:
    """``router.migration.maxStages: 0`` makes the router's migrations stop-and-copy: a request
    moved between two simulated workers over gRPC reports no pre-copy stage, where the default
    (3) pre-copies first; the client sees its tokens uninterrupted either way."""
    migration = {} if max_stages is None else {"maxStages": max_stages}
    config = rendered({"policy": "round_robin", "migration": migration})
    engines = {iid: SimEngine(make_instance(iid), kv_transfer=KV) for iid in ("w0", "w1")}
    servers, infos = [], {}
    for iid, engine in engines.items():

        def info(port: int, iid: str = iid) -> InstanceInfo:
            bpb = KV.bytes_per_block
            return InstanceInfo(
                iid, f"127.0.0.1:{port}", "sim", engine="sim", block_size=BS, kv_bytes_per_block=bpb
            )

        server, port = await start_worker_server(engine, info, host="127.0.0.1", load_interval_s=0.02)
        servers.append(server)
        infos[iid] = info(port)
    core = RouterCore(config.router)
    try:
        core.apply_membership(Membership(1, (infos["w0"],)))  # the request lands on w0
        await core.start()
        await eventually(lambda: core.ready)
        started = asyncio.Event()

        async def client() -> list[EngineOutput]:
            sampling, outs = SamplingOptions(max_tokens=80, ignore_eos=True), []
            async for out in core.generate(RoutingRequest("r", "sim", tuple(range(600)), sampling)):
                outs.append(out)
                if len(outs) == 5:
                    started.set()
            return outs

        task = asyncio.create_task(client())
        await started.wait()
        core.apply_membership(Membership(2, tuple(infos.values())))
        outcome: MigrationOutcome = await core.migrate("r", "w1")
        outs = await task
    finally:
        await core.close()
        for server in servers:
            await server.stop(None)
        await asyncio.gather(*(e.close() for e in engines.values()))
    assert outcome.status == "moved", outcome
    if max_stages == 0:
        assert (outcome.stages, outcome.precopied_tokens) == (0, 0)
    else:
        assert outcome.stages >= 1 and outcome.precopied_tokens > 0
    assert [t for o in outs for t in o.token_ids] == expected_tokens("r", 80)
    assert outs[-1].instance_id == "w1"
