"""What the router's and the workers' gRPC servers share: options, start-up, errors leaving an RPC.

Why one module: the two services must agree on the keepalive policy, on health reporting and
on how an error becomes a status; written once per servicer, they could drift apart. It sits
in ``api``, below ``workers`` and ``router``, so both servicers can import it; the status table
itself stays in ``wire.status_for_error``.

An RPC handler guards its body with ``async with abort_on_error(context, logger, "...")``
rather than its own ``try``/``except``: the exception is logged (with its traceback only when
it becomes ``INTERNAL``, an engine failure or a bug) and the RPC ends with the status of the
one table. A context manager rather than a decorator, so a streaming handler's ``finally`` (which
releases the engine request) still runs after the abort, as it always has. A failure that ends
one request of a multiplexed stream (``Worker.Dispatch``) rather than a whole RPC goes through
:func:`failure_status`, the same logging and the same table, without ending the call.

Authentication is one server interceptor (:class:`TokenAuthInterceptor`) installed by
:func:`bind_server` when a token is given, so no servicer method can forget it: every call but
``grpc.health.v1`` must carry ``authorization: Bearer <internal token>`` (``api.auth``), or it
ends with ``UNAUTHENTICATED`` before the servicer runs. Health stays open because kubelets and
load balancers probe without credentials, and it reveals nothing but "serving".
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Any, NoReturn

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from pydantic import SecretStr

from switchyard.api import wire
from switchyard.api.auth import AUTHORIZATION_KEY
from switchyard.errors import AuthenticationError

__all__ = [
    "HEALTH_METHOD_PREFIX",
    "SERVER_OPTIONS",
    "TokenAuthInterceptor",
    "abort_on_error",
    "abort_rpc",
    "bind_server",
    "failure_status",
    "start_serving",
]

logger = logging.getLogger(__name__)

SERVER_OPTIONS: tuple[tuple[str, int], ...] = (
    # Accept keepalive pings from clients that send them every >= 5 s; routers ping workers
    # every 10 s (router/worker_client.CHANNEL_OPTIONS). Otherwise gRPC's default 5-minute
    # floor answers with GOAWAY "too_many_pings" and drops live streams.
    ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
    # One server per port: never share a port with a stale process (SO_REUSEPORT).
    ("grpc.so_reuseport", 0),
)


def failure_status(
    exc: Exception, log: logging.Logger, what: str, *args: object
) -> tuple[grpc.StatusCode, str]:
    """The status our one error table gives for ``exc``, after logging that ``what`` failed.

    ``what`` is a %-format naming the operation (``"worker RPC Abort %s"``) and ``args`` its
    values. The traceback is logged only for ``INTERNAL`` (an engine failure or a bug).
    """
    code, details = wire.status_for_error(exc)
    if code is grpc.StatusCode.INTERNAL:
        log.error(what + " failed", *args, exc_info=exc)
    else:
        log.info(what + " failed: %s", *args, exc)
    return code, details


async def abort_rpc(
    context: grpc.aio.ServicerContext, exc: Exception, log: logging.Logger, what: str, *args: object
) -> NoReturn:
    """End the RPC with the status our one error table gives for ``exc``; log ``what`` failed
    (:func:`failure_status`)."""
    code, details = failure_status(exc, log, what, *args)
    await context.abort(code, details)
    raise AssertionError("context.abort returned")  # pragma: no cover - abort always raises


class abort_on_error:
    """Async context manager: any ``Exception`` raised inside ends the RPC through :func:`abort_rpc`.

    Named in lower case like ``contextlib.suppress``, since it reads as a function call at the
    ``async with``. A plain class rather than ``contextlib.asynccontextmanager``: it is entered once per RPC,
    ``Generate`` included, and a class costs no generator. ``__aexit__`` returns ``None``, so
    nothing is swallowed: cancellation (a ``BaseException``) passes through untouched, and the
    abort itself raises. Type checkers therefore know the code after the block runs only when
    the body succeeded.
    """

    __slots__ = ("_args", "_context", "_log", "_what")

    def __init__(self, context: grpc.aio.ServicerContext, log: logging.Logger, what: str, *args: object):
        self._context, self._log, self._what, self._args = context, log, what, args

    async def __aenter__(self) -> None:
        return None

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if isinstance(exc, Exception):
            await abort_rpc(self._context, exc, self._log, self._what, *self._args)


HEALTH_METHOD_PREFIX = "/grpc.health.v1.Health/"
"""Methods every caller may use without a token: probes carry no credentials."""

_BEARER = "Bearer "


class TokenAuthInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Refuses every call without ``authorization: Bearer <token>`` with ``UNAUTHENTICATED``.

    Runs once per call (a ``Dispatch`` stream is one call), not per message, so it costs the
    hot path nothing. The comparison is constant-time (``hmac.compare_digest``), the token is
    never logged, and a refusal is logged with the caller's address and the method, so a
    misconfigured router or a probe from outside shows up in the server's log.
    """

    def __init__(self, token: SecretStr, *, role: str) -> None:
        self._expected = (_BEARER + token.get_secret_value()).encode()
        self._role = role

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        method: str = handler_call_details.method
        handler = await continuation(handler_call_details)
        if handler is None or method.startswith(HEALTH_METHOD_PREFIX):
            return handler  # unknown methods end UNIMPLEMENTED; health is open
        refusal = self._refusal(handler_call_details.invocation_metadata)
        if refusal is None:
            return handler
        return _refusing(handler, AuthenticationError(refusal), method)

    def _refusal(self, metadata: Any) -> str | None:
        """Why a call with ``metadata`` is refused (a message for the caller), or None."""
        given: str | bytes | None = None
        for key, value in metadata or ():
            if key == AUTHORIZATION_KEY:
                given = value
                break
        service = f"the {self._role} gRPC service"
        if given is None:
            return (
                f"{service} requires the internal token: send metadata "
                f"'{AUTHORIZATION_KEY}: Bearer <token>' (switchyard serve: internal_token)"
            )
        raw = given.encode() if isinstance(given, str) else given
        if not raw.startswith(_BEARER.encode()):
            return f"{service}: the '{AUTHORIZATION_KEY}' metadata must be 'Bearer <token>'"
        if not hmac.compare_digest(raw, self._expected):
            return f"{service}: wrong internal token"
        return None


def _refusing(handler: grpc.RpcMethodHandler, err: AuthenticationError, method: str) -> grpc.RpcMethodHandler:
    """A handler of ``handler``'s kind that ends the call with ``err``'s status, through the one table."""
    code, details = wire.status_for_error(err)

    async def refuse(request: object, context: grpc.aio.ServicerContext) -> None:
        logger.warning("refused %s from %s: %s", method, context.peer(), details)
        await context.abort(code, details)

    kw = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(refuse, **kw)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(refuse, **kw)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(refuse, **kw)
    return grpc.unary_unary_rpc_method_handler(refuse, **kw)


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return host == "localhost"


def bind_server(
    host: str, port: int, *, role: str, token: SecretStr | None = None
) -> tuple[grpc.aio.Server, int]:
    """A new server with :data:`SERVER_OPTIONS`, bound to ``host:port``; returns it and the bound port.

    With ``token``, every call but health checks must carry it (:class:`TokenAuthInterceptor`);
    without, the server is open, which is logged as a warning unless it binds loopback only
    (tests, a single machine). Binding comes before the servicer is added because a worker's
    identity includes its address, known only once ``port=0`` has been bound. A port that
    cannot be bound raises: current grpcio raises ``RuntimeError`` itself; older ones return
    0, turned into ``OSError``.
    """
    interceptors = [TokenAuthInterceptor(token, role=role)] if token is not None else []
    if token is None and not _is_loopback(host):
        logger.warning(
            "the %s gRPC service on %s serves WITHOUT authentication (no internal token)", role, host
        )
    server = grpc.aio.server(options=SERVER_OPTIONS, interceptors=interceptors)
    target = f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"  # IPv6
    bound: int = server.add_insecure_port(target)
    if bound == 0:
        raise OSError(f"cannot bind the {role} gRPC server to {host}:{port}")
    return server, bound


async def start_serving(server: grpc.aio.Server, service_name: str) -> None:
    """Add ``grpc_health.v1``, start ``server``, and report SERVING for ``""`` and ``service_name``.

    Call it after the servicer has been added: health says SERVING only once the server has
    started with its service in place.
    """
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    await server.start()
    for service in ("", service_name):
        await health_servicer.set(service, health_pb2.HealthCheckResponse.SERVING)
