"""MembershipMerger: several pools' memberships become one versioned view for the router."""

from __future__ import annotations

from switchyard.messages import InstanceInfo, Membership
from switchyard.workers.membership import MembershipMerger


def _info(iid: str) -> InstanceInfo:
    return InstanceInfo(instance_id=iid, address=f"127.0.0.1:{len(iid)}", model="m")


def test_merged_view_is_the_union_sorted_by_id_with_growing_versions() -> None:
    """Each change of any pool publishes the union of all pools; versions only grow."""
    seen: list[Membership] = []
    merger = MembershipMerger(seen.append)
    merger.update("decode", Membership(version=1, instances=(_info("decode-0"),)))
    merger.update("prefill", Membership(version=1, instances=(_info("prefill-0"), _info("prefill-1"))))
    assert [i.instance_id for i in seen[-1].instances] == ["decode-0", "prefill-0", "prefill-1"]
    merger.updater("decode")(Membership(version=2, instances=()))
    assert [i.instance_id for i in seen[-1].instances] == ["prefill-0", "prefill-1"]
    assert [m.version for m in seen] == [1, 2, 3]


def test_restarted_supervisor_with_lower_version_still_propagates() -> None:
    """A supervisor that restarts counts from 0 again; the merged version keeps growing anyway."""
    seen: list[Membership] = []
    merger = MembershipMerger(seen.append)
    merger.update("pool", Membership(version=7, instances=(_info("pool-0"),)))
    merger.update("pool", Membership(version=1, instances=(_info("pool-0"), _info("pool-1"))))
    assert seen[-1].version > seen[0].version
    assert len(seen[-1].instances) == 2


def test_unchanged_instances_publish_nothing() -> None:
    """A new version with the same instances (e.g. a watch timeout) does not wake the router."""
    seen: list[Membership] = []
    merger = MembershipMerger(seen.append)
    merger.update("pool", Membership(version=1, instances=(_info("pool-0"),)))
    merger.update("pool", Membership(version=2, instances=(_info("pool-0"),)))
    assert len(seen) == 1
