"""The one directory Switchyard keeps caches in: built smoke-test models and vLLM's compile caches.

Why one function: the engines, the local Ray runtime and the model builder all write there,
and when each picked its own default, a restarted instance looked for its compile cache in a
different place than the one it was started with. The environment decides, so a read-only
image still works: pods set ``HOME`` and ``XDG_CACHE_HOME`` under their writable ``/tmp``.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["CACHE_DIR_VAR", "cache_dir"]

CACHE_DIR_VAR = "SWITCHYARD_CACHE_DIR"


def cache_dir() -> Path:
    """``$SWITCHYARD_CACHE_DIR``, else ``$XDG_CACHE_HOME/switchyard``, else ``~/.cache/switchyard``."""
    explicit = os.environ.get(CACHE_DIR_VAR)
    if explicit:
        return Path(explicit)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "switchyard"
