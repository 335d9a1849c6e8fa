"""Per-instance TTFT estimates for routing: a small, explainable cost model fitted online.

Why a model and not just queue length: DualMap picks between two candidates that differ in
*both* queue and cache. A warm instance with a short queue beats a cold idle one only if
the prefill it saves outweighs the wait, and comparing those needs one unit: seconds. So

    TTFT(instance, request) ≈ a + b · (queued_tokens + uncached_tokens)     # fitted online
                                + c · uncached_tokens²                        # fixed, from the prior
                                + step_s                                      # from the load report

* ``queued_tokens``: prompt tokens waiting for prefill there, reported plus dispatched by
  this router since the report (``InstanceState.waiting_prefill_tokens``), times the
  instance's recent prefix-cache *miss* ratio (reports count whole prompts; hits are free).
* ``uncached_tokens``: this request's prompt minus what the caller expects cached there.
* ``step_s``: half the reported mean step time when the instance is busy (a new request
  waits for the step in flight to end).
* ``a`` (s) and ``b`` (s per 1k tokens) start at a prior (a vLLM-style prefill fit, e.g. a
  simulator profile's ``fits.prefill_ms``) and follow measurements by recursive least
  squares with forgetting, pooled per served model (optionally per instance), from two
  sources: observed TTFTs
  (:meth:`TtftEstimator.observe_ttft`, fed by the router core through the
  :class:`TtftFeedback` hook) and, from load reports alone, prefill throughput while an
  instance stays backlogged (``Δ(prefix-cache queries - hits)`` over ``Δtimestamp``,
  accumulated over ``throughput_window_s``). The quadratic attention term is kept from the
  prior: it matters only for long prompts, which rarely vary enough online to fit it.

Every estimate can be taken apart (:meth:`TtftEstimator.explain`) for the debug view.

NOTE: :meth:`TtftEstimator.estimate` is on the routing hot path (one call per candidate):
a dict lookup, an identity check on the report and a few float operations.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from switchyard.messages import LoadReport
from switchyard.router.registry import InstanceState

__all__ = ["PrefillCost", "TtftEstimate", "TtftEstimator", "TtftFeedback"]

_K = 1e-3  # tokens -> thousands of tokens: keeps the two fitted coefficients on similar scales
_MIN_B = 1e-6  # s per 1k tokens: b stays positive, so fewer uncached tokens always estimate faster


@runtime_checkable
class TtftFeedback(Protocol):
    """A policy whose ``RoutingDecision.estimates`` are TTFT seconds and which learns from TTFTs.

    The router core calls ``on_first_token`` when a dispatched request's first output
    arrives, with the time since dispatch and the engine-reported prefix-cache hit, and
    records the estimate error for such policies.
    """

    def on_first_token(
        self, request_id: str, instance_id: str, *, ttft_s: float, num_cached_tokens: int
    ) -> None: ...


@dataclass(frozen=True, slots=True)
class PrefillCost:
    """``prefill_s(n) = fixed_s + per_token_s·n + per_token2_s·n²`` for ``n`` uncached tokens.

    The default is the closed-form prefill fit of the ``qwen2.5-7b-h100`` simulator profile
    (1.54 ms + 24 µs/token + 0.32 ns/token²), a mid-size model on a current GPU.
    """

    fixed_s: float = 1.54e-3
    per_token_s: float = 2.4245e-5
    per_token2_s: float = 3.224e-10

    @classmethod
    def from_fit_ms(cls, *, a_n2: float, b_n: float, c: float) -> PrefillCost:
        """From a profile's ``fits.prefill_ms`` (``a_n2·n² + b_n·n + c`` in milliseconds)."""
        return cls(fixed_s=c * 1e-3, per_token_s=b_n * 1e-3, per_token2_s=a_n2 * 1e-3)

    def prefill_s(self, n: float) -> float:
        return self.fixed_s + self.per_token_s * n + self.per_token2_s * n * n


@dataclass(frozen=True, slots=True)
class TtftEstimate:
    """One estimate taken apart; ``total_s`` is what routing compares."""

    instance_id: str
    queued_tokens: float
    """Prefill tokens ahead of the request (after the miss-ratio discount)."""
    uncached_tokens: int
    queue_s: float
    prefill_s: float
    step_s: float

    @property
    def total_s(self) -> float:
        return self.queue_s + self.prefill_s + self.step_s

    def as_dict(self) -> dict[str, Any]:
        return {
            "instance_id": self.instance_id,
            "queued_tokens": round(self.queued_tokens, 1),
            "uncached_tokens": self.uncached_tokens,
            "queue_s": self.queue_s,
            "prefill_s": self.prefill_s,
            "step_s": self.step_s,
            "total_s": self.total_s,
        }


class _Fit:
    """Fitted coefficients and their RLS covariance: one per served model (or per instance)."""

    __slots__ = ("a", "b", "n_obs", "p00", "p01", "p11")

    def __init__(self, a: float, b: float, p0: float) -> None:
        self.a, self.b = a, b  # s, s per 1k tokens
        self.p00, self.p01, self.p11 = p0, 0.0, p0
        self.n_obs = 0


class _Instance:
    """What the estimator derives from one instance's load reports."""

    __slots__ = ("fit", "miss", "report", "win_s", "win_tokens")

    def __init__(self, fit: _Fit) -> None:
        self.fit = fit
        self.miss = 1.0  # until reports say otherwise, every queued token needs computing
        self.report: LoadReport | None = None
        self.win_s = 0.0
        self.win_tokens = 0


class TtftEstimator:
    """Estimates TTFT per instance (see the module docstring); pure, single-threaded.

    ``forgetting`` (λ) weighs the newest observation against the past: λ=0.99 remembers
    about the last 100. ``prior_weight`` is how many observations the prior is worth.
    ``throughput_weight`` scales report-derived samples against TTFT observations.

    The cost coefficients are fitted once per served model by default: instances of one
    model run the same hardware, so pooling gives every instance the whole fleet's data,
    and the comparison between two candidates then turns on queue and cache alone rather
    than on noise in separately fitted intercepts (which, for short prompts, can exceed the
    prefill a warm cache saves). ``per_instance=True`` fits each instance on its own, for
    fleets that mix hardware under one model name.
    """

    def __init__(
        self,
        prior: PrefillCost | None = None,
        *,
        per_instance: bool = False,
        forgetting: float = 0.99,
        prior_weight: float = 10.0,
        miss_ratio_alpha: float = 0.2,
        throughput_window_s: float = 1.0,
        throughput_weight: float = 1.0,
    ) -> None:
        if not 0.5 <= forgetting <= 1.0:
            raise ValueError(f"forgetting must be in [0.5, 1], got {forgetting}")
        if prior_weight <= 0:
            raise ValueError(f"prior_weight must be positive, got {prior_weight}")
        self.prior = prior or PrefillCost()
        self.per_instance = per_instance
        self._lam = forgetting
        self._p0 = 1.0 / prior_weight
        self._alpha = miss_ratio_alpha
        self._window_s = throughput_window_s
        self._tp_weight = throughput_weight
        self._c = self.prior.per_token2_s
        self._fits: dict[str, _Fit] = {}
        self._instances: dict[str, _Instance] = {}

    def _instance(self, instance_id: str, model: str | None = None) -> _Instance:
        inst = self._instances.get(instance_id)
        if inst is None:
            key = instance_id if self.per_instance or model is None else f"model:{model}"
            fit = self._fits.get(key)
            if fit is None:
                fit = self._fits[key] = _Fit(self.prior.fixed_s, self.prior.per_token_s / _K, self._p0)
            inst = self._instances[instance_id] = _Instance(fit)
        return inst

    # -- estimates (hot path) -------------------------------------------------------------------

    def estimate(self, state: InstanceState, uncached_tokens: int) -> float:
        """Estimated TTFT in seconds of a request with ``uncached_tokens`` to prefill on ``state``."""
        info = state.info
        inst = self._instances.get(info.instance_id) or self._instance(info.instance_id, info.model)
        r = state.report
        step = 0.0
        if r is not None:
            if r is not inst.report:
                self._ingest(inst, r)
            if r.num_running or r.num_waiting or state.pending_requests:
                step = 0.5 * r.step_time_s
        tokens = (state.pending_prefill_tokens + (r.waiting_prefill_tokens if r else 0)) * inst.miss
        tokens += uncached_tokens
        fit = inst.fit
        return fit.a + fit.b * _K * tokens + self._c * uncached_tokens * uncached_tokens + step

    def prefill_s(self, state: InstanceState, uncached_tokens: int) -> float:
        """The part of :meth:`estimate` that is the request's own prefill: the compute the fleet
        spends on it wherever it waits (without the fixed and queue terms)."""
        fit = self._instance(state.info.instance_id, state.info.model).fit
        return fit.b * _K * uncached_tokens + self._c * uncached_tokens * uncached_tokens

    def load_terms(self, state: InstanceState) -> tuple[float, float]:
        """``(queued_tokens, step_s)`` as :meth:`estimate` uses them: what to remember at dispatch
        so that a measured TTFT can later be attributed (:meth:`observe_ttft`)."""
        inst = self._instance(state.info.instance_id, state.info.model)
        r = state.report
        busy = r is not None and bool(r.num_running or r.num_waiting or state.pending_requests)
        return state.waiting_prefill_tokens * inst.miss, 0.5 * r.step_time_s if busy and r else 0.0

    def explain(self, state: InstanceState, uncached_tokens: int) -> TtftEstimate:
        """The same estimate as :meth:`estimate`, by component."""
        total = self.estimate(state, uncached_tokens)  # also ingests a new report
        inst = self._instance(state.info.instance_id)
        queued = state.waiting_prefill_tokens * inst.miss
        fit = inst.fit
        queue_s = fit.b * _K * queued
        prefill_s = fit.a + fit.b * _K * uncached_tokens + self._c * uncached_tokens * uncached_tokens
        return TtftEstimate(
            state.info.instance_id,
            queued,
            uncached_tokens,
            queue_s,
            prefill_s,
            max(total - queue_s - prefill_s, 0.0),
        )

    def coefficients(self, instance_id: str) -> PrefillCost:
        """The cost model an instance is estimated with (the prior until there is data)."""
        inst = self._instances.get(instance_id)
        if inst is None:
            return self.prior
        return PrefillCost(fixed_s=inst.fit.a, per_token_s=inst.fit.b * _K, per_token2_s=self._c)

    def miss_ratio(self, instance_id: str) -> float:
        """Recent fraction of prompt tokens the instance had to compute (1.0 before data)."""
        inst = self._instances.get(instance_id)
        return 1.0 if inst is None else inst.miss

    def forget(self, instance_id: str) -> None:
        """Drop a departed (or restarted) instance's state (and its own fit, if per instance)."""
        self._instances.pop(instance_id, None)
        self._fits.pop(instance_id, None)

    # -- learning ---------------------------------------------------------------------------------

    def observe_ttft(
        self, instance_id: str, *, queued_tokens: float, uncached_tokens: int, step_s: float, ttft_s: float
    ) -> None:
        """Learn from one measured TTFT: what was queued at dispatch, what was really uncached."""
        u = uncached_tokens
        y = ttft_s - self._c * u * u - step_s
        self._update(self._instance(instance_id).fit, 1.0, (queued_tokens + u) * _K, y, 1.0)

    def _ingest(self, m: _Instance, r: LoadReport) -> None:
        """A new load report: update the miss ratio and the backlogged-throughput window."""
        prev, m.report = m.report, r
        if prev is None:
            return
        dq = r.prefix_cache_queries_total - prev.prefix_cache_queries_total
        dh = r.prefix_cache_hits_total - prev.prefix_cache_hits_total
        dt = r.timestamp - prev.timestamp
        if dq < 0 or dh < 0 or dt <= 0:  # the engine restarted, or reports were reordered
            m.win_s, m.win_tokens = 0.0, 0
            return
        if dq > 0:
            miss = min(max(1.0 - dh / dq, 0.0), 1.0)
            m.miss += self._alpha * (miss - m.miss)
        if prev.waiting_prefill_tokens > 0 and r.waiting_prefill_tokens > 0:
            m.win_s += dt
            m.win_tokens += dq - dh
            if m.win_s >= self._window_s:
                if m.win_tokens > 0:  # time = b · tokens while it never ran dry
                    self._update(m.fit, 0.0, m.win_tokens * _K, m.win_s, self._tp_weight)
                m.win_s, m.win_tokens = 0.0, 0
        else:
            m.win_s, m.win_tokens = 0.0, 0

    def _update(self, m: _Fit, x0: float, x1: float, y: float, weight: float) -> None:
        """One weighted RLS step on ``y ≈ a·x0 + b·x1``, covariance capped at the prior's."""
        lam = self._lam
        px0 = m.p00 * x0 + m.p01 * x1
        px1 = m.p01 * x0 + m.p11 * x1
        denom = lam / weight + x0 * px0 + x1 * px1
        k0, k1 = px0 / denom, px1 / denom
        err = y - (m.a * x0 + m.b * x1)
        m.a = max(m.a + k0 * err, 0.0)
        m.b = max(m.b + k1 * err, _MIN_B)
        m.p00 = (m.p00 - k0 * px0) / lam
        m.p01 = (m.p01 - k0 * px1) / lam
        m.p11 = (m.p11 - k1 * px1) / lam
        # Forgetting inflates P in directions no observation excites (wind-up); never let the
        # model become less certain than its prior.
        scale = max(m.p00, m.p11) / self._p0
        if scale > 1.0:
            m.p00, m.p01, m.p11 = m.p00 / scale, m.p01 / scale, m.p11 / scale
        m.n_obs += 1
