"""Closing a stream that may or may not be closable: the one ``aclose`` helper.

Why it matters: Switchyard's output streams are async iterators, and for the ones that are
async generators, ``aclose()`` is what runs their ``finally`` now rather than whenever the
garbage collector gets to them; in the engines and the router core that ``finally`` is the
request's abort. Callers type their streams as ``AsyncIterator`` (a test's plain iterator is a
fine stream), so they cannot call ``aclose()`` unconditionally; this does it where it exists.
"""

from __future__ import annotations

__all__ = ["aclose"]


async def aclose(stream: object) -> None:
    """``await stream.aclose()`` if ``stream`` has one; a no-op for anything else (a plain
    iterator, or ``None`` for a stream that was never opened).

    On an async generator that has already ended this is a no-op too (Python's own rule), so
    callers may close unconditionally in a ``finally``.
    """
    close = getattr(stream, "aclose", None)
    if close is not None:
        await close()
