"""Configuration of one KV-cache server, and Kubernetes memory quantities as bytes.

Why a pydantic model: ``switchyard kvcache-server`` validates its flags through it (a bad value
exits with status 2 naming the option), tests build servers from it, and the operator renders
the same flags from a KVCachePool spec, so ``memory`` accepts exactly the quantities the CRD
accepts (``16Gi``, ``512Mi``, ``1.5G``).
"""

from __future__ import annotations

import re
from decimal import Decimal
from typing import Any

from pydantic import Field, field_validator

from switchyard.config import StrictModel
from switchyard.kvcache.store import ENTRY_OVERHEAD_BYTES, EvictionPolicy

__all__ = ["DEFAULT_PORT", "KVCacheServerConfig", "memory_bytes"]

DEFAULT_PORT = 9700
"""The port the operator renders for cache servers (``OperatorOptions.kvcache_port``)."""

_QUANTITY = re.compile(r"([0-9]+(?:\.[0-9]+)?)(Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E)?")
_FACTOR = {
    None: 1,
    "k": 10**3,
    "M": 10**6,
    "G": 10**9,
    "T": 10**12,
    "P": 10**15,
    "E": 10**18,
    "Ki": 2**10,
    "Mi": 2**20,
    "Gi": 2**30,
    "Ti": 2**40,
    "Pi": 2**50,
    "Ei": 2**60,
}


def memory_bytes(quantity: str) -> int:
    """A Kubernetes memory quantity (the CRD's pattern: no milli, no exponent) in whole bytes."""
    match = _QUANTITY.fullmatch(quantity.strip())
    if match is None:
        raise ValueError(f"not a memory quantity: {quantity!r} (examples: 16Gi, 512Mi, 1.5G, 1000000)")
    number, suffix = match.groups()
    return int(Decimal(number) * _FACTOR[suffix])


class KVCacheServerConfig(StrictModel):
    """One cache server: where it listens, how much KV it holds, what goes first, request limits."""

    host: str = "127.0.0.1"
    """Listen address; the operator renders 0.0.0.0 so the pod's Service reaches it."""

    port: int = Field(default=DEFAULT_PORT, ge=0, le=65535)
    """Listen port; 0 picks a free one (tests)."""

    memory: int = Field(gt=ENTRY_OVERHEAD_BYTES)
    """KV bytes the store may hold (payload plus per-block overhead), from a quantity such as
    ``16Gi``; the KVCachePool's ``memoryPerReplica``. The process needs headroom on top."""

    eviction: EvictionPolicy = "lru"
    """Which block goes first when the store is full: least recently or least frequently used."""

    max_block_bytes: int = Field(default=64 * 2**20, ge=1)
    """Largest block accepted (413 above it). 64 MiB: a 32-token block of a 70B model in fp16 is
    about 10 MiB, so this leaves room for larger blocks and models, not for abuse."""

    max_batch_keys: int = Field(default=4096, ge=1)
    """Most keys one contains request may ask about (413 above it): 4096 blocks of 32 tokens
    cover a 128k-token prompt."""

    shutdown_grace_s: float = Field(default=5.0, ge=0)
    """How long open requests may finish after SIGTERM before the server closes them."""

    @field_validator("memory", mode="before")
    @classmethod
    def _quantity(cls, value: Any) -> Any:
        return memory_bytes(value) if isinstance(value, str) else value
