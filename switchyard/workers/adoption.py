"""What a (re)started supervisor does with the instance actors it finds already running.

Why this exists: the supervisor used to own its instance actors, so Ray killed every instance
with it and a dead supervisor took the whole pool down (issue #16 item 4). Instances are now
detached, named actors: they outlive their supervisor, and a supervisor that Ray restarts (or
a new one for the same pool) finds them by name and adopts them instead of starting new ones,
so requests streaming from them over gRPC never notice.

This module is the pure half of that: the actor-name scheme and the decision of what to adopt,
drain, kill and start. The supervisor does the Ray calls around it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from switchyard.messages import InstanceInfo

__all__ = ["AdoptionPlan", "FoundInstance", "InstanceName", "plan_adoption"]

_PREFIX = "instance/"


@dataclass(frozen=True, slots=True)
class InstanceName:
    """The Ray actor name of one incarnation of one instance: ``instance/<pool>-<i>/<incarnation>``.

    The incarnation is part of the name because a replacement starts while the name of the
    dead one may not be released yet; the prefix keeps instance actors apart from other named
    actors (supervisors) in the same Ray namespace.
    """

    instance_id: str
    incarnation: int

    @property
    def pool(self) -> str:
        """The pool the instance belongs to (instance ids are ``<pool>-<index>``)."""
        return self.instance_id.rsplit("-", 1)[0]

    @property
    def index(self) -> int:
        """The instance's index within its pool."""
        return int(self.instance_id.rsplit("-", 1)[1])

    def __str__(self) -> str:
        return f"{_PREFIX}{self.instance_id}/{self.incarnation}"

    @classmethod
    def parse(cls, name: str) -> InstanceName | None:
        """The instance a Ray actor name denotes; None for any other actor name."""
        if not name.startswith(_PREFIX):
            return None
        instance_id, _, incarnation = name[len(_PREFIX) :].rpartition("/")
        pool, _, index = instance_id.rpartition("-")
        if not (pool and index.isdigit() and incarnation.isdigit()):
            return None
        return cls(instance_id, int(incarnation))


@dataclass(frozen=True, slots=True)
class FoundInstance:
    """A named instance actor that was alive when the supervisor looked."""

    name: InstanceName
    info: InstanceInfo | None
    """What it serves, or None when it cannot be adopted: still starting, stopping, not
    answering, or requiring another internal token than this supervisor's."""


@dataclass(frozen=True, slots=True)
class AdoptionPlan:
    """What to do with the instances found for one pool."""

    adopt: tuple[FoundInstance, ...]
    """Serving instances the pool still wants: they join membership as they are."""
    drain: tuple[FoundInstance, ...]
    """Serving instances beyond the pool's size (a scale-in the previous supervisor had not
    finished): they stay out of membership and stop once idle, as in ``Supervisor.apply``."""
    kill: tuple[FoundInstance, ...]
    """Everything else: not adoptable, or an older incarnation of an instance that has a newer one."""
    missing: tuple[str, ...]
    """Instance ids the pool wants that nothing adoptable serves: start them."""
    last_incarnation: dict[str, int]
    """Highest incarnation found per instance id, so a replacement takes a name not in use."""


def plan_adoption(found: Iterable[FoundInstance], *, pool: str, instances: int) -> AdoptionPlan:
    """Decide, for pool ``pool`` of ``instances`` instances, what becomes of the actors ``found``.

    Per instance id the newest serving incarnation wins; ids ``<pool>-0 .. <pool>-(instances-1)``
    are wanted. Actors of other pools are ignored.
    """
    ours = [f for f in found if f.name.pool == pool]
    last: dict[str, int] = {}
    best: dict[str, FoundInstance] = {}
    for f in ours:
        iid = f.name.instance_id
        last[iid] = max(last.get(iid, f.name.incarnation), f.name.incarnation)
        if f.info is not None and (iid not in best or f.name.incarnation > best[iid].name.incarnation):
            best[iid] = f
    kept = set(best.values())
    adopt = tuple(sorted((f for f in kept if f.name.index < instances), key=lambda f: f.name.index))
    drain = tuple(sorted((f for f in kept if f.name.index >= instances), key=lambda f: f.name.index))
    kill = tuple(f for f in ours if f not in kept)
    adopted = {f.name.instance_id for f in adopt}
    missing = tuple(f"{pool}-{i}" for i in range(instances) if f"{pool}-{i}" not in adopted)
    return AdoptionPlan(adopt=adopt, drain=drain, kill=kill, missing=missing, last_incarnation=last)
