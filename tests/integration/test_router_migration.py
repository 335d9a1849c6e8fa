"""``RouterCore.migrate`` over real gRPC workers: the client's stream continues across a move.

The workers serve a scripted engine that "decodes" deterministically (each token is the
previous one plus one) and implements the migration steps the way ``VLLMEngine`` does, with
one twist that a real engine shows too: at suspend time it has produced one token more than it
streamed (an abort drops outputs in flight). The router must emit that token exactly once,
then continue from the destination, and keep reporting the client's prompt length.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import pytest

from switchyard.config import MigrationConfig, RouterConfig
from switchyard.errors import MigrationError
from switchyard.messages import (
    EngineOutput,
    EngineRequest,
    FinishReason,
    InstanceInfo,
    KvSnapshot,
    Membership,
    RoutingRequest,
    SamplingOptions,
    SuspendedRequest,
)
from switchyard.router.core import RouterCore
from switchyard.workers.worker_server import start_worker_server
from tests.helpers.scripted_engine import ScriptedEngine

MODEL = "scripted-model"
PROMPT = [5, 6, 7]


class MigratableEngine(ScriptedEngine):
    """A scripted engine with the migration steps (no KV: the ticket is a marker)."""

    def __init__(self, instance_id: str, *, refuse: bool = False) -> None:
        super().__init__(instance_id, delay_s=0.01)
        self.refuse = refuse
        self.streamed: dict[str, list[int]] = {}
        self.base: dict[str, tuple[EngineRequest, tuple[int, ...]]] = {}
        self.admitted: list[SuspendedRequest] = []

    async def _run(
        self, engine_req: EngineRequest, base: EngineRequest, prior: tuple[int, ...]
    ) -> AsyncIterator[EngineOutput]:
        self.base[base.request_id] = (base, prior)
        seen = self.streamed[base.request_id] = []
        async for out in super().generate(engine_req):
            seen.extend(out.token_ids)
            yield out

    def generate(self, req: EngineRequest) -> AsyncIterator[EngineOutput]:
        return self._run(req, req, ())

    async def snapshot(
        self, request_id: str, *, after_tokens: int = 0, min_new_blocks: int = 1
    ) -> KvSnapshot:
        return KvSnapshot(request_id, self.instance_id, (), {})

    async def shadow_pull(self, snapshot: KvSnapshot) -> int:
        return 0

    async def suspend(self, request_id: str) -> SuspendedRequest:
        base, prior = self.base[request_id]
        produced = [*prior, *self.streamed[request_id]]
        await self.abort(request_id)
        # The engine had computed one more token than its stream delivered.
        context = [*base.prompt_token_ids, *produced]
        produced.append(context[-1] + 1)
        return SuspendedRequest(
            request_id,
            self.instance_id,
            tuple(base.prompt_token_ids),
            tuple(produced),
            base.sampling,
            {"ticket": 1},
        )

    def admit_migrated(self, req: SuspendedRequest) -> AsyncIterator[EngineOutput]:
        if self.refuse:
            raise MigrationError("refused by the test")
        self.admitted.append(req)
        continued = req.continuation()
        assert continued is not None
        return self._run(continued, req.request, tuple(req.output_token_ids))

    async def release_suspended(self, request_id: str) -> bool:
        return False


@pytest.fixture
async def fleet() -> AsyncIterator[dict[str, tuple[MigratableEngine, InstanceInfo, grpc.aio.Server]]]:
    out = {}
    for iid, refuse in (("w0", False), ("w1", False), ("bad", True)):
        engine = MigratableEngine(iid, refuse=refuse)

        def info(port: int, iid: str = iid) -> InstanceInfo:
            return InstanceInfo(iid, f"127.0.0.1:{port}", MODEL, engine="sim", kv_bytes_per_block=4096)

        server, port = await start_worker_server(engine, info, host="127.0.0.1", load_interval_s=0.02)
        out[iid] = (engine, info(port), server)
    yield out
    for _, _, server in out.values():
        await server.stop(None)


async def start_core(
    fleet: dict[str, tuple[MigratableEngine, InstanceInfo, grpc.aio.Server]], first: str
) -> RouterCore:
    core = RouterCore(
        RouterConfig(
            policy="round_robin",
            load_report_interval_s=0.02,
            migration=MigrationConfig(admission_margin_blocks=0),
        )
    )
    core.apply_membership(Membership(1, (fleet[first][1],)))  # the request lands on `first`
    await core.start()
    for _ in range(200):
        if core.ready:
            break
        await asyncio.sleep(0.01)
    return core


def join_all(
    core: RouterCore, fleet: dict[str, tuple[MigratableEngine, InstanceInfo, grpc.aio.Server]]
) -> None:
    """Publish every worker once the request is running (so the policy cannot pick another)."""
    if core.membership.version == 1:
        core.apply_membership(Membership(2, tuple(i for _, i, _ in fleet.values())))


def request(max_tokens: int = 30) -> RoutingRequest:
    return RoutingRequest("r-1", MODEL, PROMPT, SamplingOptions(max_tokens=max_tokens, temperature=0.0))


async def test_migrated_stream_continues_without_loss_or_duplicates(
    fleet: dict[str, tuple[MigratableEngine, InstanceInfo, grpc.aio.Server]],
) -> None:
    """Moving w0 -> w1 mid-stream: tokens continue exactly, the token the source computed but
    never streamed arrives once, usage keeps the client's prompt, the end comes from w1."""
    core = await start_core(fleet, "w0")
    outs: list[EngineOutput] = []
    outcome = None
    async for out in core.generate(request()):
        outs.append(out)
        join_all(core, fleet)
        if outcome is None and sum(len(o.token_ids) for o in outs) >= 8:
            outcome = await core.migrate("r-1", "w1")
    assert outcome is not None and outcome.status == "moved" and outcome.instance_id == "w1"
    tokens = [t for o in outs for t in o.token_ids]
    assert tokens == list(range(8, 38))
    assert all(o.num_prompt_tokens == len(PROMPT) for o in outs)
    assert (
        outs[-1].finished and outs[-1].finish_reason is FinishReason.LENGTH and outs[-1].instance_id == "w1"
    )
    assert outcome.blocks_moved > 0 and outcome.bytes_moved == outcome.blocks_moved * 4096  # source's size
    admitted = fleet["w1"][0].admitted
    assert len(admitted) == 1 and admitted[0].kv_transfer_params == {"ticket": 1}
    await core.close()


async def test_refusing_destination_recomputes_and_unknown_requests_are_errors(
    fleet: dict[str, tuple[MigratableEngine, InstanceInfo, grpc.aio.Server]],
) -> None:
    """A destination whose admission fails after the suspend: the request is resubmitted
    (recompute, on the source) and still completes exactly; migrating an unknown request raises."""
    core = await start_core(fleet, "w0")
    with pytest.raises(MigrationError):
        await core.migrate("nope", "w0")
    outs: list[EngineOutput] = []
    outcome = None
    async for out in core.generate(request(20)):
        outs.append(out)
        join_all(core, fleet)
        if outcome is None and sum(len(o.token_ids) for o in outs) >= 5:
            outcome = await core.migrate("r-1", "bad")
    assert outcome is not None and outcome.status == "recomputed" and outcome.instance_id == "w0"
    assert [t for o in outs for t in o.token_ids] == list(range(8, 28))
    assert all(o.num_prompt_tokens == len(PROMPT) for o in outs)
    await core.close()
