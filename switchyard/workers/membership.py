"""Merging the memberships of several pools into the one a router core follows.

Each pool's supervisor versions its own membership; a router serving a service with several
pools (prefill, decode, unified) needs one versioned view. The merged version is this
merger's own counter, bumped on every change, so it only grows even when a supervisor
restarts and its own version starts again from zero.
"""

from __future__ import annotations

from collections.abc import Callable

from switchyard.messages import Membership

__all__ = ["MembershipMerger"]


class MembershipMerger:
    """Feeds ``apply`` the union of the latest membership of every source, on each change."""

    def __init__(self, apply: Callable[[Membership], None]) -> None:
        self._apply = apply
        self._parts: dict[str, Membership] = {}
        self._version = 0

    def update(self, source: str, membership: Membership) -> None:
        """Record ``source``'s latest membership and publish the merged view."""
        previous = self._parts.get(source)
        if previous is not None and previous.instances == membership.instances:
            self._parts[source] = membership
            return
        self._parts[source] = membership
        self._version += 1
        instances = sorted(
            (i for part in self._parts.values() for i in part.instances), key=lambda i: i.instance_id
        )
        self._apply(Membership(version=self._version, instances=tuple(instances)))

    def updater(self, source: str) -> Callable[[Membership], None]:
        """A callback that updates one source (what a per-pool follower calls)."""
        return lambda membership: self.update(source, membership)
