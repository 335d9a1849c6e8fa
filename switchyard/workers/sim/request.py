"""Per-request state of the simulated vLLM instance, and the tokens the simulator emits.

Kept apart from the scheduler (``sim.instance``) because two things outlive one instance: the
emitted token IDs, a pure function of (engine seed, request id, output index) so a request
continues the same sequence wherever it runs (instances of one pool share the seed), and
``SimSuspended``, the state a migration carries from one instance to another (the simulator's
``SuspendedRequest``).
"""

from __future__ import annotations

import enum
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field

from switchyard.messages import EngineRequest, SamplingOptions

__all__ = ["SimRequestState", "SimSuspended", "Status", "chain_hashes", "simulated_token_id", "token_at"]

_MASK64 = (1 << 64) - 1
_ROOT_HASH = 0x5157_4954_4348_5944  # parent of the first block in every hash chain


def simulated_token_id(request_id: str, index: int, vocab_size: int, seed: int = 0) -> int:
    """The ``index``-th output token the simulator emits for ``request_id`` under engine ``seed``."""
    return token_at(request_seed(request_id, seed), index, vocab_size)


def request_seed(request_id: str, seed: int = 0) -> int:
    """The start of ``request_id``'s token sequence under the engine's ``seed`` (``EngineConfig.seed``).

    The seed is part of the hash, so that, as with vLLM, the same seed repeats a run and another
    seed gives other tokens (a different stop-token hit, other prefix-cache keys for outputs).
    Seed 0, the default, hashes the request id alone, so that runs and recorded benchmark
    results from before the seed counted keep their token IDs.
    """
    data = request_id.encode() if seed == 0 else f"{seed}\0{request_id}".encode()
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")


def token_at(seed: int, index: int, vocab_size: int) -> int:
    """splitmix64 of (seed, index): cheap, stable across processes and Python versions."""
    x = (seed + (index + 1) * 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (x ^ (x >> 31)) % vocab_size


def chain_hashes(
    tokens: Sequence[int], n: int, block_size: int, hashes: list[int] | None = None
) -> list[int]:
    """Chained hashes of the first ``n`` full blocks of ``tokens``, extending ``hashes`` in place.

    Equal token prefixes give equal chains on every instance of one process, which is what a
    destination's prefix cache needs to recognise blocks a migration already copied.
    """
    out = [] if hashes is None else hashes
    parent = out[-1] if out else _ROOT_HASH
    for i in range(len(out), n):
        parent = hash((parent, tuple(tokens[i * block_size : (i + 1) * block_size])))
        out.append(parent)
    return out


def _stop_ids(s: SamplingOptions) -> frozenset[int]:
    # The simulator has no EOS of its own; stop IDs stand in for it, so ignore_eos skips them.
    return frozenset[int]() if s.ignore_eos else frozenset(s.stop_token_ids)


class Status(enum.Enum):
    WAITING = 1
    RUNNING = 2
    DONE = 3  # finished, aborted or suspended; lazily dropped from the waiting queue


@dataclass(frozen=True, slots=True)
class SimSuspended:
    """A request taken off a simulated instance by a migration: what the destination continues.

    ``prompt`` and the limits are the client's (not ``prompt + outputs``), so the destination
    keeps counting output indices from the same origin and emits the same tokens the source
    would have. ``num_computed`` is how many leading tokens had KV on the source.
    """

    request_id: str
    prompt: tuple[int, ...]
    outputs: tuple[int, ...]
    max_tokens: int
    min_tokens: int
    stop_ids: frozenset[int]
    num_cached_tokens: int  # the first admission's prefix hit; -1 if it never ran
    num_computed: int

    @property
    def tokens(self) -> tuple[int, ...]:
        return self.prompt + self.outputs

    @classmethod
    def of(cls, req: EngineRequest, outputs: Sequence[int], num_computed: int) -> SimSuspended:
        """From the client's request and the outputs so far (a ``SuspendedRequest``'s fields)."""
        s = req.sampling
        prompt = tuple(req.prompt_token_ids)
        # The source's prefix hit does not travel in a SuspendedRequest: 0, as vLLM reports an unknown one.
        return cls(
            req.request_id, prompt, tuple(outputs), s.max_tokens, s.min_tokens, _stop_ids(s), 0, num_computed
        )


@dataclass(slots=True, eq=False)
class SimRequestState:
    """Mutable per-request state of the model (prompt + outputs, KV progress, blocks)."""

    request_id: str
    tokens: list[int]  # prompt + outputs so far
    num_prompt: int
    max_tokens: int
    min_tokens: int
    stop_ids: frozenset[int]
    seed: int  # of the emitted token IDs
    status: Status = Status.WAITING
    num_computed: int = 0  # tokens whose KV is in blocks
    prefill_len: int = 0  # len(tokens) at the last admission; decoding once computed past it
    num_cached_tokens: int = -1  # prefix hit of the first admission (-1: not admitted yet)
    num_registered: int = 0  # leading blocks already published in the prefix cache
    blocks: list[int] = field(default_factory=list)
    hashes: list[int] = field(default_factory=list)  # chained hashes of the full blocks of tokens

    @classmethod
    def of(cls, req: EngineRequest, seed: int = 0) -> SimRequestState:
        """A new request's state; ``seed`` is the engine's (``EngineConfig.seed``)."""
        s = req.sampling
        prompt = list(req.prompt_token_ids)
        return cls(
            req.request_id,
            prompt,
            len(prompt),
            s.max_tokens,
            s.min_tokens,
            _stop_ids(s),
            request_seed(req.request_id, seed),
        )

    @classmethod
    def resumed(cls, s: SimSuspended, seed: int = 0) -> SimRequestState:
        """A suspended request as a fresh waiting request (no KV yet) on an instance with engine
        ``seed``: the same seed as its source's (one pool), so the same tokens continue."""
        return cls(
            s.request_id,
            [*s.prompt, *s.outputs],
            len(s.prompt),
            s.max_tokens,
            s.min_tokens,
            s.stop_ids,
            request_seed(s.request_id, seed),
            num_cached_tokens=s.num_cached_tokens,
        )

    def suspended(self) -> SimSuspended:
        """This request's state for a destination (a waiting one has no KV: ``num_computed`` 0)."""
        n = self.num_prompt
        return SimSuspended(
            self.request_id,
            tuple(self.tokens[:n]),
            tuple(self.tokens[n:]),
            self.max_tokens,
            self.min_tokens,
            self.stop_ids,
            self.num_cached_tokens,
            self.num_computed,
        )

    def block_hashes(self, n: int, block_size: int) -> list[int]:
        """Chained hashes of the first ``n`` full blocks (computed once, extended on demand)."""
        return chain_hashes(self.tokens, n, block_size, self.hashes)

    def pending_prefill(self) -> int:
        """Tokens still to prefill: all of them while waiting without KV, else the rest of the chunks.

        A request a migration placed in the waiting queue arrives with KV (``blocks``) and
        ``prefill_len`` already set, so only what its KV lacks is pending.
        """
        if self.status is Status.WAITING and not self.blocks:
            return len(self.tokens)
        return max(0, self.prefill_len - self.num_computed)
