"""Shared fixtures. Keep this small: fixtures used by one module live in that module."""

from __future__ import annotations

from pathlib import Path

import pytest

from switchyard.testing.tiny_model import build_tiny_model


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny random-weight model (real HF dir, BPE tokenizer, ChatML), built once per session."""
    return build_tiny_model(tmp_path_factory.mktemp("switchyard-cache"))
