"""The workload family: each transformation keeps the base trace's requests and adds exactly
the sharing it documents."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from bench import workloads
from bench.traces import BLOCK_TOKENS, Trace, TraceRequest


def base(n: int = 200) -> Trace:
    reqs = tuple(TraceRequest(i, 0.5 * i, 700 + 10 * i, 20, (2 * i, 2 * i + 1)) for i in range(n))
    return Trace("in-test", "mooncake", reqs)


def test_a_shared_head_is_the_same_leading_blocks_on_every_request() -> None:
    out = workloads.with_shared_head(base(), 2048)
    heads = {r.hash_ids[:4] for r in out.requests}
    assert len(heads) == 1 and min(next(iter(heads))) >= workloads.HEAD_ID_BASE
    assert all(
        r.input_length == b.input_length + 2048 for r, b in zip(out.requests, base().requests, strict=True)
    )
    with pytest.raises(ValueError, match="whole number"):
        workloads.with_shared_head(base(), 1000)


def test_zipf_heads_are_skewed_and_distinct() -> None:
    out = workloads.with_zipf_heads(base(2000), count=10, tokens=BLOCK_TOKENS, exponent=1.0, seed=3)
    counts = Counter(r.hash_ids[0] for r in out.requests)
    ranked = [c for _, c in counts.most_common()]
    assert len(counts) == 10 and ranked[0] > 2.5 * ranked[-1]  # 1/1 vs 1/10 in expectation
    assert all(h >= workloads.HEAD_ID_BASE for h in counts)


def test_each_turn_extends_the_previous_prompt_by_its_output_and_a_new_message() -> None:
    params = workloads.SessionParams(mean_turns=4.0, think_s=30.0, seed=2)
    out = workloads.as_sessions(base(), params)
    assert len(out.requests) == 200 and [r.index for r in out.requests] == list(range(200))
    assert all(a.arrival_s <= b.arrival_s for a, b in zip(out.requests, out.requests[1:], strict=False))
    followups = 0
    by_first_block: dict[int, TraceRequest] = {}
    for r in out.requests:  # arrival order: a conversation's first turn comes first
        by_first_block.setdefault(r.hash_ids[0], r)
    for r in out.requests:
        first = by_first_block[r.hash_ids[0]]
        if r is first:
            continue
        followups += 1
        assert r.hash_ids[: len(first.hash_ids)] == first.hash_ids and r.input_length > first.input_length
        assert len(r.hash_ids) == -(-r.input_length // BLOCK_TOKENS)
    assert 80 < followups < 160  # mean 4 turns: about three of four requests are follow-ups


def test_servegen_draws_rate_and_lengths_from_the_client_model(tmp_path: Path) -> None:
    (tmp_path / "trace.csv").write_text("0,2.0,1.0,Gamma,1,0.5\n600,0,0,,0,0\n1200,4.0,2.0,Weibull,1,1\n")
    pdf_in, pdf_out = {100: 0.5, 300: 0.5}, {10: 1.0}
    data = {"0": {"input_tokens": repr(pdf_in), "output_tokens": repr(pdf_out)}}
    (tmp_path / "data.json").write_text(json.dumps(data))
    trace = workloads.load_servegen(tmp_path / "trace.csv", tmp_path / "data.json", seed=1)
    first = [r for r in trace.requests if r.arrival_s < 600]
    third = [r for r in trace.requests if r.arrival_s >= 1200]
    assert not [r for r in trace.requests if 600 <= r.arrival_s < 1200]  # a silent window
    assert 900 < len(first) < 1500 and 1800 < len(third) < 3000  # 2 and 4 req/s for 600 s
    assert {r.input_length for r in trace.requests} == {100, 300}
    ids = [i for r in trace.requests for i in r.hash_ids]
    assert len(ids) == len(set(ids))  # no prefix identity: nothing shared
