"""Operator-wide options and the one startup handler that applies them to Kopf and fills the memo.

Why a memo and not globals: the Kubernetes client, the router metrics source and the drain
client are dependencies the handlers receive through ``memo`` (Kopf's per-operator state).
``switchyard operator`` puts real ones there; the tests put ones pointed at the emulator and
scripted fakes, and nothing in the handlers knows the difference.
"""

from __future__ import annotations

import logging
from typing import Any

import kopf
from pydantic import Field, field_validator

from switchyard.config import StrictModel
from switchyard.operator.kube import KubeApi
from switchyard.operator.render.objects import child_names
from switchyard.operator.router_metrics import HttpMetricsSource, MetricsDrainClient

__all__ = ["FINALIZER", "OperatorOptions", "configure", "make_api_client"]

FINALIZER = "switchyard.dev/finalizer"
"""Kopf's finalizer on Switchyard objects: the delete handlers must run before they go."""


class OperatorOptions(StrictModel):
    """Knobs of the operator process (not of the objects it manages)."""

    kubeconfig: str | None = None
    """Kubeconfig file to use outside a cluster; None tries in-cluster config, then ~/.kube/config."""

    posting_level: int = logging.WARNING
    """Least severe handler log level Kopf also posts as a Kubernetes Event. WARNING: failures
    and retries become Events, routine "handler succeeded" lines (one per child workload
    event) do not; autoscaler decisions are posted explicitly whatever this says."""

    error_backoffs: tuple[float, ...] = (1.0, 5.0, 15.0, 30.0)
    """Waits between retries of failed API calls; the last one repeats (no retry storm)."""

    reconnect_backoff_s: float = Field(default=1.0, gt=0)
    """Wait before re-opening a broken watch stream."""

    max_workers: int = Field(default=8, ge=1)
    """Threads Kopf runs sync handlers in (each blocks on API calls)."""

    api_timeout_s: float = Field(default=15.0, gt=0)
    """Timeout of every API request the handlers make."""

    service_wait_s: tuple[float, ...] = (5.0, 10.0, 20.0, 40.0, 60.0)
    """Retry delays while a pool's LLMService is missing, by attempt; the last one repeats."""

    model_pvc_wait_s: float = Field(default=60.0, gt=0)
    """Retry delay while the model's PersistentVolumeClaim is missing."""

    drain_poll_s: float = Field(default=5.0, gt=0)
    """How often a scale-in checks whether the pods being removed have drained."""

    drain_timeout_s: float = Field(default=300.0, ge=0)
    """Longest wait for a pod to drain before it is removed anyway (in-flight requests fail over)."""

    scale_in_cooldown_s: float = Field(default=300.0, ge=0)
    """Least time between a pool's last replica change and an autoscaler scale-in."""

    autoscale_interval_s: float = Field(default=30.0, gt=0)
    """How often each LLMService's router is scraped, its and its pools' ``sloAttainment`` and
    ``kvUsage`` written, and its autoscaled pools decided. 30 s: long enough for a scrape
    interval's worth of requests, short next to the minutes an engine takes to start. The
    first tick comes one interval after the service appears (or the operator starts)."""

    metrics_timeout_s: float = Field(default=5.0, gt=0)
    """Timeout of one scrape of the router's /metrics."""

    router_url: str = "http://{router}.{namespace}.svc:{port}"
    """Base URL the operator reaches a service's router at (``/metrics``, drain progress).
    Placeholders: ``{service}``, ``{router}`` (the router Service's name), ``{namespace}``,
    ``{port}`` (the gateway port). The default is the in-cluster Service address; an operator
    run outside the cluster points this at a port-forward or an ingress instead."""

    router_grpc_port: int = Field(default=50051, ge=1, le=65535)
    """Container and Service port of the router's gRPC API."""

    kvcache_port: int = Field(default=9700, ge=1, le=65535)
    """Container and Service port of the KV-cache servers."""

    @field_validator("router_url")
    @classmethod
    def _router_url_template(cls, value: str) -> str:
        try:
            example = value.format(service="s", router="s-router", namespace="ns", port=8000)
        except (KeyError, IndexError, ValueError) as exc:
            raise ValueError(
                f"router_url {value!r}: only {{service}}, {{router}}, {{namespace}} and {{port}} "
                f"may be used ({exc})"
            ) from exc
        if not example.startswith(("http://", "https://")):
            raise ValueError(f"router_url {value!r} must be an http:// or https:// URL")
        return value.rstrip("/")

    def router_base_url(self, *, service: str, namespace: str, port: int) -> str:
        """The router of ``service`` as ``router_url`` names it, without a trailing slash."""
        return self.router_url.format(
            service=service, router=child_names(service)["router"], namespace=namespace, port=port
        )


def make_api_client(kubeconfig: str | None) -> Any:
    """A ``kubernetes.client.ApiClient``: in-cluster when possible, else the kubeconfig file."""
    from kubernetes import client, config

    configuration = client.Configuration()
    try:
        config.load_incluster_config(client_configuration=configuration)
    except config.ConfigException:
        # Pass the path explicitly: the package reads $KUBECONFIG once, at import time.
        config.load_kube_config(config_file=kubeconfig, client_configuration=configuration)
    return client.ApiClient(configuration)


@kopf.on.startup(id="switchyard-settings")
def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, logger: kopf.Logger, **_: Any) -> None:
    """Apply ``memo.options`` to Kopf and provide the clients the handlers use (unless injected)."""
    options: OperatorOptions = memo.get("options") or OperatorOptions()
    memo["options"] = options
    settings.posting.level = options.posting_level
    settings.networking.error_backoffs = list(options.error_backoffs)
    settings.watching.reconnect_backoff = options.reconnect_backoff_s
    settings.execution.max_workers = options.max_workers
    settings.persistence.finalizer = FINALIZER
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="switchyard.dev")
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix="switchyard.dev", key="last-handled-configuration"
    )
    if "kube" not in memo:
        memo["kube"] = KubeApi(make_api_client(options.kubeconfig), timeout_s=options.api_timeout_s)
    if "metrics" not in memo:
        memo["metrics"] = HttpMetricsSource(timeout_s=options.metrics_timeout_s)
    if "drain" not in memo:
        memo["drain"] = MetricsDrainClient(memo["metrics"])
    memo.setdefault("scrapes", {})
    logger.info("switchyard operator configured (finalizer %s)", FINALIZER)
