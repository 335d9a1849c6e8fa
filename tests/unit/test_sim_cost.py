"""The simulator's step-time model and its GPU profiles (sim-profiles.md §1, §10)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from switchyard.config import SimConfig
from switchyard.errors import ConfigError
from switchyard.workers.sim.cost import (
    StepCostModel,
    StepWork,
    available_profiles,
    load_profile,
    prefill_pairs,
)

PROFILE_DIR = Path(__file__).resolve().parents[2] / "switchyard" / "workers" / "sim" / "profiles"

EXPECTED_PROFILES = {
    "llama3.1-8b-h100",
    "llama3.1-8b-a100",
    "qwen2.5-7b-h100",
    "qwen2.5-7b-a100",
    "qwen2.5-14b-h100",
    "qwen2.5-14b-a100",
    "qwen2.5-14b-h100-tp2",
    "llama3.1-70b-h100-tp4",
}


def raw_coefficients(name: str) -> dict[str, Any]:
    """The profile's step-time constants read straight from its JSON, bypassing the loader."""
    coefficients: dict[str, Any] = json.loads((PROFILE_DIR / f"{name}.json").read_text())["step_time_ms"]
    return coefficients


def formula_ms(c: dict[str, Any], *, T: int, S: int, P: float, C: int, B: int, tp: int = 1) -> float:
    """sim-profiles.md §1, written out independently of the implementation."""
    t = (
        c["t_fixed"]
        + math.sqrt(c["t_weights"] ** 2 + (c["c_lin"] * T + c["c_head"] * S) ** 2)
        + c["c_attn_pair"] * P
        + c["c_kv"] * C
        + c["c_seq"] * B
    )
    ar = c["allreduce"]
    if tp > 1 and ar is not None:
        t += ar["calls_per_step"] * (
            ar["latency_ms"] + 2 * (tp - 1) / tp * T * ar["bytes_per_token"] / ar["bus_bw_bytes_per_s"] * 1e3
        )
    return float(t)


def test_all_recommended_profiles_ship_with_sources() -> None:
    """Every §10 profile loads under its file name, and each one cites where its numbers came from."""
    assert set(available_profiles()) == EXPECTED_PROFILES
    for name in available_profiles():
        profile = load_profile(name)
        assert profile.name == name
        assert len(profile.sources) >= 3, f"{name=}"
        assert any("sim-profiles.md" in s for s in profile.sources), f"{name=}"
        assert profile.engine.kv_cache_tokens // profile.engine.block_size > 0


def test_default_sim_config_names_the_reference_profile() -> None:
    """SimConfig's default profile exists and is the calibrated Llama-3.1-8B / H100 pair."""
    profile = load_profile(SimConfig().profile)
    assert profile.id == "llama-3.1-8b-instruct/h100-sxm5-80gb/tp1"
    assert profile.status.startswith("calibrated")


def test_unknown_profile_is_a_config_error_listing_known_names() -> None:
    """A typo in the profile name fails at start-up and says which names exist."""
    with pytest.raises(ConfigError, match=r"llama3\.1-8b-h100"):
        load_profile("llama-8b-h100")


@pytest.mark.parametrize("name", sorted(EXPECTED_PROFILES))
@pytest.mark.parametrize(
    ("T", "S", "P", "C", "B"),
    [(1, 1, 0.0, 512, 1), (8192, 1, prefill_pairs(8192, 0), 0, 1), (300, 40, 5e5, 90_000, 44)],
)
def test_step_time_is_the_profile_formula_exactly(
    name: str, T: int, S: int, P: float, C: int, B: int
) -> None:
    """The model's step time equals §1's formula evaluated with the profile's JSON constants."""
    profile = load_profile(name)
    model = StepCostModel.from_profile(profile)
    expected = formula_ms(
        raw_coefficients(name), T=T, S=S, P=P, C=C, B=B, tp=profile.hardware.tensor_parallel
    )
    work = StepWork(num_tokens=T, num_sampled=S, prefill_pairs=P, decode_context=C, num_seqs=B)
    assert model.step_time_ms(work) == pytest.approx(expected, rel=1e-12)
    assert model.step_time_s(work) == pytest.approx(expected / 1e3, rel=1e-12)


def test_tensor_parallel_profile_pays_all_reduces_per_step() -> None:
    """The TP4 profile's step includes 160 all-reduces; an 8192-token chunk costs ~0.67 ms each (§3.3)."""
    profile = load_profile("llama3.1-70b-h100-tp4")
    model = StepCostModel.from_profile(profile)
    assert profile.step_time_ms.allreduce is not None
    no_ar = StepCostModel.from_profile(
        profile.model_copy(
            update={"step_time_ms": profile.step_time_ms.model_copy(update={"allreduce": None})}
        )
    )
    work = StepWork(num_tokens=8192, num_sampled=1, prefill_pairs=prefill_pairs(8192, 0), num_seqs=1)
    per_call = (model.step_time_ms(work) - no_ar.step_time_ms(work)) / 160
    assert per_call == pytest.approx(0.008 + 1.5 * 8192 * 16384 / 3e11 * 1e3, rel=1e-9)
    assert per_call == pytest.approx(0.67, abs=0.01)


def test_derate_slows_compute_terms_only() -> None:
    """A 0.7 derate divides c_lin, c_head and c_attn_pair by 0.7 and leaves memory-bound terms alone."""
    profile = load_profile("llama3.1-8b-h100")
    base = StepCostModel.from_profile(profile)
    slow = StepCostModel.from_profile(profile, compute_derate=0.7)
    assert slow.c_lin == pytest.approx(base.c_lin / 0.7)
    assert slow.c_head == pytest.approx(base.c_head / 0.7)
    assert slow.c_attn_pair == pytest.approx(base.c_attn_pair / 0.7)
    assert (slow.t_fixed, slow.t_weights, slow.c_kv, slow.c_seq) == (
        base.t_fixed,
        base.t_weights,
        base.c_kv,
        base.c_seq,
    )
    with pytest.raises(ConfigError):
        StepCostModel.from_profile(profile, compute_derate=1.5)


def test_empty_step_costs_nothing() -> None:
    """A step that schedules no sequence takes no time (the engine is idle, not running a pass)."""
    assert StepCostModel.from_profile(load_profile("llama3.1-8b-h100")).step_time_ms(StepWork()) == 0.0


def test_prefill_pairs_counts_causal_query_key_pairs() -> None:
    """q new tokens over k cached ones: token i attends to k + i keys (1-based), summed."""
    for q, k in [(1, 0), (3, 0), (2, 5), (7, 100)]:
        assert prefill_pairs(q, k) == sum(k + i for i in range(1, q + 1))


@pytest.mark.parametrize(
    ("context", "batch", "published_ms"),
    [(512, 1, 6.4), (512, 128, 12.5), (2048, 8, 7.3), (2048, 32, 10.0), (8192, 32, 19.3)],
)
def test_reference_decode_step_reproduces_research_table(
    context: int, batch: int, published_ms: float
) -> None:
    """Pure decode steps of the reference profile match sim-profiles.md §3.2 to its printed precision."""
    model = StepCostModel.from_profile(load_profile("llama3.1-8b-h100"))
    work = StepWork(num_tokens=batch, num_sampled=batch, decode_context=batch * context, num_seqs=batch)
    assert model.step_time_ms(work) == pytest.approx(published_ms, abs=0.05)
