"""What the router knows about its instances: membership, their load, and its own in-flight work.

Load reports arrive every ~50 ms, but a router dispatches many requests between two reports;
deciding on the last report alone would send a burst to whichever instance looked idle. So the
registry keeps, per instance, the work the router dispatched since the latest report arrived
(``pending_*``), and policies add it to the reported load.

Reconciling the two is done with an epoch per instance, bumped by each report: a dispatch
remembers the epoch it happened in. A later report is assumed to include the request (so the
pending count resets to zero); a request that finishes, or reaches its first token, while its
epoch is still current is taken out of the pending count by hand. The blind spot is the
network delay of one report (well under a millisecond locally), during which a request can be
counted by neither. Everything here is O(1) per request; only membership and liveness changes
(rare) rebuild the per-model ``FleetView`` snapshots that policies read.

Draining (``set_draining``) takes an instance out of every ``FleetView`` at once, so no policy
can choose it, while its load keeps being followed and its in-flight requests keep streaming
until the drain moves them off (``router/drain.py``).

The registry is plain data, single-threaded (the router's event loop), with no I/O and no
metrics; the router core drives it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from switchyard.messages import InstanceInfo, LoadReport, Membership

__all__ = ["FleetView", "InstanceRegistry", "InstanceState", "MembershipDiff"]


@dataclass(slots=True, eq=False)
class InstanceState:
    """One instance as the router sees it. Mutated in place, so fleet views stay current."""

    info: InstanceInfo
    report: LoadReport | None = None
    """The latest load report, None until the first arrives."""
    reported_at: float = 0.0
    """Router clock when ``report`` arrived."""
    live: bool = True
    """False after a dispatch or load stream found the instance dead, until it reports again."""
    pending_requests: int = 0
    """Requests dispatched since ``report`` arrived and not finished: not in any report yet."""
    pending_prefill_tokens: int = 0
    """Prompt tokens of pending requests that have not produced a token yet."""
    inflight_requests: int = 0
    """Requests dispatched by this router and not finished, whatever the reports say."""
    epoch: int = 0
    """Number of reports received; a dispatch in the current epoch is still pending."""

    @property
    def instance_id(self) -> str:
        return self.info.instance_id

    @property
    def num_running(self) -> int:
        return self.report.num_running if self.report is not None else 0

    @property
    def num_waiting(self) -> int:
        return self.report.num_waiting if self.report is not None else 0

    @property
    def queue_length(self) -> int:
        """Requests on the instance: reported running + waiting, plus dispatched since."""
        r = self.report
        return self.pending_requests + (r.num_running + r.num_waiting if r is not None else 0)

    @property
    def waiting_prefill_tokens(self) -> int:
        """Prompt tokens waiting for prefill: reported, plus dispatched since."""
        r = self.report
        return self.pending_prefill_tokens + (r.waiting_prefill_tokens if r is not None else 0)

    @property
    def kv_usage(self) -> float:
        return self.report.kv_usage if self.report is not None else 0.0


class FleetView:
    """The live instances of one model, sorted by id: what a policy chooses from.

    The tuple is a snapshot of membership and liveness (rebuilt when either changes); the
    ``InstanceState`` objects in it are the registry's own, so their load is always current.
    """

    __slots__ = ("_by_id", "instances", "model", "version")

    def __init__(self, model: str, version: int, instances: tuple[InstanceState, ...]) -> None:
        self.model = model
        self.version = version
        self.instances = instances
        self._by_id = {s.info.instance_id: s for s in instances}

    def get(self, instance_id: str) -> InstanceState | None:
        """The live instance with this id, or None (departed, dead or another model's)."""
        return self._by_id.get(instance_id)

    def __len__(self) -> int:
        return len(self.instances)

    def __iter__(self) -> Iterator[InstanceState]:
        return iter(self.instances)

    def __repr__(self) -> str:
        return f"FleetView({self.model!r}, v{self.version}, {[s.instance_id for s in self.instances]})"


@dataclass(frozen=True, slots=True)
class MembershipDiff:
    """What ``InstanceRegistry.apply`` changed; an instance whose info changed is in both."""

    added: tuple[InstanceInfo, ...]
    removed: tuple[InstanceInfo, ...]

    def __bool__(self) -> bool:
        return bool(self.added or self.removed)


class InstanceRegistry:
    """Versioned membership plus per-instance load and router-side in-flight accounting."""

    def __init__(self, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._membership = Membership(version=0)
        self._states: dict[str, InstanceState] = {}
        self._models: dict[str, InstanceInfo] = {}
        self._fleets: dict[str, FleetView] = {}
        self._draining: set[str] = set()

    # -- membership --------------------------------------------------------------------------

    @property
    def membership(self) -> Membership:
        return self._membership

    def apply(self, membership: Membership) -> MembershipDiff | None:
        """Adopt a newer membership; None (and no change) when it is not newer."""
        if membership.version <= self._membership.version:
            return None
        new = {i.instance_id: i for i in membership.instances}
        removed = tuple(s.info for iid, s in self._states.items() if new.get(iid) != s.info)
        added = tuple(i for iid, i in new.items() if iid not in self._states or self._states[iid].info != i)
        for info in removed:
            del self._states[info.instance_id]
            if new.get(info.instance_id) is None:
                self._draining.discard(info.instance_id)
        for info in added:
            self._states[info.instance_id] = InstanceState(info)
        self._membership = membership
        models: dict[str, InstanceInfo] = {}
        for iid in sorted(self._states):
            models.setdefault(self._states[iid].info.model, self._states[iid].info)
        self._models = models
        self._fleets.clear()
        return MembershipDiff(added=added, removed=removed)

    def get(self, instance_id: str) -> InstanceState | None:
        return self._states.get(instance_id)

    def __iter__(self) -> Iterator[InstanceState]:
        return iter(self._states.values())

    def __len__(self) -> int:
        return len(self._states)

    def models(self) -> dict[str, InstanceInfo]:
        """Served model name -> one of its instances (the lowest id), for ``/v1/models``."""
        return dict(self._models)

    def serves(self, model: str) -> bool:
        return model in self._models

    def fleet(self, model: str) -> FleetView:
        """The live instances serving ``model``. O(1) unless membership/liveness changed."""
        view = self._fleets.get(model)
        if view is None:
            live = tuple(
                sorted(
                    (
                        s
                        for s in self._states.values()
                        if s.live and s.info.model == model and s.info.instance_id not in self._draining
                    ),
                    key=lambda s: s.info.instance_id,
                )
            )
            view = self._fleets[model] = FleetView(model, self._membership.version, live)
        return view

    @property
    def ready(self) -> bool:
        """Some instance can take new work: it is live, has reported its load and is not draining."""
        return self.unready_reason() is None

    def unready_reason(self) -> str | None:
        """Why no instance can take new work now, or None when one can (``/health``).

        Draining counts: an instance being drained takes no new requests, so a router whose
        every instance is drained (``switchyard drain``, a scale-in) must fail its readiness
        probe and be taken out of its Service, instead of answering every request with a 503.
        """
        reporting = [s for s in self._states.values() if s.live and s.report is not None]
        if any(s.info.instance_id not in self._draining for s in reporting):
            return None
        if not self._states:
            return "no live engine instances"
        if reporting:
            return f"every live engine instance is draining ({len(reporting)} of {len(self._states)})"
        return f"none of the {len(self._states)} engine instances reports its load (starting, or down)"

    # -- draining -------------------------------------------------------------------------------

    def set_draining(self, instance_id: str, draining: bool) -> bool:
        """Exclude (or re-include) an instance from every fleet view; False if it is unknown."""
        state = self._states.get(instance_id)
        if state is None:
            return False
        if draining:
            self._draining.add(instance_id)
        else:
            self._draining.discard(instance_id)
        self._fleets.pop(state.info.model, None)
        return True

    def is_draining(self, instance_id: str) -> bool:
        return instance_id in self._draining

    # -- load reports and liveness -------------------------------------------------------------

    def on_load_report(self, instance_id: str, report: LoadReport) -> InstanceState | None:
        """Record a report: it supersedes everything dispatched before it; revives a dead instance."""
        state = self._states.get(instance_id)
        if state is None:
            return None  # departed while its report was in flight
        state.report = report
        state.reported_at = self._clock()
        state.epoch += 1
        state.pending_requests = 0
        state.pending_prefill_tokens = 0
        if not state.live:
            state.live = True
            self._fleets.pop(state.info.model, None)
        return state

    def mark_down(self, instance_id: str) -> bool:
        """Stop routing to an instance until it reports again; True if it was live."""
        state = self._states.get(instance_id)
        if state is None or not state.live:
            return False
        state.live = False
        self._fleets.pop(state.info.model, None)
        return True

    # -- in-flight accounting (hot path: O(1), no allocation) -------------------------------------

    @staticmethod
    def on_dispatched(state: InstanceState, prefill_tokens: int) -> int:
        """Count a request sent to ``state``; returns the epoch to hand back later."""
        state.pending_requests += 1
        state.pending_prefill_tokens += prefill_tokens
        state.inflight_requests += 1
        return state.epoch

    @staticmethod
    def on_first_token(state: InstanceState, epoch: int, prefill_tokens: int) -> None:
        """The request's prefill is done; stop counting its prompt as waiting."""
        if epoch == state.epoch:
            state.pending_prefill_tokens -= prefill_tokens

    @staticmethod
    def on_finished(state: InstanceState, epoch: int, prefill_tokens: int, *, prefilled: bool) -> None:
        """The request left the instance (finished, aborted or failed)."""
        state.inflight_requests -= 1
        if epoch == state.epoch:
            state.pending_requests -= 1
            if not prefilled:
                state.pending_prefill_tokens -= prefill_tokens
