"""The continuation rule, stated once in ``messages``: a request carries on as prompt + outputs
with its budget reduced, and ``MovableStream`` keeps the client's usage across legs."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from switchyard.messages import EngineOutput, EngineRequest, FinishReason, SamplingOptions, SuspendedRequest
from switchyard.router.movable_stream import MovableStream

REQ = EngineRequest("r", (1, 2, 3), SamplingOptions(max_tokens=10, min_tokens=4, temperature=0.0))


def test_nothing_generated_continues_as_the_request_itself() -> None:
    assert REQ.continued(()) is REQ


def test_outputs_become_prompt_and_the_budget_shrinks_by_as_many() -> None:
    nxt = REQ.continued([7, 8, 9])
    assert nxt is not None
    assert list(nxt.prompt_token_ids) == [1, 2, 3, 7, 8, 9]
    assert (nxt.sampling.max_tokens, nxt.sampling.min_tokens) == (7, 1)
    assert nxt.sampling.temperature == 0.0 and nxt.request_id == "r"
    later = nxt.continued([10, 11])
    assert later is not None and (later.sampling.max_tokens, later.sampling.min_tokens) == (5, 0)


def test_a_spent_budget_has_no_continuation() -> None:
    assert REQ.continued(list(range(10))) is None
    assert REQ.continued(list(range(12))) is None


def test_a_suspended_request_continues_by_the_same_rule() -> None:
    s = SuspendedRequest("r", "src", REQ.prompt_token_ids, (7, 8), REQ.sampling, {"t": 1})
    assert s.request == REQ
    assert s.continuation() == REQ.continued((7, 8))


@pytest.mark.parametrize(
    ("options", "refused"),
    [
        (SamplingOptions(max_tokens=4), None),
        (SamplingOptions(max_tokens=4, seed=3), "seeded"),
        (SamplingOptions(max_tokens=4, presence_penalty=0.5), "presence/frequency"),
        (SamplingOptions(max_tokens=4, frequency_penalty=0.5), "presence/frequency"),
        (SamplingOptions(max_tokens=4, repetition_penalty=1.2), "repetition"),
    ],
)
def test_migration_refusal_names_why_the_output_would_change(
    options: SamplingOptions, refused: str | None
) -> None:
    why = options.migration_refusal()
    assert (why is None) if refused is None else (why is not None and refused in why)


async def _outputs(*outs: EngineOutput) -> AsyncIterator[EngineOutput]:
    for out in outs:
        yield out


async def test_a_failover_leg_keeps_the_clients_usage_and_reports_its_own_cache_hit() -> None:
    """The second leg's engine sees prompt + 2 outputs (5 tokens, 4 cached); the client keeps
    seeing its 3-token prompt and its first leg's 1 cached token."""
    leg = _outputs(
        EngineOutput("r", (9,), False, None, 5, 4, "w1"),
        EngineOutput("r", (10,), True, FinishReason.LENGTH, 5, 4, "w1"),
    )
    stream = MovableStream("r", "w1", leg, usage=(3, 1))
    assert stream.engine_cached_tokens == 0
    outs = [out async for out in stream]
    assert [(o.token_ids, o.num_prompt_tokens, o.num_cached_tokens, o.instance_id) for o in outs] == [
        ((9,), 3, 1, "w1"),
        ((10,), 3, 1, "w1"),
    ]
    assert stream.engine_cached_tokens == 4


async def test_a_first_leg_takes_its_usage_from_its_first_output() -> None:
    stream = MovableStream("r", "w0", _outputs(EngineOutput("r", (4,), True, FinishReason.STOP, 3, 2, "w0")))
    (out,) = [o async for o in stream]
    assert (out.num_prompt_tokens, out.num_cached_tokens, stream.engine_cached_tokens) == (3, 2, 2)
