"""SimEngine in real time (asyncio, the Engine protocol) and SimFleet in virtual time."""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from switchyard.config import EngineConfig, SimConfig
from switchyard.errors import ConfigError, EngineDeadError
from switchyard.messages import EngineOutput, EngineRequest, FinishReason, SamplingOptions
from switchyard.workers.engine import Engine
from switchyard.workers.sim.cost import StepCostModel, StepWork, load_profile, prefill_pairs
from switchyard.workers.sim.engine import SimEngine, SimFleet, VirtualClock
from switchyard.workers.sim.instance import SimInstance, simulated_token_id

COST = StepCostModel.from_profile(load_profile("llama3.1-8b-h100"))


def make_instance(instance_id: str = "sim-t", **overrides: Any) -> SimInstance:
    kwargs: dict[str, Any] = dict(
        block_size=16, num_kv_blocks=256, max_model_len=2048, max_num_seqs=16, max_num_batched_tokens=512
    )
    kwargs.update(overrides)
    return SimInstance(COST, instance_id=instance_id, vocab_size=1000, **kwargs)


def make_request(request_id: str, prompt_len: int = 100, max_tokens: int = 8, base: int = 0) -> EngineRequest:
    return EngineRequest(
        request_id, tuple(range(base, base + prompt_len)), SamplingOptions(max_tokens=max_tokens)
    )


def modeled_seconds(req: EngineRequest) -> float:
    """What an idle instance takes for ``req`` alone, by stepping a twin instance."""
    twin, total = make_instance(), 0.0
    twin.add_request(req)
    while twin.has_work:
        total += twin.step().duration_s
    return total


@pytest.fixture
async def engine() -> AsyncIterator[SimEngine]:
    """A real-time engine; afterwards nothing may be left in flight."""
    eng = SimEngine(make_instance())
    yield eng
    await eng.close()
    assert not eng.instance.has_work
    assert asyncio.all_tasks() == {asyncio.current_task()}


# (g) real time


async def test_sim_engine_implements_engine_protocol(engine: SimEngine) -> None:
    """SimEngine is an Engine, with the instance's block size and context length."""
    as_engine: Engine = engine
    assert isinstance(as_engine, Engine)
    assert (engine.block_size, engine.max_model_len) == (16, 2048)


async def test_generate_streams_deterministic_tokens_at_modeled_speed(engine: SimEngine) -> None:
    """Tokens arrive one delta per step, take at least the modeled time, and are the request's fixed IDs."""
    req = make_request("r", max_tokens=10)
    start = time.monotonic()
    outputs = [out async for out in engine.generate(req)]
    elapsed = time.monotonic() - start
    assert [t for o in outputs for t in o.token_ids] == [simulated_token_id("r", i, 1000) for i in range(10)]
    assert outputs[-1].finished and outputs[-1].finish_reason is FinishReason.LENGTH
    assert all(o.num_prompt_tokens == 100 and o.instance_id == "sim-t" for o in outputs)
    modeled = modeled_seconds(req)
    assert modeled * 0.9 <= elapsed < modeled + 1.0
    assert engine.load().step_time_s > 0


async def test_cancelling_the_consumer_aborts_the_request(engine: SimEngine) -> None:
    """Cancelling the task iterating generate() aborts the request and frees its blocks."""
    first = asyncio.Event()

    async def consume() -> None:
        async for _ in engine.generate(make_request("r", max_tokens=1000)):
            first.set()

    task = asyncio.create_task(consume())
    await first.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert "r" not in engine.instance
    assert engine.load().kv_blocks_used == 0


async def test_closing_the_stream_aborts_the_request(engine: SimEngine) -> None:
    """aclose() on the iterator (a client that went away) aborts the request."""
    stream = engine.generate(make_request("r", max_tokens=1000))
    await anext(stream)
    await stream.aclose()
    assert "r" not in engine.instance


async def test_abort_ends_the_stream_with_an_abort_delta(engine: SimEngine) -> None:
    """abort() returns True and the stream's last delta is empty with FinishReason.ABORT."""
    outputs: list[EngineOutput] = []
    async for out in engine.generate(make_request("r", max_tokens=1000)):
        outputs.append(out)
        if len(outputs) == 1:
            assert await engine.abort("r") is True
    assert outputs[-1].finish_reason is FinishReason.ABORT and outputs[-1].token_ids == ()
    assert outputs[-1].num_prompt_tokens == 100
    assert await engine.abort("r") is False


async def test_concurrent_requests_share_batches(engine: SimEngine) -> None:
    """Two concurrent streams are served by the same steps (continuous batching), both to the end."""
    started = [asyncio.Event(), asyncio.Event()]

    async def consume(i: int) -> list[EngineOutput]:
        outs = []
        async for out in engine.generate(make_request(f"r{i}", max_tokens=20, base=1000 * i)):
            started[i].set()
            outs.append(out)
        return outs

    tasks = [asyncio.create_task(consume(i)) for i in range(2)]
    await asyncio.wait_for(asyncio.gather(*(e.wait() for e in started)), 5)
    assert engine.load().num_running == 2
    results = await asyncio.gather(*tasks)
    assert [sum(len(o.token_ids) for o in outs) for outs in results] == [20, 20]


async def test_close_fails_open_streams_with_engine_dead(engine: SimEngine) -> None:
    """close() aborts everything: open streams raise EngineDeadError, new requests are refused."""
    first = asyncio.Event()

    async def consume() -> None:
        async for _ in engine.generate(make_request("r", max_tokens=1000)):
            first.set()

    task = asyncio.create_task(consume())
    await first.wait()
    await engine.close()
    with pytest.raises(EngineDeadError):
        await task
    with pytest.raises(EngineDeadError):
        await anext(engine.generate(make_request("late")))


def test_from_config_builds_real_time_engine_only() -> None:
    """time_mode=real builds a SimEngine; virtual time is SimFleet's job and is refused here."""
    eng = SimEngine.from_config(EngineConfig(kind="sim", block_size=16), instance_id="a")
    assert (eng.block_size, eng.instance.instance_id) == (16, "a")
    with pytest.raises(ConfigError, match="SimFleet"):
        SimEngine.from_config(EngineConfig(kind="sim", sim=SimConfig(time_mode="virtual")))


# (h) virtual time


def replay(num_instances: int, num_requests: int) -> list[tuple[float, str, str, tuple[int, ...], bool]]:
    """Requests in 20 shared-prefix groups, routed by group, arriving every 10 ms of virtual time."""
    records: list[tuple[float, str, str, tuple[int, ...], bool]] = []
    fleet = SimFleet(
        [make_instance(f"sim-{i}") for i in range(num_instances)],
        on_output=lambda t, iid, o: records.append((t, iid, o.request_id, tuple(o.token_ids), o.finished)),
    )
    for k in range(num_requests):
        group = k % 20
        prompt = (*range(group * 10_000, group * 10_000 + 256), *range(k * 7, k * 7 + 40))
        req = EngineRequest(f"q{k}", prompt, SamplingOptions(max_tokens=16 + k % 17))
        fleet.call_at(k * 0.01, functools.partial(fleet.submit, f"sim-{group % num_instances}", req))
    fleet.run()
    hits = sum(inst.prefix_cache_hits_total for inst in fleet.instances.values())
    assert hits > 0
    return records


def test_virtual_fleet_runs_many_requests_fast_and_deterministically() -> None:
    """600 requests on 16 instances replay in well under real time, identically twice, all finished."""
    start = time.monotonic()
    first = replay(16, 600)
    wall = time.monotonic() - start
    assert first == replay(16, 600)
    assert sum(1 for r in first if r[4]) == 600
    assert wall < 5.0 and first[-1][0] > wall
    assert [r[0] for r in first] == sorted(r[0] for r in first)


def test_virtual_first_token_time_is_the_prefill_step_duration() -> None:
    """A request arriving at t=1 on an idle instance gets its first token after exactly one modeled step."""
    outputs: list[tuple[float, EngineOutput]] = []
    fleet = SimFleet([make_instance()], on_output=lambda t, _iid, o: outputs.append((t, o)))
    fleet.call_at(1.0, lambda: fleet.submit("sim-t", make_request("r", prompt_len=300, max_tokens=2)))
    fleet.run()
    work = StepWork(num_tokens=300, num_sampled=1, prefill_pairs=prefill_pairs(300, 0), num_seqs=1)
    assert outputs[0][0] == pytest.approx(1.0 + COST.step_time_s(work), rel=1e-12)
    assert outputs[1][0] > outputs[0][0] and outputs[1][1].finished


def test_request_submitted_mid_step_joins_the_next_step() -> None:
    """A request arriving during a step waits for it to end; its first token comes with the next step's."""
    times: dict[str, list[float]] = {}
    fleet = SimFleet(
        [make_instance()], on_output=lambda t, _iid, o: times.setdefault(o.request_id, []).append(t)
    )
    fleet.submit("sim-t", make_request("a", prompt_len=500, max_tokens=3))
    fleet.call_at(
        0.001, lambda: fleet.submit("sim-t", make_request("b", prompt_len=50, max_tokens=1, base=900))
    )
    fleet.run()
    assert times["b"][0] == times["a"][1] > times["a"][0] > 0.001


def test_virtual_abort_suppresses_outputs_of_the_step_in_flight() -> None:
    """Aborting during a step frees the request at once and delivers none of its outputs."""
    outputs: list[EngineOutput] = []
    fleet = SimFleet([make_instance()], on_output=lambda _t, _iid, o: outputs.append(o))
    fleet.submit("sim-t", make_request("a", max_tokens=5))
    fleet.call_at(
        0.001, lambda: outputs.append(EngineOutput("marker", ())) if fleet.abort("sim-t", "a") else None
    )
    fleet.run()
    assert [o.request_id for o in outputs] == ["marker"]
    assert fleet.load("sim-t").kv_blocks_used == 0


def test_run_until_stops_the_clock_there_and_resumes() -> None:
    """run(until) processes events up to that time and leaves the clock at it; run() finishes the rest."""
    done: list[float] = []
    fleet = SimFleet([make_instance()], on_output=lambda t, _iid, o: done.append(t) if o.finished else None)
    fleet.submit("sim-t", make_request("a", max_tokens=50))
    fleet.run(until=0.05)
    assert fleet.now == 0.05 and not done and fleet.pending_events == 1
    assert fleet.load("sim-t").timestamp == 0.05
    fleet.run()
    assert len(done) == 1 and done[0] > 0.05


def test_virtual_clock_only_moves_forward() -> None:
    """The virtual clock is callable like time.monotonic and refuses to go back."""
    clock = VirtualClock(2.0)
    clock.advance_to(3.5)
    assert clock() == clock.now == 3.5
    with pytest.raises(ValueError):
        clock.advance_to(1.0)


def _seeded_tokens(seed: int) -> dict[str, list[int]]:
    """Token IDs of two requests on a two-instance virtual fleet built from ``EngineConfig(seed=...)``."""
    config = EngineConfig(kind="sim", seed=seed, sim=SimConfig(time_mode="virtual", num_kv_blocks=256))
    fleet = SimFleet.from_config(config, 2)
    tokens: dict[str, list[int]] = {"a": [], "b": []}
    fleet.on_output = lambda _t, _iid, out: tokens[out.request_id].extend(out.token_ids)
    fleet.submit("sim-0", make_request("a", max_tokens=20))
    fleet.submit("sim-1", make_request("b", max_tokens=20))
    fleet.run()
    return tokens


def test_the_engine_seed_decides_the_emitted_tokens() -> None:
    """EngineConfig.seed reaches the simulator: the same seed repeats a run's tokens, another seed
    gives other ones (before, they depended on the request id alone). Seed 0, the default, keeps
    the sequences runs had before the seed counted."""
    first = _seeded_tokens(7)
    assert first == _seeded_tokens(7)
    assert all(len(t) == 20 for t in first.values())
    assert first["a"] == [simulated_token_id("a", i, 32000, seed=7) for i in range(20)]
    other = _seeded_tokens(8)
    assert other["a"] != first["a"] and other["b"] != first["b"]
    assert _seeded_tokens(0)["a"] == [simulated_token_id("a", i, 32000) for i in range(20)]
    assert SimInstance.from_config(EngineConfig(kind="sim", seed=-3)).seed == -3


def test_fleet_from_config_builds_numbered_instances() -> None:
    """from_config builds sim-0 … sim-{n-1} from one EngineConfig."""
    fleet = SimFleet.from_config(
        EngineConfig(kind="sim", sim=SimConfig(time_mode="virtual", num_kv_blocks=64)), 3
    )
    assert sorted(fleet.instances) == ["sim-0", "sim-1", "sim-2"]
