"""Prompt hashing for routing: vLLM-equal block hashes for the key, cheap fingerprints for records.

Why two hashes. Cache-affinity routing needs two different things from a prompt:

* A **routing key** that every router replica, in any language, derives identically, and that
  names the same thing the engine caches. :class:`BlockHasher` reproduces vLLM V1's
  prefix-cache block hashes exactly (``vllm/v1/core/kv_cache_utils.py``, ``hash_block_tokens``;
  ``shared/research/vllm-migration.md`` §4.1): only full blocks are hashed, as a chain
  ``h_i = H((h_{i-1}, tuple(block_tokens), None))`` starting from
  ``h_{-1} = NONE_HASH = H(seed)``, where ``H`` is SHA-256 over ``pickle`` (``sha256``) or over
  canonical CBOR (``sha256_cbor``), and the seed is ``"vllm-none-hash"`` unless the engines run
  with ``PYTHONHASHSEED`` set (then pass that value as ``seed``). So a router hash *is* an
  engine block hash, and KV events (which publish the low 64 bits, see
  :func:`external_block_hash`) can be matched against router state. It costs ~3 µs per block
  in CPython, so routing hashes only the first K blocks (:meth:`BlockHasher.prefix_key`),
  through a bounded LRU of recent blocks, and :meth:`PromptHasher.key` memoises whole keys on
  the exact first K blocks' tokens: requests that share a prefix share those blocks.
* A **per-instance record** of what was routed where, matched against every prompt on the
  hot path. Hashing all 256 blocks of an 8k-token prompt with SHA-256 takes ~700 µs, and
  even CPython's tuple hash over every token costs ~60-130 µs, over the whole decision
  budget. :func:`chunk_fingerprints` therefore chains CPython's built-in (deterministic for
  ints) tuple hash over chunks of whole blocks that double in size up to a cap
  (:func:`chunk_ends`: 1, 2, 4, ..., 32, 64, 96, ... blocks) and, with ``stride > 1``, over
  every ``stride``-th token of each chunk including its last. That is
  an *approximation*: two prompts that differ only at unsampled positions of a chunk get the
  same fingerprint there (a contiguous difference of ``stride`` tokens or more is always
  seen). It only ever feeds an estimate of cached tokens, which the engine-reported hits
  correct; it never decides correctness. ``stride=1`` makes it exact.

:class:`PrefixRecord` is the bounded per-instance record of fingerprints routed there.
:class:`PromptHasher` bundles both hashes per policy and keeps the latest digest until
``on_dispatched`` releases it, so ``choose`` and ``on_dispatched`` hash a request once.
Nothing here imports vLLM; tests check parity against vLLM's own functions.
"""

from __future__ import annotations

import functools
import hashlib
import math
import pickle
from collections import OrderedDict
from collections.abc import Sequence
from typing import Literal, NamedTuple

from switchyard.messages import RoutingRequest
from switchyard.router.canonical_cbor import U64_MAX, cbor_block, cbor_encode

__all__ = [
    "DEFAULT_NONE_HASH_SEED",
    "BlockHasher",
    "HashAlgo",
    "PrefixRecord",
    "PromptDigest",
    "PromptHasher",
    "chunk_ends",
    "chunk_fingerprints",
    "external_block_hash",
]

HashAlgo = Literal["sha256", "sha256_cbor"]

DEFAULT_NONE_HASH_SEED = "vllm-none-hash"
"""vLLM's seed of ``NONE_HASH`` for cryptographic algorithms when ``PYTHONHASHSEED`` is unset."""

_PICKLE_PROTOCOL = pickle.HIGHEST_PROTOCOL  # what vLLM's sha256 uses (5 on Python 3.11)
_FINGERPRINT_SEED = 0x5157_4954_4348  # any constant; fingerprints never leave the process


def external_block_hash(block_hash: bytes) -> int:
    """A block hash as vLLM's KV events publish it by default: the low 64 bits, big-endian.

    (``VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=0`` makes vLLM publish the raw bytes instead.)
    """
    return int.from_bytes(block_hash, "big") & U64_MAX


_KEY_MEMO_TOKENS = 1 << 18  # head tokens kept by PromptHasher's key memo (~10 MB with their ints)
_BLOCK_CACHE_SIZE = 8192  # (parent, block) -> hash entries, ~3 MB at 32-token blocks
_SHA256 = hashlib.sha256()  # copied, not constructed: OpenSSL 3 looks the algorithm up per construction


@functools.lru_cache(maxsize=_BLOCK_CACHE_SIZE)
def _sha256_block(parent: bytes, tokens: tuple[int, ...]) -> bytes:
    h = _SHA256.copy()
    h.update(pickle.dumps((parent, tokens, None), protocol=_PICKLE_PROTOCOL))
    return h.digest()


@functools.lru_cache(maxsize=_BLOCK_CACHE_SIZE)
def _sha256_cbor_block(parent: bytes, tokens: tuple[int, ...]) -> bytes:
    h = _SHA256.copy()
    h.update(cbor_block(parent, tokens))
    return h.digest()


class BlockHasher:
    """vLLM V1's prefix-cache block hashes, bit for bit (no LoRA, multimodal or salt keys).

    ``seed`` is the ``NONE_HASH`` seed: ``None`` means vLLM's default for cryptographic
    algorithms; pass the engines' ``PYTHONHASHSEED`` if they run with one (read it in config
    loading, never here).
    """

    __slots__ = ("algo", "block_size", "none_hash", "seed")

    def __init__(self, block_size: int, algo: HashAlgo = "sha256", seed: str | None = None) -> None:
        if block_size < 1:
            raise ValueError(f"block_size must be positive, got {block_size}")
        if algo not in ("sha256", "sha256_cbor"):
            raise ValueError(f"unsupported prefix-caching hash algorithm {algo!r}")
        self.block_size = block_size
        self.algo: HashAlgo = algo
        self.seed = DEFAULT_NONE_HASH_SEED if seed is None else seed
        self.none_hash = self._hash_obj(self.seed)

    def __repr__(self) -> str:
        return f"BlockHasher({self.block_size}, {self.algo!r}, seed={self.seed!r})"

    def _hash_obj(self, obj: object) -> bytes:
        if self.algo == "sha256":
            return hashlib.sha256(pickle.dumps(obj, protocol=_PICKLE_PROTOCOL)).digest()
        return hashlib.sha256(cbor_encode(obj)).digest()

    def hash_block(self, parent: bytes | None, tokens: Sequence[int]) -> bytes:
        """One chain step: ``H((parent or NONE_HASH, tuple(tokens), None))``."""
        cached = _sha256_block if self.algo == "sha256" else _sha256_cbor_block
        return cached(parent or self.none_hash, tuple(tokens))

    def block_hashes(self, token_ids: Sequence[int], max_blocks: int | None = None) -> list[bytes]:
        """Hashes of the full blocks of ``token_ids`` (at most ``max_blocks``), as vLLM computes them."""
        bs = self.block_size
        n = len(token_ids) // bs
        if max_blocks is not None:
            n = min(n, max_blocks)
        out: list[bytes] = []
        parent = self.none_hash
        # Requests that share a prefix share these blocks: a C-level LRU over (parent, tokens)
        # turns most of the routing key into lookups (vLLM memoises the same way).
        cached = _sha256_block if self.algo == "sha256" else _sha256_cbor_block
        for start in range(0, n * bs, bs):
            parent = cached(parent, tuple(token_ids[start : start + bs]))
            out.append(parent)
        return out

    def prefix_key(self, token_ids: Sequence[int], max_blocks: int) -> bytes:
        """The routing key: the chain hash of the first ``max_blocks`` full blocks.

        Shorter prompts use the full blocks they have. A prompt without a full block (which
        no engine can cache anyway) is keyed by the same function over its partial block, so
        short prompts still spread; an empty prompt is keyed by ``NONE_HASH``.
        """
        hashes = self.block_hashes(token_ids, max_blocks)
        if hashes:
            return hashes[-1]
        return self.hash_block(None, token_ids) if token_ids else self.none_hash


def chunk_ends(block_size: int, chunk_blocks: int, num_tokens: int) -> list[int]:
    """Where the fingerprinted chunks of a ``num_tokens`` prompt end, in tokens.

    Chunks double from one block up to ``chunk_blocks`` blocks, then stay at that size
    (1, 2, 4, ..., C, 2C, 3C, ... blocks), and only full blocks count. Short shared prefixes
    (system prompts) are thus resolved to within a factor of two, while a long prompt costs
    ``log2(C) + n / C`` chunks rather than one per block.
    """
    return _ends(block_size, chunk_blocks, num_tokens // block_size)


@functools.lru_cache(maxsize=4096)
def _ends(block_size: int, chunk_blocks: int, num_blocks: int) -> list[int]:
    ends: list[int] = []
    b = 1
    while b <= num_blocks:
        ends.append(b * block_size)
        b = b * 2 if b < chunk_blocks else b + chunk_blocks
    return ends


def chunk_fingerprints(token_ids: Sequence[int], ends: Sequence[int], stride: int = 1) -> list[int]:
    """Chained fingerprints of the chunks of a prompt ending at ``ends`` (router-internal).

    ``f_j = hash((f_{j-1}, tokens of chunk j at positions stride-1, 2*stride-1, ...))``, so
    ``f_j`` stands for the whole prefix up to ``ends[j]``, and two prompts share fingerprint
    ``j`` exactly when (up to sampling, see the module docstring) they share that prefix.
    ``stride`` must divide every end. CPython's hash of ints and tuples is deterministic
    (``PYTHONHASHSEED`` randomises only str/bytes), but these values are only ever compared
    within one process.
    """
    if not ends:
        return []
    samples = tuple(token_ids[stride - 1 : ends[-1] : stride])  # stride 1: the tokens themselves
    out: list[int] = []
    h, start = _FINGERPRINT_SEED, 0
    for end in ends:
        stop = end // stride
        h = hash((h, samples[start:stop]))
        out.append(h)
        start = stop
    return out


class PromptDigest(NamedTuple):
    """Everything a cache-aware policy needs from one prompt, computed once.

    A ``NamedTuple`` because one is built per request on the hot path (see ``RoutingDecision``).
    """

    key: bytes
    """vLLM-equal chain hash of the first ``prefix_blocks`` blocks: the ring key (``b""`` when
    the hasher was built with ``prefix_blocks=0``: a policy that uses no key pays for none)."""
    fingerprints: list[int]
    """Chunk fingerprints (:func:`chunk_fingerprints`) of the whole prompt."""
    ends: Sequence[int]
    """Token offset where each fingerprinted chunk ends (shared, do not modify)."""
    num_tokens: int
    """Prompt length."""
    max_cacheable: int
    """Most prompt tokens an engine can serve from cache: whole blocks, one token left to compute."""

    def cached_tokens(self, matched_chunks: int) -> int:
        """Prompt tokens covered by ``matched_chunks`` leading chunks, capped at ``max_cacheable``."""
        if matched_chunks <= 0:
            return 0
        return min(self.ends[matched_chunks - 1], self.max_cacheable)


class PromptHasher:
    """Digests prompts for one policy: key blocks, chunk size and sampling are its parameters.

    Note: the last digest is kept, keyed by the request object's identity, because the core
    calls ``choose`` and then ``on_dispatched`` with the same ``RoutingRequest``; the policy
    then calls :meth:`release`.
    """

    def __init__(
        self,
        *,
        prefix_blocks: int,
        chunk_blocks: int = 32,
        sample_stride: int = 16,
        algo: HashAlgo = "sha256",
        seed: str | None = None,
    ) -> None:
        self._prefix_blocks = prefix_blocks
        self._chunk_blocks = chunk_blocks
        self._stride = sample_stride
        self._algo: HashAlgo = algo
        self._seed = seed
        self._hashers: dict[int, BlockHasher] = {}
        self._keys: dict[int, OrderedDict[tuple[int, ...], bytes]] = {}  # block size -> head -> key
        self._last: tuple[RoutingRequest | None, int, PromptDigest | None] = (None, 0, None)

    def hasher(self, block_size: int) -> BlockHasher:
        """The vLLM-equal hasher for ``block_size`` (one per block size, built on first use)."""
        h = self._hashers.get(block_size)
        if h is None:
            h = self._hashers[block_size] = BlockHasher(block_size, self._algo, self._seed)
        return h

    def key(self, tokens: Sequence[int], block_size: int) -> bytes:
        """The routing key of ``tokens`` (``BlockHasher.prefix_key``), memoised on the exact head.

        The key depends only on the first ``prefix_blocks`` blocks, and requests sharing a
        prefix share them. One tuple of those tokens and a dict lookup (~3.7 µs for 128
        tokens) replace the chain's per-block tuples and LRU lookups (~6 µs); the memo compares
        the whole head, so it can never return another prefix's key. It is bounded by
        :data:`_KEY_MEMO_TOKENS` head tokens in all, least recently used out first.
        """
        memo = self._keys.get(block_size)
        if memo is None:
            memo = self._keys[block_size] = OrderedDict()
        span = self._prefix_blocks * block_size
        head = tuple(tokens[:span])
        key = memo.get(head)
        if key is not None:
            memo.move_to_end(head)
            return key
        key = memo[head] = self.hasher(block_size).prefix_key(tokens, self._prefix_blocks)
        if len(memo) > max(_KEY_MEMO_TOKENS // span, 16):
            memo.popitem(last=False)
        return key

    def release(self, req: RoutingRequest) -> None:
        """Drop the cached digest of ``req`` (call from ``on_dispatched``).

        Holding on to the request would make the next ``choose`` pay for freeing its prompt
        (~100 µs for 8k tokens) whenever the request finished first; the core holds it anyway.
        """
        if self._last[0] is req:
            self._last = (None, 0, None)

    def last(self, req: RoutingRequest) -> PromptDigest | None:
        """The digest made for ``req`` by the latest :meth:`digest` call, if that was for ``req``."""
        last_req, _, last = self._last
        return last if last_req is req else None

    def digest(self, req: RoutingRequest, block_size: int) -> PromptDigest:
        """The digest of ``req``'s prompt for engines with ``block_size``-token blocks."""
        last_req, last_bs, last = self._last
        if last_req is req and last_bs == block_size and last is not None:
            return last
        tokens = req.prompt_token_ids
        n = len(tokens)
        ends = _ends(block_size, self._chunk_blocks, n // block_size)
        prefix_blocks = self._prefix_blocks
        d = PromptDigest(
            key=self.key(tokens, block_size) if prefix_blocks else b"",
            fingerprints=chunk_fingerprints(tokens, ends, math.gcd(self._stride, block_size)),
            ends=ends,
            num_tokens=n,
            max_cacheable=max(n - 1, 0) // block_size * block_size,
        )
        self._last = (req, block_size, d)
        return d


class PrefixRecord:
    """Fingerprints of the prompts routed to one instance: a bounded LRU, what we think it caches.

    A prompt's chunks are inserted deepest first, so its shorter prefixes are the most
    recently used and evicted last, as vLLM evicts a request's tail blocks first; a match
    therefore stays a prefix of what is recorded. ``capacity`` is in tokens (the chunks'
    sizes add up); policies size it from the instance's reported KV capacity.
    """

    __slots__ = ("_lru", "capacity", "tokens")

    def __init__(self, capacity: int) -> None:
        self.capacity = max(capacity, 1)
        self.tokens = 0
        self._lru: OrderedDict[int, int] = OrderedDict()  # fingerprint -> tokens in its chunk

    def __len__(self) -> int:
        return len(self._lru)

    def match(self, fingerprints: Sequence[int]) -> int:
        """How many leading chunks of a prompt are recorded here."""
        lru = self._lru
        for i, f in enumerate(fingerprints):
            if f not in lru:
                return i
        return len(fingerprints)

    def insert(self, fingerprints: Sequence[int], ends: Sequence[int]) -> None:
        """Record a routed prompt, evicting the least recently routed chunks beyond capacity."""
        lru = self._lru
        for j in range(len(fingerprints) - 1, -1, -1):
            f = fingerprints[j]
            if f in lru:
                lru.move_to_end(f)
            else:
                size = ends[j] - (ends[j - 1] if j else 0)
                lru[f] = size
                self.tokens += size
        while self.tokens > self.capacity and lru:
            self.tokens -= lru.popitem(last=False)[1]

    def clear(self) -> None:
        self._lru.clear()
        self.tokens = 0
