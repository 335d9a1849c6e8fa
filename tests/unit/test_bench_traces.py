"""Trace loaders and prompt synthesis of the routing benchmark (bench/traces.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.traces import (
    BLOCK_TOKENS,
    TokenSynth,
    TraceRequest,
    load_azure,
    load_mooncake,
    lru_hit_rate,
    prefix_hit_bound,
)


def _write_mooncake(path: Path, records: list[dict[str, object]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def _req(index: int, n: int, ids: tuple[int, ...], t: float = 0.0) -> TraceRequest:
    return TraceRequest(index, t, n, 4, ids)


@pytest.fixture
def mooncake(tmp_path: Path) -> Path:
    return _write_mooncake(
        tmp_path / "m.jsonl",
        [
            {"timestamp": 1000, "input_length": 1000, "output_length": 5, "hash_ids": [0, 1]},
            {"timestamp": 0, "input_length": 600, "output_length": 3, "hash_ids": [0, 2]},
            {"timestamp": 2500, "input_length": 1500, "output_length": 7, "hash_ids": [0, 1, 3]},
        ],
    )


def test_mooncake_times_are_seconds_sorted_and_rebased(mooncake: Path) -> None:
    """Milliseconds become seconds from the first arrival; records are sorted by time."""
    trace = load_mooncake(mooncake)
    assert [r.arrival_s for r in trace.requests] == [0.0, 1.0, 2.5]
    assert [r.input_length for r in trace.requests] == [600, 1000, 1500]
    assert [r.index for r in trace.requests] == [0, 1, 2]
    assert trace.requests[2].hash_ids == (0, 1, 3)
    assert trace.rate == pytest.approx(2 / 2.5)


def test_mooncake_window_and_limit(mooncake: Path) -> None:
    """The window keeps arrivals in [start, start + duration), re-based to the window start."""
    trace = load_mooncake(mooncake, start_s=0.5, duration_s=5.0)
    assert [r.arrival_s for r in trace.requests] == [0.5, 2.0]
    assert len(load_mooncake(mooncake, limit=2).requests) == 2


def test_mooncake_rejects_inconsistent_hash_ids(tmp_path: Path) -> None:
    """``len(hash_ids)`` must be ceil(input_length / 512)."""
    bad = _write_mooncake(
        tmp_path / "bad.jsonl", [{"timestamp": 0, "input_length": 513, "output_length": 1, "hash_ids": [1]}]
    )
    with pytest.raises(ValueError, match="hash_ids"):
        load_mooncake(bad)


def test_azure_wall_clock_and_unique_prefixes(tmp_path: Path) -> None:
    """TIMESTAMP (7 fraction digits, across midnight) becomes seconds; blocks never repeat."""
    path = tmp_path / "a.csv"
    path.write_text(
        "TIMESTAMP,ContextTokens,GeneratedTokens\n"
        "2023-11-16 23:59:59.5000000,1100,10\n"
        "2023-11-17 00:00:00.7500000,300,2",
        encoding="utf-8",
    )
    trace = load_azure(path)
    assert [r.arrival_s for r in trace.requests] == pytest.approx([0.0, 1.25])
    first, second = trace.requests
    assert len(first.hash_ids) == 3 and len(second.hash_ids) == 1
    assert not set(first.hash_ids) & set(second.hash_ids)
    assert prefix_hit_bound(trace.requests).token_hit_rate == 0.0


def test_azure_prefix_groups_share_leading_blocks(tmp_path: Path) -> None:
    """With one synthetic group, every request shares the group's full blocks, never its last one."""
    path = tmp_path / "a.csv"
    rows = "\n".join(f"2023-11-16 10:00:0{i}.0000000,{n},5" for i, n in enumerate((3000, 3000, 700)))
    path.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n" + rows, encoding="utf-8")
    trace = load_azure(path, prefix_groups=1, prefix_tokens=1024, seed=3)
    a, b, c = (r.hash_ids for r in trace.requests)
    assert a[:2] == b[:2] and a[2:] != b[2:]
    assert c[0] == a[0] and c[1] not in a  # 700 tokens: only the first block is full
    assert len(set(a[2:]) | set(b[2:])) == len(a[2:]) + len(b[2:])


def test_synthesized_tokens_share_exactly_the_shared_blocks() -> None:
    """Equal leading ids give equal tokens; the first differing block differs; lengths are exact."""
    synth = TokenSynth(32000, seed=1)
    a = synth.tokens(_req(0, 1200, (7, 8, 9)))
    b = synth.tokens(_req(1, 1100, (7, 8, 10)))
    assert len(a) == 1200 and len(b) == 1100
    assert a[: 2 * BLOCK_TOKENS] == b[: 2 * BLOCK_TOKENS]
    assert a[2 * BLOCK_TOKENS : 2 * BLOCK_TOKENS + 16] != b[2 * BLOCK_TOKENS : 2 * BLOCK_TOKENS + 16]
    assert all(0 <= t < 32000 for t in a)
    assert synth.tokens(_req(0, 1200, (7, 8, 9))) == a
    assert TokenSynth(32000, seed=2).tokens(_req(0, 1200, (7, 8, 9))) != a


def test_partial_last_block_is_a_prefix_of_the_full_block() -> None:
    """A request ending inside block h holds the first tokens of h, as another request's full h."""
    synth = TokenSynth(1000)
    full = synth.tokens(_req(0, 1024, (1, 2)))
    part = synth.tokens(_req(1, 600, (1, 2)))
    assert part == full[:600]


def test_prefix_bound_counts_leading_chain_only() -> None:
    """Only a prefix seen before counts: same ids after a different first block do not."""
    reqs = [
        _req(0, 1024, (1, 2)),
        _req(1, 1536, (1, 2, 3)),  # 1024 of 1536 cached
        _req(2, 1024, (4, 2)),  # block 2 under another parent: nothing
    ]
    bound = prefix_hit_bound(reqs)
    assert bound.per_request == (0, 1024, 0)
    assert bound.hit_tokens == 1024
    assert bound.token_hit_rate == pytest.approx(1024 / (1024 + 1536 + 1024))
    assert bound.block_hit_rate == pytest.approx(2 / 7)


def test_prefix_bound_follows_engine_rules() -> None:
    """The last prompt token is recomputed, hits are whole 16-token blocks, partial blocks cap."""
    reqs = [
        _req(0, 1024, (1, 2)),
        _req(1, 1024, (1, 2)),  # identical: all but the last 16-token block
        _req(2, 700, (5, 6)),  # block 6 holds 188 tokens
        _req(3, 1024, (5, 6)),  # hits 512 + 188 -> floored to 688
    ]
    assert prefix_hit_bound(reqs).per_request == (0, 1008, 0, 688)


def test_lru_reference_is_capped_by_capacity() -> None:
    """A huge cache reaches the infinite bound; a one-block cache loses the reuse."""
    reqs = [_req(0, 1024, (1, 2)), _req(1, 1024, (3, 4)), _req(2, 1024, (1, 2))]
    best = prefix_hit_bound(reqs).token_hit_rate
    assert lru_hit_rate(reqs, 10**9) == pytest.approx(best)
    assert lru_hit_rate(reqs, BLOCK_TOKENS) == 0.0
