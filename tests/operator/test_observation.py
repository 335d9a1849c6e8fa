"""What a router scrape becomes in status, how two writers share conditions, and the router URL."""

from __future__ import annotations

import math

import pytest
from pydantic import ValidationError

from switchyard.operator.autoscaling.observation import observe, unavailable
from switchyard.operator.crd.conditions import Condition, merge_conditions, standard_conditions
from switchyard.operator.router_metrics import RouterSnapshot
from switchyard.operator.settings import OperatorOptions

ROLES = {"s-prefill": "prefill", "s-decode": "decode", "s-unified": "unified"}


def snapshot(
    ttft_ok: float = 0.0, ttft_all: float = 0.0, tpot_ok: float = 0.0, tpot_all: float = 0.0
) -> RouterSnapshot:
    """Histograms with one bucket at the SLO (1 s TTFT, 0.1 s TPOT) and per-instance KV usage."""
    return RouterSnapshot(
        ttft_buckets={1.0: ttft_ok, math.inf: ttft_all},
        tpot_buckets={0.1: tpot_ok, math.inf: tpot_all},
        kv_usage={"s-prefill-0": 0.5, "s-prefill-1": 0.6, "s-decode-0": 0.91234},
    )


def test_each_pool_shows_the_objective_its_role_serves() -> None:
    """Prefill and unified pools show TTFT attainment, decode pools TPOT; the service shows the
    lower of the two; KV usage is per pool and absent for a pool without instances."""
    obs = observe(snapshot(9, 10, 3, 4), snapshot(), ttft_slo_s=1.0, tpot_slo_s=0.1, pools=ROLES)  # type: ignore[arg-type]
    assert (obs.available, obs.reason) == (True, "Scraped")
    assert obs.status() == {"sloAttainment": 0.75}
    assert obs.pools["s-prefill"].status() == {"sloAttainment": 0.9, "kvUsage": 0.55}
    assert obs.pools["s-decode"].status() == {"sloAttainment": 0.75, "kvUsage": 0.912}
    assert obs.pools["s-unified"].status() == {"sloAttainment": 0.9, "kvUsage": None}  # no instances
    assert obs.condition() == Condition(
        "MetricsAvailable",
        "True",
        "Scraped",
        "TTFT attainment 0.900, TPOT attainment 0.750 over the last interval",
    )


def test_attainment_covers_the_last_interval_and_none_without_traffic() -> None:
    """Against the previous scrape only new requests count; no new requests means unknown
    attainment (not 1.0): reported as NoTraffic, the last value stays, KV usage is still shown."""
    before = snapshot(9, 10, 3, 4)
    obs = observe(snapshot(10, 20, 3, 4), before, ttft_slo_s=1.0, tpot_slo_s=0.1, pools=ROLES)  # type: ignore[arg-type]
    assert obs.status() == {"sloAttainment": 0.1}
    assert obs.pools["s-decode"].status() == {"kvUsage": 0.912}  # no new TPOT samples: keep the last
    idle = observe(before, before, ttft_slo_s=1.0, tpot_slo_s=0.1, pools=ROLES)  # type: ignore[arg-type]
    assert (idle.available, idle.reason, idle.status()) == (True, "NoTraffic", {})
    assert idle.pools["s-prefill"].status() == {"kvUsage": 0.55}


def test_the_first_scrape_is_a_baseline() -> None:
    """Without a previous scrape the router's lifetime counters are not attainment: nothing to
    write but KV usage, reason Baseline."""
    obs = observe(snapshot(0, 10, 0, 10), None, ttft_slo_s=1.0, tpot_slo_s=0.1, pools=ROLES)  # type: ignore[arg-type]
    assert (obs.available, obs.reason, obs.status()) == (True, "Baseline", {})
    assert obs.pools["s-prefill"].status() == {"kvUsage": 0.55}
    assert (obs.ttft_attainment, obs.tpot_attainment) == (None, None)


def test_unreachable_router_clears_every_value() -> None:
    obs = unavailable("connection refused", ROLES)  # type: ignore[arg-type]
    assert obs.condition().status == "False" and obs.condition().reason == "RouterUnreachable"
    assert obs.status() == {"sloAttainment": None}
    assert all(p.status() == {"sloAttainment": None, "kvUsage": None} for p in obs.pools.values())


def test_merge_keeps_other_writers_conditions_in_a_fixed_order() -> None:
    """The reconcile (Ready/Progressing/Degraded) and the timer (MetricsAvailable) each write
    their own types; neither drops nor reorders the other's, so converged status writes nothing."""
    metrics = merge_conditions(
        None, [Condition("MetricsAvailable", "True", "Scraped")], generation=None, now="t0"
    )
    reconciled = merge_conditions(
        metrics,
        standard_conditions(ready=True, progressing=False, reason="Available", message=""),
        generation=3,
        now="t1",
    )
    assert [c["type"] for c in reconciled] == ["Ready", "Progressing", "Degraded", "MetricsAvailable"]
    assert reconciled[-1] == metrics[0]
    again = merge_conditions(reconciled, [Condition("MetricsAvailable", "True", "Scraped")], generation=None)
    assert again == reconciled


def test_router_url_template() -> None:
    """The default names the router Service in-cluster; a template may use only the documented
    placeholders and must be an http(s) URL (a constant one is fine, e.g. a port-forward)."""
    opts = OperatorOptions()
    assert opts.router_base_url(service="llama", namespace="prod", port=8000) == (
        "http://llama-router.prod.svc:8000"
    )
    custom = OperatorOptions(router_url="https://{service}.{namespace}.example.com/")
    assert custom.router_base_url(service="a", namespace="b", port=1) == "https://a.b.example.com"
    assert OperatorOptions(router_url="http://127.0.0.1:9").router_base_url(
        service="x", namespace="y", port=1
    )
    for bad in ("http://{pod}.svc", "{router}:8000", "http://{0}"):
        with pytest.raises(ValidationError, match="router_url"):
            OperatorOptions(router_url=bad)


def test_operator_option_defaults() -> None:
    """The autoscaler's promised defaults."""
    opts = OperatorOptions()
    assert opts.autoscale_interval_s == 30.0
    assert opts.metrics_timeout_s == 5.0
    assert opts.scale_in_cooldown_s == 300.0
    assert opts.router_url == "http://{router}.{namespace}.svc:{port}"
