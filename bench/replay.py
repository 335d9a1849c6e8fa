"""One replay: a trace, one routing policy, one rate scale, a simulated fleet, in virtual time.

The point of the routing benchmark is to compare the *real* policy objects under the
conditions the real router gives them, so this module drives them through the router's own
code and adds nothing to it:

* membership is applied to a real ``InstanceRegistry`` and passed to ``on_membership``;
* each instance pushes a ``LoadReport`` every ``load_report_interval_s`` (staggered across
  instances, as independent pushers are), so policies see load up to one interval stale,
  and the registry adds the router's own dispatches since the last report (``pending_*``);
* every request goes through ``router.dispatch.Dispatcher``, the hook sequence
  ``RouterCore`` runs (choose, dispatched, first token with TTFT feedback, finished with the
  engine-reported ``num_cached_tokens``): a change there changes this benchmark;
* with ``routers`` > 1, that many router replicas each get a random share of the requests and
  keep only their own view, as replicas behind a load balancer do: their own policy state and
  their own count of what they dispatched since the last report (every replica receives every
  load report). Every ``agreement_every``-th request, every replica is also asked where *it*
  would send the request (``choose`` is pure), and the run counts how often they all agree;
* policy ``oracle`` is ``bench.oracle.OraclePolicy``: perfect information from the simulated
  engines, the yardstick every capacity is reported against.

The engines are the real ``SimInstance`` model driven by the real ``SimFleet`` event loop; the
only addition is a subclass that sums step durations, for the busy-time imbalance metric.
There is no network delay and no frontend overhead: TTFT is arrival to first token.
"""

from __future__ import annotations

import hashlib
import random
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from bench.oracle import ORACLE, OraclePolicy
from bench.traces import TokenSynth, Trace
from switchyard.config import EngineConfig, MigrationConfig, SimConfig
from switchyard.messages import (
    EngineOutput,
    EngineRequest,
    InstanceInfo,
    Membership,
    RoutingRequest,
    SamplingOptions,
)
from switchyard.router.dispatch import Dispatch, Dispatcher
from switchyard.router.policies import Policy, make_policy
from switchyard.router.registry import InstanceRegistry
from switchyard.workers.sim.cost import KvTransferCost, KvTransferProfile, load_profile
from switchyard.workers.sim.fleet import SimFleet
from switchyard.workers.sim.instance import SimInstance, StepResult

__all__ = ["MODEL", "ReplayConfig", "ReplayResult", "engine_config", "replay"]

MODEL = "bench-model"


@dataclass(frozen=True, slots=True)
class ReplayConfig:
    """Everything besides the trace and the policy name that decides one run's outcome."""

    num_instances: int
    scale: float
    """Arrival-rate multiplier: request ``i`` arrives at ``arrival_s / scale``."""
    profile: str = "llama3.1-8b-h100"
    compute_derate: float = 1.0
    load_report_interval_s: float = 0.05
    policy_params: Mapping[str, Any] = field(default_factory=dict)
    seed: int = 0
    """Salt of the synthesized prompt tokens."""
    migration: MigrationConfig = field(default_factory=MigrationConfig)
    """How ``SimFleet.migrate`` stages a move (only used when something migrates: ``bench.rebalance``)."""
    kv_transfer: KvTransferProfile | None = None
    """The link migrations are priced on; None takes the profile's."""
    routers: int = 1
    """Router replicas, each with its own view and a random share of the requests."""
    agreement_every: int = 10
    """With several routers: ask every replica about every n-th request (0: never)."""


@dataclass(slots=True)
class ReplayResult:
    """Raw per-request and per-instance outcomes of one run (metrics are computed elsewhere)."""

    policy: str
    scale: float
    ttft_s: np.ndarray
    """Per request, arrival to first token (virtual seconds); NaN if none came."""
    tpot_s: np.ndarray
    """Per request, (last - first token time) / (tokens - 1); NaN for single-token outputs."""
    prompt_tokens: int
    cached_tokens: int
    busy_s: dict[str, float]
    requests_per_instance: dict[str, int]
    outcomes: dict[str, int]
    num_preemptions: int
    virtual_end_s: float
    wall_s: float
    cpu_s: float
    """CPU time of this process for the run: unlike ``wall_s``, not inflated by other load."""
    decision_us_mean: float
    ttft_estimate_error_s: np.ndarray
    """Per request, measured TTFT minus the policy's estimate for the chosen instance (the core's
    ``ttft_estimate_error`` metric); NaN when the policy gives no estimate for its choice."""
    decisions_sha256: str = ""
    routers: int = 1
    agreement: dict[str, float] = field(default_factory=dict)
    """With several routers: the share of sampled requests on which every replica would choose
    the same ``instance`` and (for two-candidate policies) the same ``candidates``."""
    """SHA-256 over every decision in arrival order (request, instance, outcome): two runs with
    equal digests routed every request alike, so a refactoring can be shown not to change routing."""


class _MeteredInstance(SimInstance):
    """``SimInstance`` that also sums its step durations (busy time); behaviour unchanged."""

    busy_s: float = 0.0

    def step(self) -> StepResult:
        result = super().step()
        self.busy_s += result.duration_s
        return result

    @classmethod
    def build(cls, cfg: EngineConfig, instance_id: str) -> _MeteredInstance:
        inst = cls.from_config(cfg, instance_id=instance_id)  # from_config builds ``cls``
        assert isinstance(inst, _MeteredInstance)
        return inst


def engine_config(profile: str, compute_derate: float = 1.0) -> EngineConfig:
    """Simulated engines with the profile's own vLLM defaults (block size, batch limits, KV)."""
    block_size = load_profile(profile).engine.block_size
    sim = SimConfig(profile=profile, time_mode="virtual", compute_derate=compute_derate)
    return EngineConfig(kind="sim", block_size=block_size, sim=sim)


class _Replay:
    """The router-side bookkeeping of one run; callbacks are invoked by ``SimFleet``."""

    def __init__(self, trace: Trace, policy: str, cfg: ReplayConfig) -> None:
        ecfg = engine_config(cfg.profile, cfg.compute_derate)
        vocab = load_profile(cfg.profile).model.vocab
        self.instances = [_MeteredInstance.build(ecfg, f"sim-{i:02d}") for i in range(cfg.num_instances)]
        profile = load_profile(cfg.profile)
        if cfg.kv_transfer is not None:
            profile = profile.model_copy(update={"kv_transfer": cfg.kv_transfer})
        kv = KvTransferCost.from_profile(profile, block_size=ecfg.block_size)
        self.fleet = SimFleet(
            self.instances, on_output=self._on_output, kv_transfer=kv, migration=cfg.migration
        )
        clock = self.fleet.clock
        infos = tuple(
            InstanceInfo(
                inst.instance_id,
                f"{inst.instance_id}.sim:0",
                MODEL,
                engine="sim",
                block_size=inst.block_size,
                max_model_len=inst.max_model_len,
            )
            for inst in self.instances
        )
        self.policy_name = policy
        self.registries: list[InstanceRegistry] = []
        self.dispatchers: list[Dispatcher] = []
        for _ in range(cfg.routers):
            registry = InstanceRegistry(clock=clock)
            registry.apply(Membership(1, infos))
            pol: Policy
            if policy == ORACLE:
                pol = OraclePolicy({i.instance_id: i for i in self.instances})
            else:
                pol = make_policy(policy, cfg.policy_params, clock=clock)
            pol.on_membership(sorted(infos, key=lambda i: i.instance_id))
            self.registries.append(registry)
            self.dispatchers.append(Dispatcher(pol, policy))
        # The first replica under the single-router names (the rebalancing replay reads them).
        self.registry, self.dispatcher = self.registries[0], self.dispatchers[0]
        self.policy = self.dispatcher.policy
        self.share = random.Random(cfg.seed * 7919 + cfg.routers)  # which replica gets a request
        self.agreed: Counter[str] = Counter()
        self.synth = TokenSynth(vocab, seed=cfg.seed)
        self.trace, self.cfg = trace, cfg
        n = len(trace.requests)
        self.arrival = np.array([r.arrival_s / cfg.scale for r in trace.requests])
        # Python lists, not arrays: touched once per output token, where numpy scalars are slow.
        self.first = [np.nan] * n
        self.last = [np.nan] * n
        self.generated = [0] * n
        self.cached = [0] * n
        self.where: list[Dispatch | None] = [None] * n
        self.estimate_error = [np.nan] * n  # measured minus the policy's estimated TTFT (TtftFeedback)
        self.done = 0
        self.outcomes: Counter[str] = Counter()
        self.per_instance: Counter[str] = Counter()
        self.decision_s = 0.0
        self.decisions = hashlib.sha256()

    def run(self) -> ReplayResult:
        t0, c0 = time.perf_counter(), time.process_time()
        fleet, interval = self.fleet, self.cfg.load_report_interval_s
        for k, inst in enumerate(self.instances):  # staggered pushers, first report at t ~ 0
            fleet.call_at(interval * k / len(self.instances), self._reporter(inst.instance_id))
        if self.trace.requests:
            fleet.call_at(float(self.arrival[0]), lambda: self._arrive(0))
        fleet.run()
        n = len(self.trace.requests)
        if self.done != n:
            raise RuntimeError(f"{self.policy_name}: {n - self.done} requests never finished")
        generated, first = np.array(self.generated), np.array(self.first)
        tokens = np.where(generated > 1, generated - 1, 1)
        tpot = np.where(generated > 1, (np.array(self.last) - first) / tokens, np.nan)
        return ReplayResult(
            policy=self.policy_name,
            scale=self.cfg.scale,
            ttft_s=first - self.arrival,
            tpot_s=tpot,
            prompt_tokens=sum(r.input_length for r in self.trace.requests),
            cached_tokens=sum(self.cached),
            busy_s={i.instance_id: i.busy_s for i in self.instances},
            requests_per_instance={i.instance_id: self.per_instance[i.instance_id] for i in self.instances},
            outcomes=dict(self.outcomes),
            num_preemptions=sum(i.num_preemptions_total for i in self.instances),
            virtual_end_s=fleet.now,
            wall_s=time.perf_counter() - t0,
            cpu_s=time.process_time() - c0,
            decision_us_mean=1e6 * self.decision_s / max(1, n),
            ttft_estimate_error_s=np.array(self.estimate_error),
            decisions_sha256=self.decisions.hexdigest(),
            routers=len(self.dispatchers),
            agreement={
                k: self.agreed[k] / self.agreed["asked"]
                for k in ("instance", "candidates")
                if self.agreed["asked"]
            },
        )

    def _reporter(self, instance_id: str) -> Any:
        fleet, registries, interval = self.fleet, self.registries, self.cfg.load_report_interval_s
        total = len(self.trace.requests)

        def report() -> None:
            load = fleet.load(instance_id)
            for registry in registries:
                registry.on_load_report(instance_id, load)
            if self.done < total:  # stop pushing once the run is over, so the event loop drains
                fleet.call_at(fleet.now + interval, report)

        return report

    def _arrive(self, idx: int) -> None:
        req = self.trace.requests[idx]
        if idx + 1 < len(self.trace.requests):
            self.fleet.call_at(float(self.arrival[idx + 1]), lambda: self._arrive(idx + 1))
        sampling = SamplingOptions(
            max_tokens=req.output_length, min_tokens=req.output_length, ignore_eos=True
        )
        rreq = RoutingRequest(f"r{idx}", MODEL, self.synth.tokens(req), sampling)
        r = self.share.randrange(len(self.dispatchers)) if len(self.dispatchers) > 1 else 0
        dispatcher, registry = self.dispatchers[r], self.registries[r]
        if len(self.dispatchers) > 1 and self.cfg.agreement_every and idx % self.cfg.agreement_every == 0:
            self._ask_every_replica(rreq)
        t = time.perf_counter()
        state, decision = dispatcher.choose(rreq, registry.fleet(MODEL))
        self.decision_s += time.perf_counter() - t
        self.where[idx] = dispatcher.dispatched(rreq, state, decision, req.input_length)
        self.outcomes[decision.outcome.value] += 1
        self.decisions.update(f"{idx} {decision.instance_id} {decision.outcome.value}\n".encode())
        self.per_instance[decision.instance_id] += 1
        self.fleet.submit(
            decision.instance_id, EngineRequest(rreq.request_id, rreq.prompt_token_ids, sampling)
        )

    def _ask_every_replica(self, rreq: RoutingRequest) -> None:
        """Where would each replica send ``rreq`` now? (``choose`` is pure: nothing is recorded.)"""
        decisions = [
            d.policy.choose(rreq, reg.fleet(MODEL))
            for d, reg in zip(self.dispatchers, self.registries, strict=True)
        ]
        self.agreed["asked"] += 1
        self.agreed["instance"] += len({d.instance_id for d in decisions}) == 1
        self.agreed["candidates"] += len({frozenset(d.candidates) for d in decisions}) == 1

    def _on_output(self, now: float, instance_id: str, out: EngineOutput) -> None:
        idx = int(out.request_id[1:])
        dispatch = self.where[idx]
        assert dispatch is not None
        if self.generated[idx] == 0:
            self.first[idx] = now
            self.cached[idx] = out.num_cached_tokens
            error = dispatch.first_token(
                now - float(self.arrival[idx]), out.num_cached_tokens
            )  # sent at arrival
            if error is not None:
                self.estimate_error[idx] = error
        self.generated[idx] += len(out.token_ids)
        self.last[idx] = now
        if out.finished:
            dispatch.finished()
            self.where[idx] = None
            self.done += 1


def replay(trace: Trace, policy: str, cfg: ReplayConfig) -> ReplayResult:
    """Replay ``trace`` through ``policy`` on ``cfg.num_instances`` simulated instances."""
    return _Replay(trace, policy, cfg).run()
