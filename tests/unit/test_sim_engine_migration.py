"""Migration ops of the real-time SimEngine: the Engine protocol, the coordinator and gRPC drains.

The simulator's own model (stages, costs, accounting) is tested in ``test_sim_migration.py``;
these tests check that the same model serves the real ``MigrationCoordinator`` and a router
draining simulated workers over gRPC, with the client seeing the uninterrupted tokens.
"""

from __future__ import annotations

import asyncio

from switchyard.config import RouterConfig
from switchyard.messages import EngineOutput, InstanceInfo, Membership, RoutingRequest, SamplingOptions
from switchyard.router.core import RouterCore
from switchyard.router.migration import EnginePeer, MigrationCoordinator
from switchyard.router.movable_stream import MovableStream
from switchyard.workers.sim.engine import SimEngine
from switchyard.workers.worker_server import start_worker_server
from tests.unit.test_sim_migration import BS, KV, expected_tokens, make_instance, make_request


async def test_sim_engines_migrate_through_the_real_coordinator() -> None:
    """The Engine protocol works for sims: the coordinator moves a stream between two real-time
    SimEngines, and the client sees the uninterrupted token sequence."""
    a = SimEngine(make_instance("a"), kv_transfer=KV)
    b = SimEngine(make_instance("b"), kv_transfer=KV)
    req = make_request("r", 600, 40)
    stream = MovableStream("r", "a", a.generate(req))
    got: list[int] = []
    outcome = None
    async for out in stream:
        got.extend(out.token_ids)
        assert out.num_prompt_tokens == 600
        if outcome is None and len(got) >= 10:
            outcome = await stream.move(
                MigrationCoordinator(kv_bytes_per_block=a.kv_bytes_per_block),
                EnginePeer(a, "a"),
                EnginePeer(b, "b"),
                block_size=BS,
            )
    assert outcome is not None and outcome.status == "moved", outcome
    assert got == expected_tokens("r", 40)
    assert outcome.stages >= 1 and outcome.bytes_moved == outcome.blocks_moved * KV.bytes_per_block
    await asyncio.sleep(0)
    assert not a.instance.has_work and not b.instance.has_work
    await asyncio.gather(a.close(), b.close())


async def test_sim_engine_without_a_transfer_model_refuses_and_the_request_stays() -> None:
    """A SimEngine built without ``kv_transfer`` refuses every migration step."""
    a, b = SimEngine(make_instance("a")), SimEngine(make_instance("b"))
    stream = MovableStream("r", "a", a.generate(make_request("r", 100, 12)))
    got: list[int] = []
    outcome = None
    async for out in stream:
        got.extend(out.token_ids)
        if outcome is None:
            outcome = await stream.move(MigrationCoordinator(), EnginePeer(a, "a"), EnginePeer(b, "b"))
    assert outcome is not None and (outcome.status, outcome.instance_id) == ("stayed", "a")
    assert got == expected_tokens("r", 12) and a.kv_bytes_per_block == 0
    await asyncio.gather(a.close(), b.close())


async def test_router_drains_sim_workers_over_grpc_by_migration() -> None:
    """Through real Worker gRPC servers, ``RouterCore.drain`` moves every stream off a simulated
    instance and each client sees its uninterrupted token sequence."""
    engines = {iid: SimEngine(make_instance(iid), kv_transfer=KV) for iid in ("w0", "w1")}
    servers, infos = [], {}
    for iid, engine in engines.items():

        def info(port: int, iid: str = iid) -> InstanceInfo:
            return InstanceInfo(
                iid,
                f"127.0.0.1:{port}",
                "sim",
                engine="sim",
                block_size=BS,
                kv_bytes_per_block=KV.bytes_per_block,
            )

        server, port = await start_worker_server(engine, info, host="127.0.0.1", load_interval_s=0.02)
        servers.append(server)
        infos[iid] = info(port)
    core = RouterCore(RouterConfig(policy="round_robin", load_report_interval_s=0.02))
    core.apply_membership(Membership(1, (infos["w0"],)))  # every request lands on w0
    await core.start()
    for _ in range(200):
        if core.ready:
            break
        await asyncio.sleep(0.01)

    started = {rid: asyncio.Event() for rid in ("a", "b")}

    async def client(rid: str) -> list[EngineOutput]:
        sampling, outs = SamplingOptions(max_tokens=60, ignore_eos=True), []
        async for out in core.generate(RoutingRequest(rid, "sim", tuple(range(300)), sampling)):
            outs.append(out)
            if len(outs) == 5:  # a few tokens in
                started[rid].set()
        return outs

    tasks = {rid: asyncio.create_task(client(rid)) for rid in started}
    await asyncio.gather(*(e.wait() for e in started.values()))
    core.apply_membership(Membership(2, tuple(infos.values())))
    result = await core.drain("w0", timeout_s=20.0)
    assert sorted(result.moved) == ["a", "b"] and result.complete, result
    for rid, task in tasks.items():
        outs = await task
        assert [t for o in outs for t in o.token_ids] == expected_tokens(rid, 60)
        assert outs[-1].finished and outs[-1].instance_id == "w1"
        assert all(o.num_prompt_tokens == 300 for o in outs)
    await core.close()
    for server in servers:
        await server.stop(None)
    await asyncio.gather(*(e.close() for e in engines.values()))
