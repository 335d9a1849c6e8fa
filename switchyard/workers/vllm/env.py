"""The process environment a vLLM engine needs, computed as data.

Why a separate, vLLM-free module: vLLM (and the Hugging Face and torch libraries under it)
reads much of its configuration from environment variables, some of them at import time and
some in the engine-core and worker processes that ``AsyncLLM`` spawns. So the variables must
be in place in the *hosting* process before ``vllm`` is imported, and they must travel with
it: a Ray actor does not inherit ad-hoc ``os.environ`` changes made by the driver, so the
supervisor passes this dict as ``runtime_env={"env_vars": vllm_env(...)}``. A plain process
(``switchyard serve``, a test) calls :func:`apply_vllm_env` first. Nothing here touches
``os.environ`` at import time, and nothing here imports ``vllm`` or ``torch``.

The values are the measured CPU recipe (``shared/research/vllm-migration.md`` §5.1, §5.7):
KV space per instance, caches kept out of the home directory, no telemetry, no hub access,
and ``spawn`` for vLLM's worker processes, because forking a process that already runs
threads (asyncio, gRPC, Ray) is unsafe.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping
from pathlib import Path

from switchyard.config import EngineConfig

__all__ = [
    "CPU_THREAD_VARS",
    "KVCACHE_SPACE_VAR",
    "apply_vllm_env",
    "cpu_thread_env",
    "cpu_threads_while_spawning",
    "restore_env",
    "vllm_env",
]

#: GiB of KV cache the CPU worker allocates, read at spawn time.
KVCACHE_SPACE_VAR = "VLLM_CPU_KVCACHE_SPACE"

#: The OpenMP settings of vLLM's CPU workers: thread count, and which cores they are pinned to.
CPU_THREAD_VARS = ("OMP_NUM_THREADS", "VLLM_CPU_OMP_THREADS_BIND")


def vllm_env(cfg: EngineConfig, *, cache_dir: Path) -> dict[str, str]:
    """Environment variables for a process that hosts one or more vLLM engines.

    ``cache_dir`` is a writable directory that survives restarts of the process (compile
    caches are reused across engine starts); vLLM's and torch's caches go in subdirectories.
    """
    return {
        # KV cache GiB of the CPU build. Unset, the worker sizes it from its memory budget;
        # VLLMEngine also passes the same value as ``kv_cache_memory_bytes``.
        KVCACHE_SPACE_VAR: str(cfg.cpu_kvcache_space_gib),
        # Without these vLLM and inductor write their caches under ~/.cache.
        "VLLM_CACHE_ROOT": str(cache_dir / "vllm"),
        "TORCHINDUCTOR_CACHE_DIR": str(cache_dir / "torchinductor"),
        # No usage telemetry from a serving fleet.
        "VLLM_NO_USAGE_STATS": "1",
        "DO_NOT_TRACK": "1",
        # Models are local directories; nothing is ever downloaded from a hub.
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        # The engine core and its workers are started with spawn, never fork.
        "VLLM_WORKER_MULTIPROC_METHOD": "spawn",
    }


def apply_vllm_env(env: Mapping[str, str], *, override: bool = True) -> dict[str, str | None]:
    """Set ``env`` in this process's environment; return the previous values for :func:`restore_env`.

    With ``override=False`` variables that are already set keep their value, so settings a
    host was given on purpose (a Ray ``runtime_env``, an operator's pod spec) win over
    defaults. Call it before importing ``vllm``: some values are read at import time.
    """
    previous: dict[str, str | None] = {}
    for key, value in env.items():
        if not override and key in os.environ:
            continue
        previous[key] = os.environ.get(key)
        os.environ[key] = value
    return previous


def restore_env(previous: Mapping[str, str | None]) -> None:
    """Undo :func:`apply_vllm_env`: put back the values it returned (unset those that were unset)."""
    for key, value in previous.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def cpu_thread_env(cfg: EngineConfig) -> dict[str, str]:
    """``cfg.cpu_threads`` as vLLM's variables: that many OpenMP threads, pinned to no core.

    Unpinned because a pinned thread cannot leave a core that something else is busy on,
    and every OpenMP barrier of the engine then waits for it. Measured on the 2-core CI
    machine with two engines (``tests/e2e/test_serve_drain.py``, the variables set by hand):
    the two tests' calls took 84 s pinned and 46 s at one unpinned thread each; with a busy
    process beside them, over 500 s pinned and 93 s unpinned.

    Empty when ``cpu_threads`` is None: vLLM's own default applies. Not part of
    :func:`vllm_env`: it is per engine, set only while the engine spawns its processes.
    """
    if cfg.cpu_threads is None:
        return {}
    return {"OMP_NUM_THREADS": str(cfg.cpu_threads), "VLLM_CPU_OMP_THREADS_BIND": "nobind"}


@contextlib.contextmanager
def cpu_threads_while_spawning(cfg: EngineConfig) -> Iterator[None]:
    """Hold :func:`cpu_thread_env` in this process's environment for a synchronous spawn only.

    The block must not await: another engine starting in the same event loop would read, and
    later restore, these values as if they were the host's.
    """
    previous = apply_vllm_env(cpu_thread_env(cfg))
    try:
        yield
    finally:
        restore_env(previous)
