"""The request-parsing helper process: its main loop, and the framing both sides use.

The gateway (``parsing.BodyParser``) starts this with ``python -c`` rather than through
``multiprocessing``: the ``spawn`` and ``forkserver`` start methods re-import the parent's
``__main__`` in the child, which breaks (or runs) any embedding script without a
``__name__ == "__main__"`` guard, and ``fork`` is unsafe in the gateway's threaded process.

Protocol: on stdin, frames ``(model, body, limits)``; on stdout, one frame per request, in
order: ``(True, request)`` or ``(False, error)``, where ``error`` is the
``InvalidRequestError`` that ``parse_request`` raised, or a string describing a bug. A frame is
an 8-byte big-endian length and a pickle; both ends are this package, never a client. The
helper exits when stdin closes, so it never outlives the gateway.
"""

from __future__ import annotations

import os
import pickle
import signal
import struct
import sys
from typing import Any, BinaryIO

__all__ = ["HEADER", "encode_frame", "main"]

#: A frame's length prefix.
HEADER = struct.Struct(">Q")


def encode_frame(obj: Any) -> bytes:
    """One frame: the length prefix and the pickle of ``obj``."""
    payload = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    return HEADER.pack(len(payload)) + payload


def _read_frame(stream: BinaryIO) -> Any:
    header = stream.read(HEADER.size)
    if len(header) < HEADER.size:
        return None  # stdin closed: the gateway is gone or stopping
    (size,) = HEADER.unpack(header)
    return pickle.loads(stream.read(size))


def main() -> None:
    """Answer parse requests until stdin closes."""
    from switchyard.errors import SwitchyardError
    from switchyard.router.gateway.schemas import parse_request

    # The gateway owns shutdown, and SIGTERM means a graceful stop for `serve` as Ctrl-C does:
    # a signal sent to the whole group (Ctrl-C, systemd's control-group kill) must not end the
    # helper under large requests still in their grace period. It exits when stdin closes.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # a stray print() from a library must not corrupt the frames
    stdin = sys.stdin.buffer
    while (frame := _read_frame(stdin)) is not None:
        model, body, limits = frame
        try:
            reply: tuple[bool, Any] = (True, parse_request(model, body, **limits))
        except SwitchyardError as exc:
            exc.__cause__ = exc.__context__ = None  # pydantic's error does not need to cross
            reply = (False, exc)
        except Exception as exc:  # a bug; the gateway logs it as one
            reply = (False, f"{type(exc).__name__}: {exc}")
        out.write(encode_frame(reply))
        out.flush()
