"""Polling for a condition with a deadline: the one way tests wait for asynchronous effects."""

from __future__ import annotations

import asyncio
from collections.abc import Callable


async def eventually(check: Callable[[], bool], within_s: float = 30.0, interval_s: float = 0.05) -> None:
    """Return once ``check()`` is true; fail the test if it is still false after ``within_s``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within_s
    while not check():
        if loop.time() > deadline:
            raise AssertionError(f"condition not met within {within_s}s")
        await asyncio.sleep(interval_s)
