"""Consistent-hash rings: minimal remapping on scale events, distinct candidates, determinism."""

from __future__ import annotations

import hashlib
import random

import pytest

from switchyard.router.dual_ring import DualRing, HashRing

N = 8
KEYS = [hashlib.sha256(b"key-%d" % i).digest() for i in range(10_000)]
IDS = [f"inst-{i}" for i in range(N)]


def _owners(ring: HashRing) -> list[str | None]:
    return [ring.lookup(k) for k in KEYS]


@pytest.mark.parametrize("which", ["ring1", "ring2"])
def test_adding_an_instance_moves_about_one_nth_of_keys_and_only_to_it(which: str) -> None:
    """Adding a 9th instance remaps ~1/9 of the keys on each ring, every one of them to the newcomer."""
    dual = DualRing(instances=IDS)
    ring: HashRing = getattr(dual, which)
    before = _owners(ring)
    dual.add("inst-new")
    after = _owners(ring)
    moved = [(a, b) for a, b in zip(before, after, strict=True) if a != b]
    assert {b for _, b in moved} == {"inst-new"}
    assert 0.5 / (N + 1) < len(moved) / len(KEYS) < 1.6 / (N + 1), len(moved)


@pytest.mark.parametrize("which", ["ring1", "ring2"])
def test_removing_an_instance_moves_only_its_keys(which: str) -> None:
    """Removing one of 8 instances remaps ~1/8 of the keys: exactly those it owned."""
    dual = DualRing(instances=IDS)
    ring: HashRing = getattr(dual, which)
    before = _owners(ring)
    dual.remove("inst-3")
    after = _owners(ring)
    moved = [i for i, (a, b) in enumerate(zip(before, after, strict=True)) if a != b]
    assert all(before[i] == "inst-3" for i in moved)
    assert len(moved) == before.count("inst-3")
    assert 0.5 / N < len(moved) / len(KEYS) < 1.6 / N, len(moved)


def test_candidates_always_differ_and_spread_evenly() -> None:
    """c2 != c1 for every key; each instance is a candidate for about 2/N of the keys."""
    dual = DualRing(instances=IDS)
    counts = dict.fromkeys(IDS, 0)
    for key in KEYS:
        c1, c2 = dual.candidates(key)
        assert c1 != c2
        counts[c1] += 1
        counts[c2] += 1
    for iid, n in counts.items():
        assert 0.6 * 2 / N < n / len(KEYS) < 1.4 * 2 / N, (iid, n)


def test_rings_are_independent() -> None:
    """The second ring is not a copy of the first: c1 and c2 vary independently."""
    dual = DualRing(instances=IDS)
    pairs = {dual.candidates(k) for k in KEYS[:2000]}
    assert len(pairs) > 0.8 * N * (N - 1), "nearly every ordered pair of distinct instances occurs"


def test_independently_built_rings_agree_whatever_the_membership_order() -> None:
    """Two replicas that learned the same membership in different orders give the same candidates."""
    shuffled = IDS[:]
    random.Random(5).shuffle(shuffled)
    a = DualRing(instances=IDS)
    b = DualRing()
    for iid in [*shuffled, "tmp"]:
        b.add(iid)
    b.remove("tmp")
    assert [a.candidates(k) for k in KEYS[:3000]] == [b.candidates(k) for k in KEYS[:3000]]


def test_candidates_skip_dead_instances_and_keep_the_live_one() -> None:
    """A key whose first candidate is down keeps its second; with one live instance both are it."""
    dual = DualRing(instances=IDS)
    key = KEYS[0]
    c1, c2 = dual.candidates(key)
    alive_c1, alive_c2 = dual.candidates(key, lambda iid: iid != c1)
    assert c1 not in (alive_c1, alive_c2) and alive_c1 != alive_c2
    assert dual.ring1.lookup(key, lambda iid: iid != c1) == alive_c1
    assert dual.candidates(key, lambda iid: iid == c2) == (c2, c2)
    with pytest.raises(LookupError):
        dual.candidates(key, lambda iid: False)


def test_seeds_must_differ_and_sync_reports_changes() -> None:
    """Equal seeds would make both rings agree; sync() adds and removes to match a membership."""
    with pytest.raises(ValueError, match="different seeds"):
        DualRing(seeds=(1, 1))
    dual = DualRing(instances=["a", "b"])
    assert dual.sync(["b", "c"]) is True
    assert dual.instances == frozenset({"b", "c"}) and len(dual) == 2 and "a" not in dual
    assert dual.sync(["c", "b"]) is False


def test_bulk_membership_changes_build_the_same_rings_as_one_by_one() -> None:
    """``sync`` of many instances merges and sorts once; the rings must equal those built by
    adding and removing the same instances one at a time (the same keys map the same way)."""
    ids = [f"w{i}" for i in range(40)]
    one = DualRing(seeds=(11, 12))
    for iid in ids:
        one.add(iid)
    for iid in ids[::3]:
        one.remove(iid)
    bulk = DualRing(seeds=(11, 12))
    bulk.sync(ids)
    bulk.sync([iid for iid in ids if iid not in ids[::3]])
    for a, b in ((one.ring1, bulk.ring1), (one.ring2, bulk.ring2)):
        assert a._points == b._points and a._owners == b._owners
