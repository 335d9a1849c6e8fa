"""The routing benchmark's workload family: transformations of the shared public traces.

Production traffic rarely looks like the committed Mooncake synthetic trace, whose requests
share prefixes of many small groups and start with distinct first blocks. Real services put a
long system prompt or tool preamble in front of everything, serve several applications with
skewed popularity, and carry multi-turn conversations. A routing policy tuned on one trace can
fail on those (a key hashed over the first few blocks sees one key for the whole fleet), so
each workload here is generated from a shared trace by a deterministic, documented rule, and
the benchmark runs them all:

* :func:`with_shared_head`: one common head of ``tokens`` tokens before every request (a
  system prompt; 512, 2k and 8k tokens are the documented points);
* :func:`with_zipf_heads`: ``count`` heads with Zipf(``exponent``) popularity, each request
  drawing one (several applications or tenants, each with its own preamble);
* :func:`as_sessions`: multi-turn conversations, turn ``k+1`` = turn ``k``'s prompt + its
  output + a new message, with think-time gaps between turns;
* :func:`load_servegen`: arrivals and lengths drawn from a ServeGen client model (Alibaba
  Bailian; rate and burstiness per 10-minute window, length PDFs per 6 hours); no prefix
  identity, like the Azure trace: the control where affinity has nothing to win.

Heads are made of block ids from a reserved range (:data:`HEAD_ID_BASE`), so they share
tokens with nothing in the base trace; ``TokenSynth`` then gives equal ids equal tokens.
Every head length is a whole number of 512-token blocks, since a block's tokens depend on its
position. Lengths grow by the head; requests that no longer fit the engine's context are
dropped by the benchmark's loader, as any over-long request is.

Statistics behind the session defaults (cited, not measured here): in the to-C (chatbot)
trace of "KVCache Cache in the Wild" (Wang et al., USENIX ATC'25, arXiv:2506.02634) 80 % of
KV reuses happen within 10 minutes (human think time between turns), in the to-B (API)
trace within 10 seconds, and in to-B traffic 97 % of cache hits come from single-turn
requests sharing system prompts. The mean number of turns (default 3) and the think-time
mean (default 60 s, exponential, capped at 600 s so that 80 %+ of follow-ups come within
10 minutes) are assumptions in that range, parameters of the generator, not fitted values.
The multi-turn structure of Mooncake's own conversation trace is summarized only in its
FAST'25 paper; its per-request file is not in ``shared/traces``.

Known limit of every generated follow-up turn: the previous turn's *output* tokens in the
next prompt are synthesized from block ids, while the simulator generated other token ids,
so a follow-up can reuse the previous prompt's KV but not the previous output's (as on a real
engine when the client edits the answer). The cost is at most one answer's prefill per turn.
"""

from __future__ import annotations

import ast
import csv
import json
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from bench.traces import BLOCK_TOKENS, Trace, TraceRequest

__all__ = [
    "HEAD_ID_BASE",
    "SessionParams",
    "as_sessions",
    "load_servegen",
    "with_shared_head",
    "with_zipf_heads",
]

HEAD_ID_BASE = 1 << 40
"""First block id of generated heads; trace ids stay far below (Mooncake's are < 2^20)."""
_SESSION_ID_BASE = 1 << 41  # first block id of generated conversation content


def _blocks(tokens: int) -> int:
    if tokens < 0 or tokens % BLOCK_TOKENS:
        raise ValueError(f"a head must be a whole number of {BLOCK_TOKENS}-token blocks, got {tokens}")
    return tokens // BLOCK_TOKENS


def _reindexed(requests: Sequence[TraceRequest]) -> tuple[TraceRequest, ...]:
    ordered = sorted(requests, key=lambda r: (r.arrival_s, r.index))
    return tuple(replace(r, index=i) for i, r in enumerate(ordered))


def _prepend(req: TraceRequest, head: tuple[int, ...]) -> TraceRequest:
    return replace(
        req, input_length=req.input_length + len(head) * BLOCK_TOKENS, hash_ids=head + req.hash_ids
    )


def with_shared_head(trace: Trace, tokens: int) -> Trace:
    """Every request begins with the same ``tokens``-token head (a system prompt)."""
    head = tuple(HEAD_ID_BASE + k for k in range(_blocks(tokens)))
    return replace(trace, requests=tuple(_prepend(r, head) for r in trace.requests))


def with_zipf_heads(trace: Trace, *, count: int, tokens: int, exponent: float = 1.0, seed: int = 0) -> Trace:
    """Each request begins with one of ``count`` heads of ``tokens`` tokens, head ``k`` (from 1)
    drawn with probability proportional to ``k ** -exponent``."""
    if count < 1:
        raise ValueError(f"count must be at least 1, got {count}")
    n = _blocks(tokens)
    heads = [tuple(HEAD_ID_BASE + h * n + k for k in range(n)) for h in range(count)]
    weights = [1.0 / (k + 1) ** exponent for k in range(count)]
    rng = random.Random(seed)
    picks = rng.choices(range(count), weights=weights, k=len(trace.requests))
    return replace(
        trace, requests=tuple(_prepend(r, heads[h]) for r, h in zip(trace.requests, picks, strict=True))
    )


@dataclass(frozen=True, slots=True)
class SessionParams:
    """How ``as_sessions`` strings the base trace's requests into conversations."""

    mean_turns: float = 3.0
    """Mean turns per conversation (1 + geometric); see the module docstring for the source."""
    think_s: float = 60.0
    """Mean think time between an answer and the next message (exponential), seconds."""
    max_think_s: float = 600.0
    """Cap of one think time."""
    decode_s_per_token: float = 0.03
    """Assumed time per output token when placing the next turn (the replay is open-loop)."""
    max_context: int = 131_072
    """A conversation ends before a turn would exceed this many prompt + output tokens."""
    seed: int = 0


def as_sessions(trace: Trace, params: SessionParams | None = None) -> Trace:
    """Multi-turn conversations built from ``trace``'s requests, in arrival order.

    Each base request is one *message*: its input length is the new text of a turn, its output
    length the answer. A conversation starts at its first message's arrival and draws its turn
    count; its turn ``k+1`` arrives ``output_k * decode_s_per_token + think`` after turn ``k``
    with prompt = turn ``k``'s prompt + output + the next unused base message. Block ids of the
    prompt carry over unchanged (the last, partial one too: ``TokenSynth`` makes a block's
    tokens from its id, so the longer prompt extends the shorter one exactly), new content gets
    fresh ids. Base requests' heads (shared prefixes) stay on the first turn's prompt.
    """
    p = params or SessionParams()
    if p.mean_turns < 1:
        raise ValueError(f"mean_turns must be at least 1, got {p.mean_turns}")
    rng = random.Random(p.seed)
    stop = 1.0 / p.mean_turns  # geometric: P(no further turn)
    base = list(trace.requests)
    next_id = _SESSION_ID_BASE
    out: list[TraceRequest] = []
    i = 0
    while i < len(base):
        first = base[i]
        i += 1
        turns = 1
        while rng.random() >= stop:
            turns += 1
        prompt_ids, n_in, t = first.hash_ids, first.input_length, first.arrival_s
        out.append(replace(first, index=len(out)))
        n_out = first.output_length
        for _ in range(turns - 1):
            if i >= len(base):
                break
            msg = base[i]
            new_in = n_in + n_out + msg.input_length
            if new_in + msg.output_length > p.max_context:
                break
            i += 1
            t += n_out * p.decode_s_per_token + min(rng.expovariate(1.0 / p.think_s), p.max_think_s)
            have = len(prompt_ids)
            need = math.ceil(new_in / BLOCK_TOKENS)
            fresh = tuple(range(next_id, next_id + need - have))
            next_id += len(fresh)
            prompt_ids = prompt_ids + fresh
            n_in, n_out = new_in, msg.output_length
            out.append(TraceRequest(len(out), t, n_in, n_out, prompt_ids))
    return replace(trace, requests=_reindexed(out))


def _pdf(text: str) -> tuple[list[int], list[float]]:
    table = ast.literal_eval(text)
    values = [int(v) for v in table]
    return values, [float(table[v]) for v in table]


def load_servegen(
    trace_csv: str | Path,
    dataset_json: str | Path,
    *,
    start_s: float = 0.0,
    duration_s: float | None = None,
    limit: int | None = None,
    seed: int = 0,
) -> Trace:
    """A request stream drawn from one ServeGen client: per 600 s window, inter-arrivals with
    the window's rate and coefficient of variation (Gamma with shape ``1/cv²``; ServeGen's
    fitted families differ in the tail, and the copy's parameter columns are undocumented);
    input and output lengths from the PDFs of the latest 6-hour dataset window. Every request
    gets fresh block ids: ServeGen publishes no prefix identity."""
    with open(dataset_json, encoding="utf-8") as f:
        raw = json.load(f)
    pdfs = sorted((float(k), _pdf(v["input_tokens"]), _pdf(v["output_tokens"])) for k, v in raw.items())
    rng = random.Random(seed)
    rows: list[tuple[float, int, int]] = []
    with open(trace_csv, encoding="utf-8", newline="") as f:
        for rec in csv.reader(f):
            w0, rate, cv = float(rec[0]), float(rec[1]), float(rec[2])
            if rate <= 0:
                continue
            lengths = [p for p in pdfs if p[0] <= w0][-1] if pdfs[0][0] <= w0 else pdfs[0]
            shape = 1.0 / max(cv, 1e-3) ** 2
            t = w0 + rng.gammavariate(shape, 1.0 / (rate * shape))
            while t < w0 + 600.0:
                n_in = rng.choices(lengths[1][0], weights=lengths[1][1])[0]
                n_out = rng.choices(lengths[2][0], weights=lengths[2][1])[0]
                rows.append((t, max(n_in, 1), max(n_out, 1)))
                t += rng.gammavariate(shape, 1.0 / (rate * shape))
    rows.sort()
    out: list[TraceRequest] = []
    next_id = 0
    for t, n_in, n_out in rows:
        if t < start_s or (duration_s is not None and t >= start_s + duration_s):
            continue
        if limit is not None and len(out) >= limit:
            break
        n_blocks = -(-n_in // BLOCK_TOKENS)
        out.append(
            TraceRequest(len(out), t - start_s, n_in, n_out, tuple(range(next_id, next_id + n_blocks)))
        )
        next_id += n_blocks
    return Trace(str(trace_csv), "servegen", tuple(out))
