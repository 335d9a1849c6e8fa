"""engine.cpu_threads: the OpenMP threads of one vLLM CPU engine, unpinned, set per engine."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from pydantic import ValidationError

from switchyard.config import EngineConfig
from switchyard.workers.vllm.env import CPU_THREAD_VARS, cpu_thread_env, cpu_threads_while_spawning, vllm_env


def test_cpu_threads_become_unpinned_openmp_settings() -> None:
    """A count sets OMP_NUM_THREADS and turns vLLM's core pinning off; None leaves vLLM's default."""
    assert cpu_thread_env(EngineConfig(cpu_threads=3)) == {
        "OMP_NUM_THREADS": "3",
        "VLLM_CPU_OMP_THREADS_BIND": "nobind",
    }
    assert cpu_thread_env(EngineConfig()) == {}
    assert set(cpu_thread_env(EngineConfig(cpu_threads=1))) == set(CPU_THREAD_VARS)


def test_the_process_wide_environment_does_not_carry_them(tmp_path: Path) -> None:
    """Two engines in one process may want different counts: the setting is applied per spawn."""
    process_env = vllm_env(EngineConfig(cpu_threads=3), cache_dir=tmp_path)
    assert not set(CPU_THREAD_VARS) & set(process_env)


@pytest.mark.parametrize("bad", [0, -1, 2000])
def test_bad_cpu_threads_are_rejected_naming_the_field(bad: int) -> None:
    with pytest.raises(ValidationError, match="cpu_threads"):
        EngineConfig(cpu_threads=bad)


def test_the_spawn_scope_restores_the_hosts_values_even_when_the_spawn_fails(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Inside the scope the engine's values hold; after it, exactly the host's again (set or unset)."""
    monkeypatch.setenv("OMP_NUM_THREADS", "7")
    monkeypatch.delenv("VLLM_CPU_OMP_THREADS_BIND", raising=False)
    with pytest.raises(RuntimeError), cpu_threads_while_spawning(EngineConfig(cpu_threads=2)):
        assert (os.environ["OMP_NUM_THREADS"], os.environ["VLLM_CPU_OMP_THREADS_BIND"]) == ("2", "nobind")
        raise RuntimeError("spawn failed")
    assert os.environ["OMP_NUM_THREADS"] == "7" and "VLLM_CPU_OMP_THREADS_BIND" not in os.environ
