"""Canonical CBOR (RFC 8949 §4.2.1), just the subset vLLM's ``sha256_cbor`` block hashes use.

Why our own: vLLM hashes ``(parent, tuple(tokens), None)`` through ``cbor2`` in canonical
mode when an engine runs with ``prefix_caching_hash_algo=sha256_cbor``. The router must
produce the same bytes (``prefix_hash.BlockHasher``) without importing vLLM or cbor2 on the
hot path, and these few types are all a block-hash input holds.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

__all__ = ["U64_MAX", "cbor_block", "cbor_encode"]

U64_MAX = (1 << 64) - 1
"""The largest unsigned 64-bit integer (CBOR's widest head; vLLM's external block hash width)."""


def _cbor_head(major: int, n: int) -> bytes:
    """A CBOR item head with the shortest length encoding (RFC 8949 §4.2.1, as cbor2 canonical)."""
    if n < 24:
        return bytes((major << 5 | n,))
    if n < 0x100:
        return bytes((major << 5 | 24, n))
    if n < 0x10000:
        return struct.pack(">BH", major << 5 | 25, n)
    if n < 0x1_0000_0000:
        return struct.pack(">BI", major << 5 | 26, n)
    if n <= U64_MAX:
        return struct.pack(">BQ", major << 5 | 27, n)
    raise ValueError(f"integer {n} needs a CBOR bignum, which block hashes never contain")


def cbor_encode(obj: object) -> bytes:
    """Canonical CBOR of the values in a block-hash input: bytes, str, int, None, tuple."""
    if obj is None:
        return b"\xf6"
    if isinstance(obj, bool):
        return b"\xf5" if obj else b"\xf4"
    if isinstance(obj, int):
        return _cbor_head(0, obj) if obj >= 0 else _cbor_head(1, -1 - obj)
    if isinstance(obj, bytes):
        return _cbor_head(2, len(obj)) + obj
    if isinstance(obj, str):
        raw = obj.encode("utf-8")
        return _cbor_head(3, len(raw)) + raw
    if isinstance(obj, tuple | list):
        return _cbor_head(4, len(obj)) + b"".join([cbor_encode(x) for x in obj])
    raise TypeError(f"cannot CBOR-encode {type(obj).__name__} in a block hash")


def cbor_block(parent: bytes, tokens: Sequence[int]) -> bytes:
    """``cbor_encode((parent, tuple(tokens), None))`` with the token loop inlined (the hot part)."""
    head = _cbor_head
    return b"".join(
        [
            b"\x83",
            head(2, len(parent)),
            parent,
            head(4, len(tokens)),
            *[head(0, t) if t >= 0 else head(1, -1 - t) for t in tokens],
            b"\xf6",
        ]
    )
