"""One cache directory, chosen by the environment, used by every writer."""

from __future__ import annotations

from pathlib import Path

import pytest

from switchyard.cache import cache_dir
from switchyard.config import EngineConfig
from switchyard.workers.local_cluster import engine_environment
from switchyard.workers.supervisor import PoolSpec


def test_explicit_then_xdg_then_home(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("SWITCHYARD_CACHE_DIR", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert cache_dir() == tmp_path / "home" / ".cache" / "switchyard"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))  # what pods set, under /tmp
    assert cache_dir() == tmp_path / "xdg" / "switchyard"
    monkeypatch.setenv("SWITCHYARD_CACHE_DIR", str(tmp_path / "mine"))
    assert cache_dir() == tmp_path / "mine"


def test_ray_workers_get_the_engines_caches_under_it(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The local runtime hands vLLM's compile caches to its Ray workers in the same directory
    the engines and the model builder use (it used to pick ``/tmp/switchyard`` on its own)."""
    monkeypatch.setenv("SWITCHYARD_CACHE_DIR", str(tmp_path))
    spec = PoolSpec(name="p", engine=EngineConfig(), served_model_name="m")
    env = engine_environment([spec])
    assert env["VLLM_CACHE_ROOT"] == str(tmp_path / "vllm")
    assert env["SWITCHYARD_CACHE_DIR"] == str(tmp_path)
    monkeypatch.delenv("SWITCHYARD_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    env = engine_environment([spec])
    assert env["VLLM_CACHE_ROOT"] == str(tmp_path / "xdg" / "switchyard" / "vllm")
    assert "SWITCHYARD_CACHE_DIR" not in env
