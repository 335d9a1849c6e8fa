"""SimInstance: the vLLM V1 scheduling, paged-KV and prefix-cache model behind the simulator."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import pytest

from switchyard.config import EngineConfig, SimConfig
from switchyard.errors import ConfigError, ContextLengthError, EngineRequestError, InvalidRequestError
from switchyard.messages import EngineOutput, EngineRequest, FinishReason, SamplingOptions
from switchyard.workers.sim.cost import StepCostModel, load_profile, prefill_pairs
from switchyard.workers.sim.instance import SimInstance, StepResult, simulated_token_id

PROFILE = load_profile("llama3.1-8b-h100")
COST = StepCostModel.from_profile(PROFILE)
C = PROFILE.step_time_ms  # the constants the expected durations are computed from


def make_instance(**overrides: Any) -> SimInstance:
    """A small instance: 16-token blocks, 64 blocks, 256-token budget, 8 seats."""
    kwargs: dict[str, Any] = dict(
        instance_id="sim-t",
        block_size=16,
        num_kv_blocks=64,
        max_model_len=1024,
        max_num_seqs=8,
        max_num_batched_tokens=256,
        vocab_size=1000,
    )
    kwargs.update(overrides)
    return SimInstance(COST, **kwargs)


def make_request(
    request_id: str, prompt: Sequence[int], max_tokens: int = 4, **sampling: Any
) -> EngineRequest:
    return EngineRequest(request_id, tuple(prompt), SamplingOptions(max_tokens=max_tokens, **sampling))


def expected_ms(*, T: int, S: int, P: float, C_ctx: int, B: int) -> float:
    """sim-profiles.md §1 with the reference profile's constants."""
    return (
        C.t_fixed
        + math.sqrt(C.t_weights**2 + (C.c_lin * T + C.c_head * S) ** 2)
        + C.c_attn_pair * P
        + C.c_kv * C_ctx
        + C.c_seq * B
    )


def run(inst: SimInstance) -> tuple[float, dict[str, list[EngineOutput]], list[StepResult]]:
    """Step until idle; returns elapsed modeled seconds, outputs per request, and the steps."""
    elapsed, outputs, steps = 0.0, dict[str, list[EngineOutput]](), list[StepResult]()
    while inst.has_work:
        result = inst.step()
        elapsed += result.duration_s
        steps.append(result)
        for out in result.outputs:
            outputs.setdefault(out.request_id, []).append(out)
    return elapsed, outputs, steps


def time_to_first_token(inst: SimInstance, req: EngineRequest) -> float:
    """Modeled seconds from adding ``req`` to an idle instance until its first token is out."""
    inst.add_request(req)
    elapsed = 0.0
    while True:
        result = inst.step()
        elapsed += result.duration_s
        if any(o.request_id == req.request_id for o in result.outputs):
            run(inst)
            return elapsed


# (a) step time and KV accounting follow the cost model exactly


def test_mixed_batch_step_durations_follow_cost_formula_exactly() -> None:
    """Decode-first batches with a chunked prefill cost exactly the §1 formula of their T, S, P, C, B."""
    inst = make_instance()
    inst.add_request(make_request("a", range(40), max_tokens=10))
    first = inst.step()  # a: whole 40-token prompt, samples its first token
    assert first.duration_s * 1e3 == pytest.approx(
        expected_ms(T=40, S=1, P=prefill_pairs(40, 0), C_ctx=0, B=1)
    )
    inst.add_request(make_request("b", range(1000, 1300)))
    second = inst.step()  # a decodes over 41 tokens; b prefills 255 of 300 (budget 256)
    assert (second.work.num_tokens, second.work.num_sampled, second.work.num_seqs) == (256, 1, 2)
    assert second.duration_s * 1e3 == pytest.approx(
        expected_ms(T=256, S=1, P=255 * (0 + 256 / 2), C_ctx=41, B=2), rel=1e-12
    )
    third = inst.step()  # a decodes over 42; b's last 45 tokens attend over its first 255
    assert third.duration_s * 1e3 == pytest.approx(
        expected_ms(T=46, S=2, P=45 * (255 + 46 / 2), C_ctx=42, B=2), rel=1e-12
    )
    assert [o.request_id for o in third.outputs] == ["a", "b"]


def test_kv_blocks_in_use_are_ceil_of_computed_tokens_per_request() -> None:
    """Each request holds ceil(computed tokens / block_size) blocks; the report counts exactly those."""
    inst = make_instance()
    inst.add_request(make_request("a", range(40), max_tokens=10))
    inst.step()
    assert inst.load(0.0).kv_blocks_used == 3  # 40 computed
    inst.add_request(make_request("b", range(1000, 1300)))
    inst.step()
    assert inst.load(0.0).kv_blocks_used == 3 + 16  # a: 41 computed, b: 255
    inst.step()
    assert inst.load(0.0).kv_blocks_used == 3 + 19  # a: 42, b: 300
    assert inst.load(0.0).kv_blocks_total == 64


@pytest.mark.parametrize(("prompt_len", "published_ms"), [(512, 16), (2048, 56), (8192, 241), (32768, 1303)])
def test_isolated_prefill_reproduces_research_table(prompt_len: int, published_ms: float) -> None:
    """One prompt on an idle reference instance (8192-token chunks) prefills in the time of §3.1."""
    inst = SimInstance(
        COST, block_size=16, num_kv_blocks=4096, max_model_len=65536, max_num_batched_tokens=8192
    )
    ttft = time_to_first_token(inst, make_request("r", range(prompt_len), max_tokens=1))
    assert ttft * 1e3 == pytest.approx(published_ms, rel=0.02, abs=0.5)


def test_load_report_describes_queue_and_counters() -> None:
    """Running, waiting, waiting prefill tokens and the recent mean step time are reported."""
    inst = make_instance(max_num_seqs=1)
    inst.add_request(make_request("a", range(100), max_tokens=3))
    inst.add_request(make_request("b", range(200, 250), max_tokens=3))
    assert inst.load(1.0).waiting_prefill_tokens == 150
    durations = [inst.step().duration_s, inst.step().duration_s]
    report = inst.load(2.0)
    assert (report.timestamp, report.num_running, report.num_waiting) == (2.0, 1, 1)
    assert report.waiting_prefill_tokens == 50
    assert report.step_time_s == pytest.approx(sum(durations) / 2)
    assert report.prefix_cache_queries_total == 100


# (b) prefix-cache hits reduce simulated prefill


def test_shared_prefix_is_served_from_cache_and_prefills_faster() -> None:
    """The second request sharing a 200-token prefix hits its 12 full blocks: fewer tokens, lower TTFT."""
    inst = make_instance()
    prefix = list(range(5000, 5200))
    ttft_cold = time_to_first_token(inst, make_request("a", [*prefix, 1, 2, 3]))
    computed_cold = inst.num_computed_tokens_total
    before = inst.load(0.0)
    ttft_warm = time_to_first_token(inst, make_request("b", [*prefix, 7, 8, 9]))
    after = inst.load(0.0)
    assert ttft_warm < ttft_cold
    assert after.prefix_cache_queries_total - before.prefix_cache_queries_total == 203
    assert after.prefix_cache_hits_total - before.prefix_cache_hits_total == 192
    assert inst.num_computed_tokens_total - computed_cold == computed_cold - 192


def test_first_output_reports_cached_prompt_tokens() -> None:
    """num_prompt_tokens and num_cached_tokens ride on every output delta of the request."""
    inst = make_instance()
    run_ids = [make_request("a", range(64), max_tokens=1), make_request("b", range(64), max_tokens=2)]
    for req in run_ids:
        inst.add_request(req)
        _, outputs, _ = run(inst)
    assert [(o.num_prompt_tokens, o.num_cached_tokens) for o in outputs["b"]] == [(64, 48), (64, 48)]


def test_identical_prompt_still_recomputes_its_last_token() -> None:
    """A fully cached prompt computes one token (vLLM must run the last one to sample)."""
    inst = make_instance()
    inst.add_request(make_request("a", range(160), max_tokens=1))
    run(inst)
    inst.add_request(make_request("b", range(160), max_tokens=1))
    step = inst.step()
    assert step.outputs[0].num_cached_tokens == 144  # 9 of 10 blocks: the 10th holds the last token
    assert (step.work.num_tokens, step.work.prefill_pairs) == (16, prefill_pairs(16, 144))


def test_disabled_prefix_caching_never_hits() -> None:
    """With enable_prefix_caching off, repeated prompts are recomputed in full."""
    inst = make_instance(enable_prefix_caching=False)
    for rid in ("a", "b"):
        inst.add_request(make_request(rid, range(100), max_tokens=1))
        run(inst)
    assert inst.load(0.0).prefix_cache_hits_total == 0
    assert inst.num_computed_tokens_total == 200


# (c) LRU eviction of free cached blocks


def test_eviction_takes_least_recently_used_free_cached_blocks() -> None:
    """A prefix touched after another was freed survives the next allocation burst; the other is evicted."""
    inst = make_instance(num_kv_blocks=12, max_model_len=192)
    prompt_a, prompt_b = list(range(64)), list(range(100, 164))
    for rid, prompt in [("a", prompt_a), ("b", prompt_b), ("a2", [*prompt_a[:48], *range(900, 916)])]:
        inst.add_request(make_request(rid, prompt, max_tokens=1))  # a2 re-uses (touches) a's first 3 blocks
        run(inst)
    assert inst.num_cached_blocks == 4 + 4 + 1  # a, b, and a2's own last block: b is still findable
    inst.add_request(make_request("c", range(300, 428), max_tokens=1))  # needs 8 of the 12 blocks
    run(inst)
    inst.add_request(make_request("a3", prompt_a, max_tokens=1))
    _, a3, _ = run(inst)
    inst.add_request(make_request("b2", prompt_b, max_tokens=1))
    _, b2, _ = run(inst)
    assert a3["a3"][0].num_cached_tokens == 48  # recently used blocks kept
    assert b2["b2"][0].num_cached_tokens == 0  # freed earlier than a's touch: evicted


def test_cached_blocks_are_evicted_only_when_blocks_are_needed() -> None:
    """Finished requests leave their full blocks findable; usage counts only referenced blocks."""
    inst = make_instance()
    inst.add_request(make_request("a", range(64), max_tokens=1))
    run(inst)
    assert inst.load(0.0).kv_blocks_used == 0
    assert inst.num_cached_blocks == 4
    assert inst.num_free_blocks == 64


# (d) chunked prefill respects the token budget


def test_chunked_prefill_never_exceeds_token_budget() -> None:
    """With a 64-token budget no step schedules more than 64 tokens; a 200-token prompt takes 4 chunks."""
    inst = make_instance(max_num_batched_tokens=64)
    inst.add_request(make_request("long", range(200), max_tokens=2))
    _, _, steps = run(inst)
    assert [s.work.num_tokens for s in steps[:4]] == [64, 64, 64, 8]
    assert [len(s.outputs) for s in steps[:4]] == [0, 0, 0, 1]
    for i in range(3):
        inst.add_request(make_request(f"r{i}", range(1000 * i, 1000 * i + 150), max_tokens=5))
    _, _, steps = run(inst)
    assert max(s.work.num_tokens for s in steps) <= 64


def test_running_decodes_are_scheduled_before_waiting_prefills() -> None:
    """A decoding request gets a token every step while a long prompt is chunked around it."""
    inst = make_instance(max_num_batched_tokens=32)
    inst.add_request(make_request("d", range(10), max_tokens=8))
    inst.step()
    inst.add_request(make_request("p", range(500, 800), max_tokens=1))
    for _ in range(7):
        step = inst.step()
        assert "d" in [o.request_id for o in step.outputs]
        assert step.work.num_tokens == 32  # 1 decode + 31 prefill tokens


def test_max_num_seqs_caps_the_batch() -> None:
    """No step holds more sequences than max_num_seqs; the rest wait."""
    inst = make_instance(max_num_seqs=3)
    for i in range(6):
        inst.add_request(make_request(f"r{i}", range(i * 100, i * 100 + 20), max_tokens=3))
    _, outputs, steps = run(inst)
    assert max(s.work.num_seqs for s in steps) == 3
    assert len(outputs) == 6


# (e) abort frees blocks


def test_abort_running_request_frees_its_blocks() -> None:
    """Aborting a running request releases its blocks at once; it emits nothing afterwards."""
    inst = make_instance()
    inst.add_request(make_request("a", range(100), max_tokens=50))
    inst.step()
    assert inst.load(0.0).kv_blocks_used == 7
    assert inst.abort("a") is True
    assert inst.abort("a") is False
    report = inst.load(0.0)
    assert (report.kv_blocks_used, report.num_running, inst.has_work) == (0, 0, False)
    assert inst.step().outputs == ()


def test_abort_waiting_request_leaves_queue_and_load() -> None:
    """A waiting request that is aborted is never scheduled and leaves the waiting counters."""
    inst = make_instance(max_num_seqs=1)
    inst.add_request(make_request("a", range(10), max_tokens=2))
    inst.add_request(make_request("b", range(50, 90), max_tokens=2))
    assert inst.abort("b") is True
    report = inst.load(0.0)
    assert (report.num_waiting, report.waiting_prefill_tokens) == (1, 10)
    _, outputs, _ = run(inst)
    assert list(outputs) == ["a"]


# (f) preemption under block pressure


def test_block_pressure_preempts_recomputes_and_finishes_every_request() -> None:
    """Out of blocks, the latest running request is preempted and recomputed; all finish, same tokens."""
    inst = make_instance(num_kv_blocks=16, max_model_len=256)
    prompts = {f"r{i}": list(range(i * 1000, i * 1000 + 60)) for i in range(6)}
    for rid, prompt in prompts.items():
        inst.add_request(make_request(rid, prompt, max_tokens=60))
    _, outputs, steps = run(inst)
    assert inst.num_preemptions_total > 0
    assert sum(s.num_preempted for s in steps) == inst.num_preemptions_total
    for rid in prompts:
        tokens = [t for o in outputs[rid] for t in o.token_ids]
        assert tokens == [simulated_token_id(rid, i, 1000) for i in range(60)], f"{rid=}"
        assert outputs[rid][-1].finish_reason is FinishReason.LENGTH
    assert inst.num_computed_tokens_total > 6 * (60 + 59)  # recompute costs extra work
    assert inst.load(0.0).kv_blocks_used == 0
    assert inst.load(0.0).num_preemptions_total == inst.num_preemptions_total


# request lifecycle


def test_stop_token_finishes_unless_ignore_eos_or_before_min_tokens() -> None:
    """A generated stop ID ends the request with STOP; ignore_eos and min_tokens override it."""
    stop = simulated_token_id("s", 2, 1000)
    cases: list[tuple[dict[str, Any], int, FinishReason]] = [
        ({}, 3, FinishReason.STOP),
        ({"ignore_eos": True}, 6, FinishReason.LENGTH),
        ({"min_tokens": 4}, 6, FinishReason.LENGTH),
    ]
    for extra, length, reason in cases:
        inst = make_instance()
        inst.add_request(make_request("s", range(8), max_tokens=6, stop_token_ids=(stop,), **extra))
        _, outputs, _ = run(inst)
        assert (len(outputs["s"]), outputs["s"][-1].finish_reason) == (length, reason), f"{extra=}"


def test_generation_stops_at_max_model_len() -> None:
    """Prompt + output never exceeds max_model_len; the request ends with LENGTH."""
    inst = make_instance(max_model_len=100)
    inst.add_request(make_request("a", range(95), max_tokens=50))
    _, outputs, _ = run(inst)
    assert len(outputs["a"]) == 5 and outputs["a"][-1].finish_reason is FinishReason.LENGTH


def test_unusable_requests_are_rejected_with_switchyard_errors() -> None:
    """Empty prompts, over-long prompts and duplicate IDs raise the matching error."""
    inst = make_instance(max_model_len=100)
    with pytest.raises(InvalidRequestError):
        inst.add_request(make_request("e", []))
    with pytest.raises(ContextLengthError):
        inst.add_request(make_request("l", range(101)))
    inst.add_request(make_request("d", range(5)))
    with pytest.raises(EngineRequestError):
        inst.add_request(make_request("d", range(5)))


def test_context_that_cannot_fit_kv_is_a_config_error() -> None:
    """max_model_len beyond the KV capacity would deadlock the scheduler, so it is refused up front."""
    with pytest.raises(ConfigError):
        make_instance(num_kv_blocks=4, max_model_len=128)


def test_from_config_sizes_kv_from_profile_and_block_size() -> None:
    """Without num_kv_blocks the profile's KV token capacity is cut into the engine's blocks."""
    inst = SimInstance.from_config(EngineConfig(kind="sim", block_size=32), instance_id="x")
    assert inst.num_kv_blocks == PROFILE.engine.kv_cache_tokens // 32
    assert inst.max_model_len == PROFILE.model.max_model_len
    small = SimInstance.from_config(EngineConfig(kind="sim", sim=SimConfig(num_kv_blocks=10)))
    assert small.max_model_len == 320
