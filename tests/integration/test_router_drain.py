"""Drain and hotspot rebalancing over real gRPC workers serving scripted migratable engines.

Every request starts on ``w0`` (the only member at first); then ``w1`` and ``w2`` join. A
drain must move every stream off ``w0`` with each client's tokens exactly those of an
uninterrupted run, leave ``w0`` with nothing running, and keep new requests away from it.
The rebalancer, given the same hotspot, must move requests off ``w0`` to the idle instances.
The admin HTTP endpoints and the ``switchyard drain`` CLI are exercised against the same core.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import AsyncIterator

import grpc
import httpx
import pytest
import uvicorn

from switchyard import cli, metrics
from switchyard.config import GatewayConfig, MigrationConfig, RebalancerConfig, RouterConfig
from switchyard.messages import (
    EngineOutput,
    FinishReason,
    InstanceInfo,
    Membership,
    RoutingRequest,
    SamplingOptions,
)
from switchyard.router.core import RouterCore
from switchyard.router.gateway import build_gateway_app
from switchyard.router.rebalancer import Rebalancer
from switchyard.workers.worker_server import start_worker_server
from tests.integration.test_router_migration import MigratableEngine

MODEL = "scripted-model"
Fleet = dict[str, tuple[MigratableEngine, InstanceInfo, grpc.aio.Server]]


@pytest.fixture
async def fleet() -> AsyncIterator[Fleet]:
    out: Fleet = {}
    for iid in ("w0", "w1", "w2"):
        engine = MigratableEngine(iid)

        def info(port: int, iid: str = iid) -> InstanceInfo:
            return InstanceInfo(iid, f"127.0.0.1:{port}", MODEL, engine="sim")

        server, port = await start_worker_server(engine, info, host="127.0.0.1", load_interval_s=0.02)
        out[iid] = (engine, info(port), server)
    yield out
    for _, _, server in out.values():
        await server.stop(None)


async def until(cond: object, what: str, within_s: float = 5.0) -> None:
    assert callable(cond)
    for _ in range(int(within_s / 0.01)):
        if cond():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


class Hotspot:
    """A core whose ``n`` streams all run on w0, then all three workers are members."""

    def __init__(self, core: RouterCore, n: int, max_tokens: int) -> None:
        self.core = core
        self.prompts = {f"r-{i}": [100 * (i + 1), 100 * (i + 1) + 1] for i in range(n)}
        self.outs: dict[str, list[EngineOutput]] = {rid: [] for rid in self.prompts}
        self.max_tokens = max_tokens
        self.tasks = [asyncio.create_task(self._consume(rid)) for rid in self.prompts]

    async def _consume(self, rid: str) -> None:
        sampling = SamplingOptions(max_tokens=self.max_tokens, temperature=0.0)
        async for out in self.core.generate(RoutingRequest(rid, MODEL, self.prompts[rid], sampling)):
            self.outs[rid].append(out)

    def tokens(self, rid: str) -> list[int]:
        return [t for o in self.outs[rid] for t in o.token_ids]

    def expected(self, rid: str) -> list[int]:
        last = self.prompts[rid][-1]
        return list(range(last + 1, last + 1 + self.max_tokens))

    async def finish(self) -> None:
        await asyncio.wait_for(asyncio.gather(*self.tasks), 10)


async def hotspot(fleet: Fleet, n: int = 4, max_tokens: int = 80, **router: object) -> Hotspot:
    core = RouterCore(
        RouterConfig(
            policy="round_robin",
            load_report_interval_s=0.02,
            migration=MigrationConfig(admission_margin_blocks=0),
            **router,
        )
    )
    core.apply_membership(Membership(1, (fleet["w0"][1],)))
    await core.start()
    await until(lambda: core.ready, "w0's first load report")
    h = Hotspot(core, n, max_tokens)
    await until(lambda: all(len(h.tokens(r)) >= 3 for r in h.prompts), "every stream to start")
    core.apply_membership(Membership(2, tuple(i for _, i, _ in fleet.values())))
    reg = core.registry

    def reported() -> bool:
        states = [reg.get(i) for i in ("w1", "w2")]
        return all(s is not None and s.report is not None for s in states)

    await until(reported, "w1 and w2 to report")
    await until(lambda: (s := reg.get("w0")) is not None and s.num_running == n, "w0 to report its batch")
    return h


async def test_drain_moves_every_stream_off_and_outputs_are_identical(fleet: Fleet) -> None:
    h = await hotspot(fleet)
    core = h.core
    result = await core.drain("w0", timeout_s=10)
    assert sorted(result.moved) == sorted(h.prompts) and not result.failed, result.as_dict()
    assert set(result.destinations.values()) == {"w1", "w2"}  # spread by freeness
    assert core.registry.is_draining("w0")
    assert [s.instance_id for s in core.registry.fleet(MODEL)] == ["w1", "w2"]
    # New work never lands on the draining instance, whatever the policy.
    sampling = SamplingOptions(max_tokens=3, temperature=0.0)
    for i in range(4):
        async for out in core.generate(RoutingRequest(f"new-{i}", MODEL, [1], sampling)):
            assert out.instance_id != "w0"
    await h.finish()
    for rid in h.prompts:
        assert h.tokens(rid) == h.expected(rid), rid
        last = h.outs[rid][-1]
        assert last.finished and last.finish_reason is FinishReason.LENGTH and last.instance_id != "w0"
    assert fleet["w0"][0].running == 0
    assert not [s for s in core.streams.values() if s.instance_id == "w0"]
    assert core.undrain("w0") and [s.instance_id for s in core.registry.fleet(MODEL)] == ["w0", "w1", "w2"]
    assert not core.undrain("nope")
    with pytest.raises(KeyError):
        await core.drain("nope", timeout_s=1)
    await core.close()


async def test_drain_waits_for_requests_it_cannot_move(fleet: Fleet) -> None:
    """Every destination refuses the admission: the requests are recomputed in place, the drain
    waits for them to finish there and reports them finished, not failed."""
    h = await hotspot(fleet, n=2, max_tokens=40)
    for iid in ("w1", "w2"):
        fleet[iid][0].refuse = True
    result = await h.core.drain("w0", timeout_s=10)
    assert not result.moved and not result.failed and sorted(result.finished) == sorted(h.prompts)
    await h.finish()
    for rid in h.prompts:
        assert h.tokens(rid) == h.expected(rid)
    await h.core.close()


async def test_drain_deadline_reports_what_is_left(fleet: Fleet) -> None:
    h = await hotspot(fleet, n=1, max_tokens=200)
    for iid in ("w1", "w2"):
        fleet[iid][0].refuse = True
    result = await h.core.drain("w0", timeout_s=0.3)
    assert result.failed == ["r-0"] and result.reasons["r-0"] in ("timeout", "admission_failed")
    assert not result.complete
    for t in h.tasks:
        t.cancel()
    await asyncio.gather(*h.tasks, return_exceptions=True)
    await h.core.close()


async def test_rebalancer_moves_requests_off_the_hotspot(fleet: Fleet) -> None:
    h = await hotspot(fleet, n=4, max_tokens=100)
    counter = metrics.REBALANCER_ACTIONS.labels("migrate", "moved")
    before = counter._value.get()
    # mean 4/3: w0 (4) is overloaded until it is down to 2; w1 and w2 take one each.
    params = RebalancerConfig(enabled=True, max_moves_per_period=3, imbalance_ratio=1.5, min_load_gap=1)
    done = await Rebalancer(h.core, params).run_once()
    assert len(done) == 2 and all(outcome == "moved" for _, outcome in done), done
    assert {m.source for m, _ in done} == {"w0"} and {m.destination for m, _ in done} <= {"w1", "w2"}
    assert len({m.destination for m, _ in done}) == 2  # spread, not piled on one
    assert counter._value.get() - before == len(done)
    await h.finish()
    ends = {h.outs[rid][-1].instance_id for rid in h.prompts}
    assert {"w1", "w2"} <= ends
    for rid in h.prompts:
        assert h.tokens(rid) == h.expected(rid), rid
    await h.core.close()


async def test_rebalancer_loop_runs_from_config(fleet: Fleet) -> None:
    params = RebalancerConfig(enabled=True, period_s=0.05, max_moves_per_period=2)
    h = await hotspot(fleet, n=4, max_tokens=100, rebalancer=params)
    await until(lambda: any(s.instance_id != "w0" for s in h.core.streams.values()), "a rebalancing move")
    await h.finish()
    for rid in h.prompts:
        assert h.tokens(rid) == h.expected(rid), rid
    await h.core.close()


async def test_admin_endpoints_and_cli(fleet: Fleet) -> None:
    h = await hotspot(fleet, n=2, max_tokens=80)
    app = build_gateway_app(h.core, tokenizers={}, config=GatewayConfig(api_keys=("k1",)))
    auth = {"Authorization": "Bearer k1"}
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw") as client:
        r = await client.post("/admin/drain", json={"instance": "w0"})
        assert r.status_code == 401
        r = await client.post("/admin/drain", json={"instance": "w0"}, headers={"Authorization": "Bearer x"})
        assert r.status_code == 401
        assert not h.core.registry.is_draining("w0")
        for bad in (b"{", b"[]", b'{"instance": ""}', b'{"instance": "w0", "timeout_s": -1}', b'{"x": 1}'):
            r = await client.post("/admin/drain", content=bad, headers=auth)
            assert r.status_code == 400, bad
        r = await client.post("/admin/drain", json={"instance": "nope"}, headers=auth)
        assert r.status_code == 404 and "nope" in r.json()["error"]["message"]
        r = await client.post("/admin/undrain", json={"instance": "nope"}, headers=auth)
        assert r.status_code == 404
        r = await client.post("/admin/drain", json={"instance": "w0", "timeout_s": 10}, headers=auth)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["complete"] and sorted(body["moved"]) == sorted(h.prompts) and body["failed"] == []
        r = await client.post("/admin/undrain", json={"instance": "w0"}, headers=auth)
        assert r.status_code == 200 and r.json() == {"instance": "w0", "draining": False}
    await h.finish()
    for rid in h.prompts:
        assert h.tokens(rid) == h.expected(rid)

    # The CLI against a real HTTP server (the core's loop serves it; the CLI blocks in a thread).
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    serving = asyncio.create_task(server.serve())
    await until(lambda: server.started, "uvicorn to start")
    port = server.servers[0].sockets[0].getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    out: list[int] = []

    def run_cli(*argv: str) -> None:
        out.append(cli.main(["drain", "--url", url, *argv]))

    for argv in (
        ("w1", "--api-key", "k1", "--timeout-s", "5"),
        ("w1", "--api-key", "bad"),
        ("w1", "--undrain", "--api-key", "k1"),
    ):
        t = threading.Thread(target=run_cli, args=argv)
        t.start()
        await asyncio.to_thread(t.join)
    assert out == [0, 1, 0]
    assert not h.core.registry.is_draining("w1")
    server.should_exit = True
    await serving
    await h.core.close()


async def test_health_is_unavailable_while_every_instance_is_drained(fleet: Fleet) -> None:
    """/health (the router pods' readiness probe) answers 503 with the reason once no instance
    can take new work (every one drained, or none left), and 200 again after an undrain."""
    core = RouterCore(RouterConfig(policy="round_robin", load_report_interval_s=0.02))
    core.apply_membership(Membership(1, tuple(i for _, i, _ in fleet.values())))
    await core.start()
    reg = core.registry
    await until(lambda: all((s := reg.get(i)) is not None and s.report for i in fleet), "every report")
    app = build_gateway_app(core, tokenizers={}, config=GatewayConfig())
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw") as client:
        assert (await client.get("/health")).status_code == 200
        for iid in ("w0", "w1"):
            r = await client.post("/admin/drain", json={"instance": iid, "timeout_s": 5})
            assert r.status_code == 200, r.text
        assert (await client.get("/health")).status_code == 200, "w2 still takes new work"
        assert (await client.post("/admin/drain", json={"instance": "w2", "timeout_s": 5})).status_code == 200
        drained = await client.get("/health")
        await client.post("/admin/undrain", json={"instance": "w1"})
        undrained = await client.get("/health")
        await core.close()
        gone = await client.get("/health")
    assert drained.status_code == 503, drained.text
    assert drained.json()["status"] == "unavailable" and drained.json()["instances"] == 3
    assert drained.json()["reason"] == "every live engine instance is draining (3 of 3)"
    assert undrained.status_code == 200 and undrained.json()["status"] == "ok"
    assert gone.status_code == 503 and gone.json()["reason"] == "no live engine instances"


def test_cli_prints_result(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """A failed request in the result is exit status 1."""

    class Resp:
        def __enter__(self) -> Resp:
            return self

        def __exit__(self, *a: object) -> None:
            return None

        def read(self) -> bytes:
            return json.dumps({"instance": "w0", "moved": [], "finished": [], "failed": ["r"]}).encode()

    monkeypatch.setattr("urllib.request.urlopen", lambda req, timeout: Resp())
    assert cli.main(["drain", "--url", "http://x", "w0"]) == 1
    assert '"failed"' in capsys.readouterr().out


async def test_cancelled_drain_never_cuts_a_stream(fleet: Fleet) -> None:
    """A drain cancelled mid-move (its HTTP client went away): the move in flight completes,
    every stream still ends with the exact tokens, and the instance stays draining."""
    h = await hotspot(fleet, n=3, max_tokens=80)
    task = asyncio.create_task(h.core.drain("w0", timeout_s=10))
    await until(lambda: any(s.moving for s in h.core.streams.values()), "a move to start")
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await h.finish()
    for rid in h.prompts:
        assert h.tokens(rid) == h.expected(rid), rid
        assert h.outs[rid][-1].finish_reason is FinishReason.LENGTH
    assert h.core.registry.is_draining("w0")
    await h.core.close()
