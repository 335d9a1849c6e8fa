"""The TTFT estimator: prior, queue and cache terms, and online fits from TTFTs and load reports."""

from __future__ import annotations

import random

import pytest

from switchyard.messages import LoadReport
from switchyard.router.registry import InstanceState
from switchyard.router.ttft_estimator import PrefillCost, TtftEstimator
from tests.helpers.builders import make_info

PRIOR = PrefillCost(fixed_s=0.002, per_token_s=2e-5, per_token2_s=1e-10)


def state(
    report: LoadReport | None = None, *, pending_tokens: int = 0, pending_requests: int = 0
) -> InstanceState:
    return InstanceState(
        make_info("w0"),
        report=report,
        pending_prefill_tokens=pending_tokens,
        pending_requests=pending_requests,
    )


def report(
    t: float = 0.0,
    *,
    waiting_tokens: int = 0,
    running: int = 0,
    step_s: float = 0.0,
    queries: int = 0,
    hits: int = 0,
) -> LoadReport:
    return LoadReport(
        "w0",
        timestamp=t,
        num_running=running,
        waiting_prefill_tokens=waiting_tokens,
        step_time_s=step_s,
        prefix_cache_queries_total=queries,
        prefix_cache_hits_total=hits,
    )


def test_idle_instance_estimate_is_the_prior_prefill_time() -> None:
    """No queue, no report: TTFT is the prior's prefill time of the uncached tokens."""
    est = TtftEstimator(PRIOR)
    assert est.estimate(state(), 1000) == pytest.approx(PRIOR.prefill_s(1000))
    assert est.estimate(state(), 0) == pytest.approx(PRIOR.fixed_s)


def test_queued_prefill_tokens_add_wait_reported_and_pending_alike() -> None:
    """Tokens waiting for prefill, reported or dispatched since, cost per_token_s each."""
    est = TtftEstimator(PRIOR)
    base = est.estimate(state(), 100)
    assert est.estimate(state(report(waiting_tokens=5000)), 100) == pytest.approx(base + 5000 * 2e-5)
    assert est.estimate(state(pending_tokens=5000), 100) == pytest.approx(base + 5000 * 2e-5)


def test_busy_instance_adds_half_a_reported_step() -> None:
    """A request arriving at a busy instance waits, on average, half the step in flight."""
    est = TtftEstimator(PRIOR)
    idle = est.estimate(state(report(step_s=0.04)), 100)
    busy = est.estimate(state(report(running=3, step_s=0.04)), 100)
    assert busy - idle == pytest.approx(0.02)


def test_explain_components_add_up_to_the_estimate() -> None:
    """The debug breakdown (queue, prefill, step) sums to exactly what routing compares."""
    est = TtftEstimator(PRIOR)
    s = state(report(waiting_tokens=3000, running=2, step_s=0.03), pending_tokens=500, pending_requests=1)
    parts = est.explain(s, 700)
    assert parts.total_s == pytest.approx(est.estimate(s, 700))
    assert parts.queued_tokens == 3500 and parts.uncached_tokens == 700
    assert parts.step_s == pytest.approx(0.015)
    assert set(parts.as_dict()) >= {"queue_s", "prefill_s", "step_s", "total_s"}


def test_reported_prefix_hits_discount_queued_tokens() -> None:
    """An instance whose reports show 75% prefix-cache hits has a quarter of its queue to compute."""
    est = TtftEstimator(PRIOR, miss_ratio_alpha=1.0)
    est.estimate(state(report(0.0, queries=0, hits=0)), 0)
    s = state(report(1.0, waiting_tokens=4000, queries=1000, hits=750))
    assert est.estimate(s, 0) == pytest.approx(PRIOR.fixed_s + 1000 * 2e-5)
    assert est.miss_ratio("w0") == pytest.approx(0.25)


def test_observed_ttfts_pull_the_model_to_the_truth() -> None:
    """Noisy TTFTs from a different machine (30 ms + 0.1 ms/token) replace the prior within ~200 samples."""
    est = TtftEstimator(PRIOR)
    rng = random.Random(0)
    for _ in range(300):
        queued, uncached = rng.randrange(0, 4000), rng.randrange(10, 2000)
        truth = 0.03 + 1e-4 * (queued + uncached) + 1e-10 * uncached**2
        est.observe_ttft(
            "w0",
            queued_tokens=queued,
            uncached_tokens=uncached,
            step_s=0.0,
            ttft_s=truth * rng.uniform(0.95, 1.05),
        )
    fitted = est.coefficients("w0")
    assert fitted.fixed_s == pytest.approx(0.03, rel=0.2)
    assert fitted.per_token_s == pytest.approx(1e-4, rel=0.1)
    assert est.estimate(state(), 1000) == pytest.approx(0.03 + 0.1 + 1e-4, rel=0.1)


def test_garbage_observations_never_make_fewer_uncached_tokens_look_slower() -> None:
    """Even fitted on TTFTs that fall with size, the per-token cost stays positive."""
    est = TtftEstimator(PRIOR)
    for n in range(1, 200):
        est.observe_ttft("w0", queued_tokens=0, uncached_tokens=n * 10, step_s=0.0, ttft_s=1.0 / n)
    assert est.estimate(state(), 100) < est.estimate(state(), 101)
    assert est.coefficients("w0").fixed_s >= 0


def test_backlogged_load_reports_fit_prefill_throughput() -> None:
    """An instance that stays backlogged and computes 10k tokens/s teaches b = 0.1 ms/token."""
    est = TtftEstimator(PRIOR, throughput_window_s=1.0)
    queries = 0
    for i in range(200):  # reports every 50 ms; 500 tokens computed (no hits) per interval
        queries += 500
        est.estimate(state(report(0.05 * i, waiting_tokens=8000, running=4, queries=queries)), 0)
    assert est.coefficients("w0").per_token_s == pytest.approx(1e-4, rel=0.15)


def test_idle_gaps_and_engine_restarts_do_not_make_throughput_samples() -> None:
    """Intervals without a backlog, or with counters going backwards, teach nothing about b."""
    est = TtftEstimator(PRIOR)
    queries = 0
    for i in range(100):
        queries += 50
        est.estimate(state(report(0.05 * i, waiting_tokens=0, queries=queries)), 0)
    est.estimate(state(report(10.0, waiting_tokens=100, queries=0)), 0)  # restarted engine
    est.estimate(state(report(10.05, waiting_tokens=100, queries=10)), 0)
    assert est.coefficients("w0") == PrefillCost(PRIOR.fixed_s, PRIOR.per_token_s, PRIOR.per_token2_s)


def test_instances_of_one_model_share_a_fit_other_models_do_not() -> None:
    """By default TTFTs measured on one instance teach its model's other instances, not another model's."""
    est = TtftEstimator(PRIOR)
    w0 = state()
    w1 = InstanceState(make_info("w1"))
    other = InstanceState(make_info("x0", model="other"))
    for s in (w0, w1, other):
        est.estimate(s, 0)
    for _ in range(50):
        est.observe_ttft("w0", queued_tokens=0, uncached_tokens=500, step_s=0.0, ttft_s=0.5)
    assert est.estimate(w1, 500) == pytest.approx(est.estimate(w0, 500))
    assert est.estimate(w1, 500) > 10 * est.estimate(other, 500)


def test_forget_returns_an_instance_to_the_prior() -> None:
    """With per-instance fits, a restarted or departed instance starts over from the prior."""
    est = TtftEstimator(PRIOR, per_instance=True)
    est.observe_ttft("w0", queued_tokens=0, uncached_tokens=100, step_s=0.0, ttft_s=5.0)
    assert est.coefficients("w0").fixed_s > PRIOR.fixed_s
    est.forget("w0")
    assert est.coefficients("w0").fixed_s == pytest.approx(PRIOR.fixed_s)


def test_prior_from_a_profile_fit_converts_milliseconds() -> None:
    """Simulator profile fits are in ms (a_n2·n² + b_n·n + c); the prior is in seconds."""
    cost = PrefillCost.from_fit_ms(a_n2=1e-6, b_n=0.05, c=2.0)
    assert cost.prefill_s(1000) == pytest.approx((1e-6 * 1e6 + 50 + 2) / 1e3)


def test_bad_settings_are_rejected() -> None:
    """Forgetting outside [0.5, 1] or a non-positive prior weight is a programming error."""
    with pytest.raises(ValueError, match="forgetting"):
        TtftEstimator(forgetting=1.5)
    with pytest.raises(ValueError, match="prior_weight"):
        TtftEstimator(prior_weight=0)
