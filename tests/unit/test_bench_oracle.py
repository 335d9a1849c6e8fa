"""The benchmark's oracle on cases small enough to check by hand."""

from __future__ import annotations

from bench.oracle import OraclePolicy, oracle_ttft_s
from bench.replay import engine_config
from switchyard.messages import EngineRequest, SamplingOptions
from switchyard.workers.sim.cost import StepWork, prefill_pairs
from switchyard.workers.sim.instance import SimInstance
from switchyard.workers.sim.request import chain_hashes
from tests.helpers.builders import make_registry, make_request

CFG = engine_config("llama3.1-8b-h100")


def instance(iid: str) -> SimInstance:
    return SimInstance.from_config(CFG, instance_id=iid)


def run(inst: SimInstance, tokens: list[int], rid: str) -> None:
    inst.add_request(EngineRequest(rid, tokens, SamplingOptions(max_tokens=1, ignore_eos=True)))
    while inst.has_work:
        inst.step()


def test_idle_and_cached_ttft_are_the_cost_models_own_steps() -> None:
    inst = instance("a")
    bs = inst.block_size
    prompt = list(range(1, 10 * bs + 1))  # ten full blocks, fits one chunk
    hashes = chain_hashes(prompt, len(prompt) // bs - 1, bs)
    cold = inst.cost.step_time_s(StepWork(len(prompt), 1, prefill_pairs(len(prompt), 0), 0, 1))
    assert oracle_ttft_s(inst, hashes, len(prompt)) == cold
    run(inst, prompt, "warm")
    hashes = chain_hashes(prompt, (len(prompt) - 1) // bs, bs)
    cached = 9 * bs  # the last block is recomputed: one token must be sampled
    warm = inst.cost.step_time_s(StepWork(bs, 1, prefill_pairs(bs, cached), 0, 1))
    assert oracle_ttft_s(inst, hashes, len(prompt)) == warm < cold


def test_the_oracle_picks_the_cache_then_the_empty_queue() -> None:
    a, b = instance("w0"), instance("w1")
    bs = a.block_size
    prompt = list(range(1, 40 * bs + 1))
    run(b, prompt, "earlier")  # w1 holds the prompt's prefix
    policy = OraclePolicy({"w0": a, "w1": b})
    fleet = make_registry(2).fleet("m")
    req = make_request("r", tokens=0)
    req = type(req)("r", "m", prompt, req.sampling)
    assert policy.choose(req, fleet).instance_id == "w1"
    long_prompt = list(range(50_000, 50_000 + 200 * bs))  # queue a long prefill on w1
    b.add_request(EngineRequest("busy", long_prompt, SamplingOptions(max_tokens=1, ignore_eos=True)))
    fresh = type(req)("f", "m", list(range(90_000, 90_000 + 8 * bs)), req.sampling)
    assert policy.choose(fresh, fleet).instance_id == "w0"
