"""Client side of the KV connector's control channel, and the channel's wire format.

Why a control channel at all: vLLM V1 has no public way to reach a running request's KV
blocks from outside the engine-core process (RFC vllm-project/vllm#51639 is still open).
``AsyncLLM``'s utility calls reach ``EngineCore`` methods only, not the scheduler or the
connector. So the connector (``kv_connector.py``, running inside the engine core) answers a
small request/reply protocol on a loopback ZMQ socket, and the engine adapter talks to it
through :class:`ConnectorControl`.

Wire format: one JSON object per message. A request is ``{"cmd": NAME, ...args}``, a reply is
either a result object or ``{"error": MESSAGE}``. Commands:

* ``ping`` -> ``{}``: the channel is up.
* ``list`` -> ``{"requests": [{request_id, num_computed_tokens, num_blocks, num_output_tokens}]}``.
* ``snapshot {request_id, after_tokens, min_new_blocks}`` -> ``{token_ids, kv_transfer_params}``:
  the request's full blocks, answered from the scheduler thread at its next step; the ticket
  is empty when fewer than ``min_new_blocks`` are full beyond ``after_tokens``.
* ``mark {request_id}`` / ``unmark {request_id}``: the next abort of that request suspends it.
* ``collect {request_id, timeout_s}`` -> ``{output_token_ids, kv_transfer_params, finish_reason}``:
  waits for the suspend and returns what it produced.
* ``free {request_id}``: release blocks held for a destination that will not pull them.

This module does not import vLLM: the adapter process and tests use it freely.
"""

from __future__ import annotations

import json
import random
import socket
from typing import Any

import zmq
import zmq.asyncio

from switchyard.errors import EngineDeadError, MigrationError

__all__ = ["CONTROL_COMMANDS", "ConnectorControl", "free_port"]

CONTROL_COMMANDS = frozenset({"ping", "list", "snapshot", "mark", "unmark", "collect", "free"})
"""Every command the connector answers (the contract test checks both sides agree)."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago, chosen below the kernel's ephemeral range.

    Why not bind to 0: that hands out an ephemeral port, and until the engine binds it, any
    outgoing connection on the box (Ray, gRPC, vLLM's own ZMQ) can take the same port as its
    local end. A CI run lost a NIXL side channel that way ("Address already in use"). Ports
    below the ephemeral range are only ever taken by an explicit bind. Still racy against
    another process picking the same port the same way; the ports go to processes started
    right away.
    """
    low = _ephemeral_low()
    for _ in range(64):
        port = random.randrange(_FIXED_PORT_MIN, low)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:  # all taken: any free port
        s.bind((host, 0))
        return int(s.getsockname()[1])


_FIXED_PORT_MIN = 20000


def _ephemeral_low() -> int:
    """The lowest port the kernel gives to outgoing connections (Linux; 32768 elsewhere)."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low = int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768
    return max(low, _FIXED_PORT_MIN + 1024)


def encode(message: dict[str, Any]) -> bytes:
    return json.dumps(message, separators=(",", ":")).encode()


def decode(data: bytes) -> dict[str, Any]:
    value = json.loads(data)
    if not isinstance(value, dict):
        raise ValueError(f"control message is not an object: {value!r}")
    return value


class ConnectorControl:
    """Async client of one engine's connector control channel (loopback only).

    Each call opens its own REQ socket: a timed-out REQ socket cannot be reused, and on
    loopback a connect costs well under a millisecond.
    """

    def __init__(self, port: int, *, host: str = "127.0.0.1", timeout_s: float = 10.0) -> None:
        self.address = f"tcp://{host}:{port}"
        self.timeout_s = timeout_s
        self._ctx = zmq.asyncio.Context.instance()

    async def call(self, cmd: str, *, timeout_s: float | None = None, **args: Any) -> dict[str, Any]:
        """Send one command and return its result; ``MigrationError`` on an error reply.

        A channel that does not answer within the timeout raises ``EngineDeadError``: the
        engine core (where the channel lives) is gone or wedged.
        """
        if cmd not in CONTROL_COMMANDS:
            raise ValueError(f"unknown control command {cmd!r}")
        timeout = self.timeout_s if timeout_s is None else timeout_s
        sock = self._ctx.socket(zmq.REQ)
        sock.setsockopt(zmq.LINGER, 0)
        try:
            sock.connect(self.address)
            await sock.send(encode({"cmd": cmd, **args}))
            if not await sock.poll(timeout=int(timeout * 1000)):
                raise EngineDeadError(
                    f"KV control channel {self.address} did not answer {cmd} in {timeout:g} s"
                )
            reply = decode(await sock.recv())
        finally:
            sock.close()
        if "error" in reply:
            raise MigrationError(f"{cmd}: {reply['error']}")
        return reply
