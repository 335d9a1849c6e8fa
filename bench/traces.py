"""Trace loaders and prompt synthesis for the routing benchmark.

Public serving traces carry lengths and arrival times, and at best *prefix identities*
(Mooncake's ``hash_ids``: one id per 512-token block, equal leading ids = equal prefix), never
the prompts. Cache-affinity routing and the simulator's prefix cache both work on token IDs,
so the benchmark needs token IDs that reproduce exactly the sharing the trace describes and no
more. ``TokenSynth`` derives each block's tokens from its id alone (a splitmix64 of
``(seed, id, position)``), so requests whose leading ids agree share exactly those tokens,
and unrelated blocks share none (collisions are 16 random tokens long). Tokens are made per
request at dispatch time, never for the whole trace: a 4k-request Mooncake replay would
otherwise hold ~60M tokens.

The Azure trace has no prefix identity; each request gets fresh block ids (unique tokens).
``azure_prefix_groups`` optionally prepends a shared prefix per synthetic group; it is off by
default, because the trace says nothing about sharing and inventing it would flatter
affinity routing.

``prefix_hit_bound`` computes the best prefix-hit rate any router could reach on a trace: one
infinite cache, longest-prefix reuse, with the engine's rules (whole 16-token blocks, the last
prompt token always recomputed).
"""

from __future__ import annotations

import csv
import datetime as dt
import json
import random
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

__all__ = [
    "BLOCK_TOKENS",
    "PrefixBound",
    "TokenSynth",
    "Trace",
    "TraceRequest",
    "load_azure",
    "load_mooncake",
    "load_trace",
    "lru_hit_rate",
    "prefix_hit_bound",
]

TraceFormat = Literal["mooncake", "azure", "servegen"]

BLOCK_TOKENS = 512
"""Tokens per prefix block: Mooncake's ``hash_ids`` granularity, reused for synthetic ids."""

_ROOT = 0x5EED_B10C  # parent key of the first block of every chain
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


@dataclass(frozen=True, slots=True)
class TraceRequest:
    """One trace record: when it arrives, how long it is, which prefix blocks it is made of."""

    index: int
    arrival_s: float
    """Seconds from the start of the (windowed) trace, before rate scaling."""
    input_length: int
    output_length: int
    hash_ids: tuple[int, ...]
    """Prefix-block ids, ``BLOCK_TOKENS`` tokens each, the last one partial."""


@dataclass(frozen=True, slots=True)
class Trace:
    """An ordered list of requests plus where it came from."""

    path: str
    format: TraceFormat
    requests: tuple[TraceRequest, ...]

    @property
    def span_s(self) -> float:
        return self.requests[-1].arrival_s - self.requests[0].arrival_s if self.requests else 0.0

    @property
    def rate(self) -> float:
        """Mean arrival rate in requests per second (unscaled)."""
        return (len(self.requests) - 1) / self.span_s if self.span_s > 0 else 0.0


def _window(
    rows: list[tuple[float, int, int, tuple[int, ...]]],
    start_s: float,
    duration_s: float | None,
    limit: int | None,
) -> list[TraceRequest]:
    """Rows (sorted by time, times from trace start) inside the window, re-based to its start."""
    out: list[TraceRequest] = []
    for t, n_in, n_out, ids in rows:
        if t < start_s or (duration_s is not None and t >= start_s + duration_s):
            continue
        if limit is not None and len(out) >= limit:
            break
        out.append(TraceRequest(len(out), t - start_s, n_in, n_out, ids))
    return out


def load_mooncake(
    path: str | Path, *, start_s: float = 0.0, duration_s: float | None = None, limit: int | None = None
) -> Trace:
    """Mooncake JSONL: ``timestamp`` (ms), ``input_length``, ``output_length``, ``hash_ids``."""
    rows: list[tuple[float, int, int, tuple[int, ...]]] = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            rec = json.loads(line)
            n_in, ids = int(rec["input_length"]), tuple(int(h) for h in rec["hash_ids"])
            if len(ids) != -(-n_in // BLOCK_TOKENS):
                raise ValueError(f"{path}:{line_no}: {len(ids)} hash_ids for {n_in} input tokens")
            rows.append((float(rec["timestamp"]) / 1000.0, n_in, int(rec["output_length"]), ids))
    rows.sort(key=lambda r: r[0])  # stable: equal timestamps keep file order
    t0 = rows[0][0] if rows else 0.0
    rows = [(t - t0, n_in, n_out, ids) for t, n_in, n_out, ids in rows]
    return Trace(str(path), "mooncake", tuple(_window(rows, start_s, duration_s, limit)))


def _wall_seconds(stamp: str) -> float:
    """``2023-11-16 18:17:03.9799600`` -> seconds since 0001-01-01 (7 fraction digits allowed)."""
    date, _, clock = stamp.strip().partition(" ")
    h, m, s = clock.split(":")
    return dt.date.fromisoformat(date).toordinal() * 86400.0 + int(h) * 3600 + int(m) * 60 + float(s)


def load_azure(
    path: str | Path,
    *,
    start_s: float = 0.0,
    duration_s: float | None = None,
    limit: int | None = None,
    prefix_groups: int = 0,
    prefix_tokens: int = 0,
    seed: int = 0,
) -> Trace:
    """Azure LLM inference CSV: ``TIMESTAMP`` (wall clock), ``ContextTokens``, ``GeneratedTokens``.

    Every request gets unique block ids. With ``prefix_groups`` > 0, each request also joins one
    of that many synthetic groups (uniformly, from ``seed``) whose first
    ``prefix_tokens // BLOCK_TOKENS`` blocks are shared, capped below the request's own length.
    """
    raw: list[tuple[float, int, int]] = []
    with open(path, encoding="utf-8", newline="") as f:
        for rec in csv.DictReader(f):
            raw.append(
                (_wall_seconds(rec["TIMESTAMP"]), int(rec["ContextTokens"]), int(rec["GeneratedTokens"]))
            )
    raw.sort(key=lambda r: r[0])
    t0 = raw[0][0] if raw else 0.0
    rng = random.Random(seed)
    shared_blocks = prefix_tokens // BLOCK_TOKENS if prefix_groups > 0 else 0
    next_id = prefix_groups * shared_blocks  # ids below are the groups' shared blocks
    rows: list[tuple[float, int, int, tuple[int, ...]]] = []
    for t, n_in, n_out in raw:
        n_blocks = -(-n_in // BLOCK_TOKENS)
        ids: list[int] = []
        if shared_blocks:
            g = rng.randrange(prefix_groups)
            ids = [g * shared_blocks + k for k in range(min(shared_blocks, n_blocks - 1))]
        ids.extend(range(next_id, next_id + n_blocks - len(ids)))
        next_id += n_blocks
        rows.append((t - t0, n_in, n_out, tuple(ids)))
    return Trace(str(path), "azure", tuple(_window(rows, start_s, duration_s, limit)))


def load_trace(path: str | Path, fmt: TraceFormat, **kwargs: int | float | None) -> Trace:
    """Dispatch on the format name (the CLI's ``--format``)."""
    if fmt == "mooncake":
        return load_mooncake(path, **kwargs)  # type: ignore[arg-type]
    if fmt == "azure":
        return load_azure(path, **kwargs)  # type: ignore[arg-type]
    raise ValueError(f"unknown trace format {fmt!r}; known: mooncake, azure")


class TokenSynth:
    """Deterministic prompt token IDs from block ids: equal ids give equal tokens, nothing else does.

    Token ``j`` of block ``h`` is ``splitmix64(seed, h, j) % vocab_size``, computed with numpy for a
    whole prompt at once. The resulting ints are taken from one shared table of int objects, so a
    queued prompt costs 8 bytes per token (a list slot), not 36.
    """

    def __init__(self, vocab_size: int, *, seed: int = 0) -> None:
        self.vocab_size = vocab_size
        self._salt = np.uint64((seed * 0xD1B54A32D192ED03 + 0x2545F4914F6CDD1D) & (2**64 - 1))
        self._ints = np.array(list(range(vocab_size)), dtype=object)
        self._pos = np.arange(BLOCK_TOKENS, dtype=np.uint64) * _GOLDEN

    def tokens(self, req: TraceRequest) -> list[int]:
        """The ``input_length`` prompt tokens of ``req``."""
        ids = np.asarray(req.hash_ids, dtype=np.uint64)
        x = (ids * _M2 + self._salt)[:, None] + self._pos[None, :]
        x = x.ravel()[: req.input_length]
        x = (x ^ (x >> np.uint64(30))) * _M1
        x = (x ^ (x >> np.uint64(27))) * _M2
        x = (x ^ (x >> np.uint64(31))) % np.uint64(self.vocab_size)
        tokens: list[int] = self._ints[x.astype(np.intp)].tolist()
        return tokens


@dataclass(frozen=True, slots=True)
class PrefixBound:
    """Best reachable prefix reuse of a trace with one infinite cache (longest-prefix match)."""

    token_hit_rate: float
    """Cacheable prompt tokens / prompt tokens, under the engine's hit rules."""
    block_hit_rate: float
    """Leading blocks already seen / blocks (the trace README's 512-token-block figure)."""
    prompt_tokens: int
    hit_tokens: int
    per_request: tuple[int, ...]
    """Cacheable tokens of each request, in trace order."""

    def as_dict(self) -> dict[str, float | int]:
        """The aggregate fields (not ``per_request``), for JSON."""
        return {
            "token_hit_rate": self.token_hit_rate,
            "block_hit_rate": self.block_hit_rate,
            "prompt_tokens": self.prompt_tokens,
            "hit_tokens": self.hit_tokens,
        }


def prefix_hit_bound(requests: Sequence[TraceRequest], *, engine_block: int = 16) -> PrefixBound:
    """Infinite single-cache longest-prefix bound, in arrival order.

    A prefix of ``k`` blocks is cached once any earlier request had the same first ``k`` ids;
    a partial last block caches only as many tokens as both requests have of it. Hits are
    floored to ``engine_block`` tokens and stop before the last prompt token, as in the engine.
    """
    seen: dict[int, int] = {}  # chain key of ids[:k+1] -> most tokens of block k seen
    total_tokens = hit_tokens = total_blocks = hit_blocks = 0
    per_request: list[int] = []
    for req in requests:
        key, matched, matching, n = _ROOT, 0, True, req.input_length
        for k, h in enumerate(req.hash_ids):
            key = hash((key, h))
            length = min(BLOCK_TOKENS, n - k * BLOCK_TOKENS)
            covered = seen.get(key)
            if matching and covered is not None:
                hit_blocks += 1
                matched += min(covered, length)
                matching = covered >= length and length == BLOCK_TOKENS
            else:
                matching = False
            if covered is None or covered < length:
                seen[key] = length
        limit = (n - 1) // engine_block * engine_block
        per_request.append(min(matched // engine_block * engine_block, limit))
        hit_tokens += per_request[-1]
        total_tokens += n
        total_blocks += len(req.hash_ids)
    return PrefixBound(
        token_hit_rate=hit_tokens / total_tokens if total_tokens else 0.0,
        block_hit_rate=hit_blocks / total_blocks if total_blocks else 0.0,
        prompt_tokens=total_tokens,
        hit_tokens=hit_tokens,
        per_request=tuple(per_request),
    )


def lru_hit_rate(requests: Sequence[TraceRequest], capacity_tokens: int) -> float:
    """Token hit rate of one shared LRU cache of ``capacity_tokens`` (whole 512-token blocks).

    A reference point, not a bound: it is what pooling the whole fleet's KV into one cache
    would catch, ignoring that running requests pin their blocks.
    """
    cap = max(1, capacity_tokens // BLOCK_TOKENS)
    lru: OrderedDict[int, int] = OrderedDict()  # chain key -> tokens of that block
    total = hit = 0
    for req in requests:
        key, matched, matching, n = _ROOT, 0, True, req.input_length
        for k, h in enumerate(req.hash_ids):
            key = hash((key, h))
            length = min(BLOCK_TOKENS, n - k * BLOCK_TOKENS)
            covered = lru.get(key)
            if matching and covered is not None:
                matched += min(covered, length)
                matching = covered >= length and length == BLOCK_TOKENS
            else:
                matching = False
            lru[key] = max(length, covered or 0)
            lru.move_to_end(key)
            if len(lru) > cap:
                lru.popitem(last=False)
        hit += min(matched // 16 * 16, (n - 1) // 16 * 16)
        total += n
    return hit / total if total else 0.0
