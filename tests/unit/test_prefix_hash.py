"""Router-side prompt hashing: vLLM-equal block hashes, chunk fingerprints and the prefix record.

The parity tests import vLLM's own ``hash_block_tokens`` and ``init_none_hash`` (the router
itself never imports vLLM) and compare block by block.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from switchyard.messages import RoutingRequest, SamplingOptions
from switchyard.router.prefix_hash import (
    DEFAULT_NONE_HASH_SEED,
    BlockHasher,
    HashAlgo,
    PrefixRecord,
    PromptHasher,
    chunk_ends,
    chunk_fingerprints,
    external_block_hash,
)

kv_cache_utils = pytest.importorskip("vllm.v1.core.kv_cache_utils")
vllm_hashing = pytest.importorskip("vllm.utils.hashing")

BLOCK = 16


def _prompts() -> list[list[int]]:
    rng = random.Random(7)
    # Token values at every CBOR/pickle integer-width boundary, plus ordinary ones.
    edges = [0, 1, 23, 24, 255, 256, 65535, 65536, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 151_000]
    return [
        [],
        [5] * 3,  # shorter than one block
        list(range(BLOCK)),  # exactly one block
        [rng.choice(edges) for _ in range(3 * BLOCK + 7)],  # partial last block
        [rng.randrange(200_000) for _ in range(10 * BLOCK)],
        [rng.randrange(200_000) for _ in range(5 * BLOCK + BLOCK - 1)],
    ]


@pytest.fixture
def vllm_none_hash(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[Any], None]]:
    """Initialise vLLM's NONE_HASH for a hash function; PYTHONHASHSEED unset unless a test sets it."""
    monkeypatch.delenv("PYTHONHASHSEED", raising=False)
    yield kv_cache_utils.init_none_hash
    kv_cache_utils.init_none_hash(vllm_hashing.sha256)


def _vllm_chain(fn: Callable[[Any], bytes], tokens: list[int], block: int) -> list[bytes]:
    out: list[bytes] = []
    parent = None
    for start in range(0, len(tokens) - block + 1, block):
        parent = kv_cache_utils.hash_block_tokens(fn, parent, tokens[start : start + block])
        out.append(parent)
    return out


@pytest.mark.parametrize("algo", ["sha256", "sha256_cbor"])
def test_block_hashes_equal_vllms_own_for_full_blocks_only(
    algo: HashAlgo, vllm_none_hash: Callable[[Any], None]
) -> None:
    """Every full block's chain hash equals vLLM's ``hash_block_tokens``; partial blocks are not hashed."""
    fn = vllm_hashing.get_hash_fn_by_name(algo)
    vllm_none_hash(fn)
    hasher = BlockHasher(BLOCK, algo)
    assert hasher.none_hash == kv_cache_utils.NONE_HASH
    for tokens in _prompts():
        expected = _vllm_chain(fn, tokens, BLOCK)
        assert hasher.block_hashes(tokens) == expected, f"{algo}, {len(tokens)} tokens"
        assert len(expected) == len(tokens) // BLOCK


@pytest.mark.parametrize("algo", ["sha256", "sha256_cbor"])
def test_pythonhashseed_seed_reproduces_vllms_none_hash(
    algo: HashAlgo, vllm_none_hash: Callable[[Any], None], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Engines run with PYTHONHASHSEED derive NONE_HASH from it; passing it as ``seed`` matches."""
    monkeypatch.setenv("PYTHONHASHSEED", "1234")
    fn = vllm_hashing.get_hash_fn_by_name(algo)
    vllm_none_hash(fn)
    tokens = _prompts()[4]
    assert BlockHasher(BLOCK, algo, seed="1234").block_hashes(tokens) == _vllm_chain(fn, tokens, BLOCK)
    assert BlockHasher(BLOCK, algo).none_hash != kv_cache_utils.NONE_HASH


def test_prefix_key_is_the_hash_of_the_kth_block_or_of_what_the_prompt_has() -> None:
    """The key is block K's chain hash; shorter prompts use their last full block, or the partial one."""
    hasher = BlockHasher(BLOCK)
    long, short, tiny = list(range(10 * BLOCK)), list(range(2 * BLOCK + 3)), [1, 2, 3]
    assert hasher.prefix_key(long, 4) == hasher.block_hashes(long)[3]
    assert hasher.prefix_key(short, 4) == hasher.block_hashes(short)[1]
    assert hasher.prefix_key(tiny, 4) == hasher.hash_block(None, tiny)
    assert hasher.prefix_key(tiny, 4) != hasher.prefix_key([1, 2, 4], 4), "short prompts still spread"
    assert hasher.prefix_key([], 4) == hasher.none_hash
    assert hasher.seed == DEFAULT_NONE_HASH_SEED


def test_external_block_hash_is_the_low_64_bits_big_endian() -> None:
    """KV events publish ``int.from_bytes(h, "big") & (2**64 - 1)``: the digest's last 8 bytes."""
    h = bytes(range(32))
    assert external_block_hash(h) == int.from_bytes(h[-8:], "big")


def test_chunk_ends_double_up_to_the_cap_then_step_by_it() -> None:
    """Chunks of 1, 2, 4, 8 blocks, then 8 more each time; only full blocks count."""
    assert chunk_ends(16, 8, 16 * 40 + 5) == [16 * b for b in (1, 2, 4, 8, 16, 24, 32, 40)]
    assert chunk_ends(16, 8, 15) == []


def test_fingerprints_are_shared_exactly_as_far_as_prefixes_are() -> None:
    """Two prompts share leading fingerprints up to the chunk where they first differ."""
    rng = random.Random(3)
    a = [rng.randrange(50_000) for _ in range(1024)]
    b = a[:600] + [t + 1 for t in a[600:]]
    ends = chunk_ends(32, 4, 1024)  # 32, 64, 128, 256, 384, 512, 640, ...
    fa, fb = chunk_fingerprints(a, ends, 1), chunk_fingerprints(b, ends, 1)
    shared = sum(1 for x, y in zip(fa, fb, strict=True) if x == y)
    assert ends[shared - 1] == 512 and ends[shared] == 640
    assert fa[shared:] != fb[shared:] and all(x != y for x, y in zip(fa[shared:], fb[shared:], strict=True))


def test_sampled_fingerprints_see_every_run_of_stride_differing_tokens() -> None:
    """With stride s, a difference spanning s consecutive tokens always changes the fingerprint."""
    base = list(range(256))
    ends = chunk_ends(32, 8, 256)
    ref = chunk_fingerprints(base, ends, 8)
    for start in range(0, 256 - 8, 5):
        changed = base[:start] + [-1] * 8 + base[start + 8 :]
        assert chunk_fingerprints(changed, ends, 8)[-1] != ref[-1], start


def test_prefix_record_matches_leading_chunks_and_evicts_tails_first() -> None:
    """Matches count leading recorded chunks; past capacity, the oldest prompt's tail goes first."""
    ends = chunk_ends(16, 4, 16 * 8)  # 16, 32, 64, 128 tokens
    old = chunk_fingerprints(list(range(128)), ends, 1)
    new = chunk_fingerprints(list(range(1000, 1128)), ends, 1)
    rec = PrefixRecord(capacity=200)
    rec.insert(old, ends)
    assert rec.match(old) == 4 and rec.tokens == 128
    rec.insert(new, ends)  # 256 tokens > 200: old's 64-token tail chunk is evicted
    assert rec.match(new) == 4
    assert rec.match(old) == 3 and rec.tokens == 192


def test_prompt_hasher_digests_a_request_once_and_caps_cacheable_tokens() -> None:
    """choose and on_dispatched share one digest; cacheable: whole blocks, never the last token."""
    hasher = PromptHasher(prefix_blocks=2, chunk_blocks=4, sample_stride=4)
    req = RoutingRequest("r", "m", list(range(4 * BLOCK)), SamplingOptions(max_tokens=1))
    d = hasher.digest(req, BLOCK)
    assert hasher.digest(req, BLOCK) is d
    assert d.key == hasher.hasher(BLOCK).block_hashes(req.prompt_token_ids)[1]
    assert d.max_cacheable == 3 * BLOCK, "vLLM always computes the last prompt token"
    assert d.cached_tokens(len(d.fingerprints)) == 3 * BLOCK and d.cached_tokens(1) == BLOCK


def test_prompt_hasher_key_memo_is_exact_and_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    """The memo is keyed on the whole head, so a hit is always that head's vLLM-equal key."""
    from switchyard.router import prefix_hash

    hasher = PromptHasher(prefix_blocks=2)
    blocks = hasher.hasher(BLOCK)
    for tokens in _prompts():
        for _ in range(2):  # miss, then hit
            assert hasher.key(tokens, BLOCK) == blocks.prefix_key(tokens, 2)
    head = list(range(2 * BLOCK))
    assert hasher.key([*head, 1, 2], BLOCK) == hasher.key(head + [3] * BLOCK, BLOCK), "tail beyond the key"
    near = [*head[:-1], 10**6]  # differs only in the head's last token
    assert hasher.key(near, BLOCK) != hasher.key(head, BLOCK) == blocks.prefix_key(head, 2)

    monkeypatch.setattr(prefix_hash, "_KEY_MEMO_TOKENS", 20 * 2 * BLOCK)
    bounded = PromptHasher(prefix_blocks=2)
    for i in range(100):
        tokens = [i] * (3 * BLOCK)
        assert bounded.key(tokens, BLOCK) == blocks.prefix_key(tokens, 2)
    assert len(bounded._keys[BLOCK]) == 20
