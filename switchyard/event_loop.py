"""Which asyncio event loop a Switchyard process runs on, and running a coroutine on it.

Why a choice at all: the gateway process forwards every token of every stream, and most of
its CPU per token is event-loop machinery (callbacks, futures, socket writes). uvloop's loop,
written in Cython over libuv, does that machinery with less CPU; measured in the router-overhead
benchmark's gateway process on the 2-core CI machine, about 15 % less CPU per request and per
streamed token. The standard loop stays one option away (``--event-loop asyncio``) for
debugging and for platforms without uvloop.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any, Literal, TypeVar

from switchyard.errors import ConfigError

__all__ = ["EVENT_LOOPS", "EventLoopName", "loop_factory", "run"]

EventLoopName = Literal["uvloop", "asyncio"]
EVENT_LOOPS: tuple[EventLoopName, ...] = ("uvloop", "asyncio")

T = TypeVar("T")


def loop_factory(name: EventLoopName) -> Callable[[], asyncio.AbstractEventLoop]:
    """A constructor of the named loop; ``ConfigError`` when uvloop is asked for but missing."""
    if name == "asyncio":
        return asyncio.new_event_loop
    try:
        import uvloop
    except ImportError as exc:  # uvloop has no Windows build
        raise ConfigError("event loop 'uvloop' is not installed here; use 'asyncio'") from exc
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


def run(main: Coroutine[Any, Any, T], *, loop: EventLoopName = "uvloop") -> T:
    """``asyncio.run`` on the named event loop."""
    try:
        factory = loop_factory(loop)
    except ConfigError:
        main.close()  # never awaited: close it so Python does not warn
        raise
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(main)
