"""Parsing request bodies without stalling the event loop: large bodies go to a helper process.

Why a process and not a thread: pydantic-core validates JSON holding the GIL from start to
end, so a thread parsing a hostile body stalls the event loop, and every stream it serves,
as long as the parse takes. Measured on the 2-core box: a 3.9 MB body of 110,000 chat
messages took 0.3-0.9 s to parse, and in a worker thread it froze the loop for 320 ms at a
stretch; a 4 MiB token-ID list took 0.2-0.4 s. In the helper process the loop only pickles the
body and unpickles the parsed request; what makes that large (messages, token IDs) is bounded
by the parse limits and, for token IDs, the body size (a 4 MiB list unpickles in ~30 ms).

Bodies up to :data:`INLINE_PARSE_BYTES` are parsed inline: their worst case, with the list
validators failing fast, is a few milliseconds, about what the hop costs.

The helper (``parse_worker.py``) starts when the first large body arrives, so a gateway that
never sees one never starts it; that body waits for the start (about 1 s of imports on the
2-core box). It answers in order, so replies are matched to callers first in, first out. If
it dies, the requests waiting on it get a 503 and the next large body starts a new one.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import pickle
import sys
from typing import Any, TypeVar

from switchyard.errors import CapacityError, SwitchyardError
from switchyard.router.gateway.parse_worker import HEADER, encode_frame
from switchyard.router.gateway.schemas import ChatCompletionRequest, CompletionRequest, parse_request

logger = logging.getLogger(__name__)

__all__ = ["INLINE_PARSE_BYTES", "BodyParser"]

#: Bodies up to this size are parsed on the event loop. Worst case measured on the 2-core box
#: for 64 KiB: 24 ms (6,500 unknown keys, each an error record); typical bodies: under 1 ms.
INLINE_PARSE_BYTES = 64 * 1024

_HELPER_DIED = "the gateway's request parser stopped; retry the request"

_R = TypeVar("_R", CompletionRequest, ChatCompletionRequest)


class _Helper:
    """One running helper process and the callers waiting for its replies, in order."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.waiting: collections.deque[asyncio.Future[tuple[bool, Any]]] = collections.deque()
        self.alive = True
        self.reader = asyncio.get_running_loop().create_task(self._read(), name="switchyard-parse-reader")

    async def _read(self) -> None:
        stdout = self.proc.stdout
        assert stdout is not None
        try:
            while True:
                (size,) = HEADER.unpack(await stdout.readexactly(HEADER.size))
                reply = pickle.loads(await stdout.readexactly(size))
                fut = self.waiting.popleft()
                if not fut.done():  # its caller may have been cancelled (client gone)
                    fut.set_result(reply)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass  # the helper exited
        finally:
            self.alive = False
            while self.waiting:
                fut = self.waiting.popleft()
                if not fut.done():
                    fut.set_exception(CapacityError(_HELPER_DIED))

    async def ask(self, frame: bytes) -> tuple[bool, Any]:
        stdin = self.proc.stdin
        assert stdin is not None
        fut: asyncio.Future[tuple[bool, Any]] = asyncio.get_running_loop().create_future()
        self.waiting.append(fut)  # before the write: the reply cannot come first
        stdin.write(frame)
        try:
            await stdin.drain()
        except ConnectionError as exc:
            raise CapacityError(_HELPER_DIED) from exc
        return await fut

    async def close(self) -> None:
        stdin = self.proc.stdin
        if stdin is not None and not stdin.is_closing():
            stdin.close()  # the helper exits at the end of its input
        try:
            await asyncio.wait_for(self.proc.wait(), timeout=2.0)
        except TimeoutError:
            self.proc.kill()
            await self.proc.wait()
        await self.reader


class BodyParser:
    """Parses generation request bodies, large ones in a helper process. ``aclose()`` it when done."""

    def __init__(self, *, max_stop_strings: int, max_chat_messages: int) -> None:
        self.limits: dict[str, Any] = {
            "max_stop_strings": max_stop_strings,
            "max_chat_messages": max_chat_messages,
        }
        self._helper: _Helper | None = None
        self._starting: asyncio.Lock | None = None

    async def parse(self, model: type[_R], body: bytes) -> _R:
        """``body`` validated as ``model``; every failure is one ``InvalidRequestError``."""
        if len(body) <= INLINE_PARSE_BYTES:
            return parse_request(model, body, **self.limits)
        helper = await self._running_helper()
        ok, value = await helper.ask(encode_frame((model, body, self.limits)))
        if ok:
            assert isinstance(value, model)
            return value
        if isinstance(value, SwitchyardError):
            raise value
        raise RuntimeError(f"the request-parsing helper failed: {value}")  # a bug: logged as a 500

    async def _running_helper(self) -> _Helper:
        if self._starting is None:
            self._starting = asyncio.Lock()
        async with self._starting:  # concurrent first large bodies start one helper, not several
            if self._helper is None or not self._helper.alive:
                if self._helper is not None:
                    logger.warning("the request-parsing helper process exited; starting a new one")
                    await self._helper.close()
                # Our sys.path, so the helper imports this same switchyard (tests, checkouts).
                boot = (
                    f"import sys; sys.path[:] = {sys.path!r}; "
                    "from switchyard.router.gateway.parse_worker import main; main()"
                )
                proc = await asyncio.create_subprocess_exec(
                    sys.executable, "-c", boot, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE
                )
                self._helper = _Helper(proc)
            return self._helper

    async def aclose(self) -> None:
        """Stop the helper process, if one was started; a later large body starts a new one."""
        helper, self._helper = self._helper, None
        if helper is not None:
            await helper.close()
