"""The OpenAI-compatible HTTP gateway: the front door of the data path (DESIGN §2).

It does everything that needs text, so the router core and the engines only see token IDs:
parse and validate the request, apply the chat template, tokenize once, check the prompt
against the model's context, build a :class:`RoutingRequest`, then stream the core's token
deltas back as text (incremental detokenization, stop strings, ``max_tokens``).

Decisions a reader should know:

* **One error translation point.** Every failure, from a bad body to an engine dying after
  the stream began, goes through :func:`error_payload`, which maps our error tree to
  OpenAI's ``{"error": {...}}`` with :func:`switchyard.errors.http_status`. Before the
  response starts that is an HTTP error; after, an SSE ``data: {"error": ...}`` event that
  ends the stream. Unknown exceptions become a logged 500; nothing escapes to uvicorn.
* **``max_tokens``.** Unset means "as much as fits": the context minus the prompt for chat,
  ``min(16, that)`` for completions (OpenAI's legacy default). An explicit value that does
  not fit is a 400 stating the context, the prompt tokens and the request, never a silent
  clamp, because the client asked for something we cannot give.
* **Aborts.** The engine request is aborted (``aclose()`` on the core's stream, which the
  core turns into an engine abort) when a stop string or ``max_tokens`` ends it early, and
  when the client disconnects, streaming or not. :class:`_EventStream` watches for the
  disconnect itself and always closes the body iterator; Starlette's own response leaves an
  iterator suspended mid-``send`` unclosed until garbage collection.
* **Shutdown.** :func:`stop_gateway` stops accepting, gives open requests a grace period,
  then ends the rest with a 503 or an SSE error event (aborting their engine requests), so
  uvicorn never has to cancel a handler mid-flight.
* **Auth.** Bearer keys compared in constant time over SHA-256 digests; ``/health`` and
  ``/metrics`` are exempt so probes and Prometheus need no secret. Keys are never logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from typing import Any, Protocol

import anyio
import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from switchyard.config import GatewayConfig
from switchyard.errors import (
    AuthenticationError,
    CapacityError,
    ConfigError,
    ContextLengthError,
    EngineDeadError,
    EngineRequestError,
    InvalidRequestError,
    ModelNotFoundError,
    RequestTooLargeError,
    SwitchyardError,
    http_status,
)
from switchyard.messages import EngineOutput, InstanceInfo, Membership, RoutingRequest
from switchyard.metrics import render_latest
from switchyard.router.gateway.detokenizer import OutputDecoder
from switchyard.router.gateway.schemas import (
    DONE,
    ChatCompletionRequest,
    ChunkEncoder,
    CompletionRequest,
    chat_completion_response,
    completion_response,
    parse_request,
    usage,
)
from switchyard.router.gateway.tokenizer import TokenizerAdapter

logger = logging.getLogger(__name__)

__all__ = ["RouterCoreLike", "build_gateway_app", "error_payload", "serve_gateway", "stop_gateway"]

#: Bodies larger than this are parsed in a worker thread (a 1 MiB token-ID list takes ~100 ms).
PARSE_OFFLOAD_BYTES = 64 * 1024
#: Longest wait for the core to abort a request on close; a hung core cannot hang a handler.
CLOSE_TIMEOUT_S = 10.0


class RouterCoreLike(Protocol):
    """What the gateway needs from the router core (``switchyard.router.core.RouterCore``)."""

    @property
    def ready(self) -> bool: ...
    @property
    def membership(self) -> Membership: ...
    def served_models(self) -> dict[str, InstanceInfo]: ...
    def generate(self, req: RoutingRequest) -> AsyncIterator[EngineOutput]: ...
    def recent_decisions(self) -> list[dict[str, Any]]: ...


# -- the one error translation point --------------------------------------------------------

_ERROR_CODES: tuple[tuple[type[SwitchyardError], str], ...] = (
    (ContextLengthError, "context_length_exceeded"),
    (ModelNotFoundError, "model_not_found"),
    (AuthenticationError, "invalid_api_key"),
    (RequestTooLargeError, "request_too_large"),
    (CapacityError, "capacity_exceeded"),
    (EngineDeadError, "engine_unavailable"),
)


def error_payload(exc: BaseException) -> tuple[int, dict[str, Any]]:
    """HTTP status and OpenAI error body for any exception (unknown ones become a logged 500)."""
    if isinstance(exc, SwitchyardError):
        err = exc
        if http_status(err) >= 500:
            logger.warning("request failed: %s: %s", type(err).__name__, err.message)
    else:
        logger.error("unexpected error in the gateway", exc_info=exc)
        err = EngineRequestError("internal server error")
    code = next((c for cls, c in _ERROR_CODES if isinstance(err, cls)), None)
    body = {"error": {"message": err.message, "type": err.error_type, "param": err.param, "code": code}}
    return http_status(err), body


def _error_response(exc: BaseException) -> Response:
    status, body = error_payload(exc)
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return JSONResponse(body, status_code=status, headers=headers)


def _error_event(exc: BaseException) -> bytes:
    return b"data: " + json.dumps(error_payload(exc)[1]).encode() + b"\n\n"


async def _close_stream(stream: object) -> None:
    """``aclose()`` a stream even while our task is being cancelled (client disconnect)."""
    aclose = getattr(stream, "aclose", None)
    if aclose is None:
        return
    with anyio.move_on_after(CLOSE_TIMEOUT_S, shield=True):
        try:
            await aclose()
        except Exception as exc:  # the request is over either way; log, don't mask
            logger.warning("closing a core stream failed: %r", exc)


async def _until_disconnect(
    receive: Receive, work: Callable[[], Awaitable[None]], stopping: asyncio.Event
) -> str:
    """Run ``work`` to the end unless the client disconnects or the gateway stops first.

    Returns ``"done"``, ``"disconnected"`` or ``"stopping"``; in the last two cases ``work``
    was cancelled. Starlette does not cancel a handler whose client went away, and cancels a
    streaming body only when it notices; this is how both paths notice at once.
    """
    errors: list[Exception] = []
    outcome = "disconnected"
    async with anyio.create_task_group() as tg:

        async def run() -> None:
            nonlocal outcome
            try:
                await work()
                outcome = "done"
            except Exception as exc:  # re-raised below, not as an ExceptionGroup
                errors.append(exc)
            tg.cancel_scope.cancel()

        async def watch_stopping() -> None:
            nonlocal outcome
            await stopping.wait()
            outcome = "stopping"
            tg.cancel_scope.cancel()

        tg.start_soon(run)
        tg.start_soon(watch_stopping)
        while (await receive())["type"] != "http.disconnect":
            pass
        tg.cancel_scope.cancel()
    if errors:
        raise errors[0]
    return outcome


_SHUTTING_DOWN = "the gateway is shutting down; retry the request"


class _EventStream(StreamingResponse):
    """An SSE response that notices a client disconnect at once and always closes its body.

    The body's ``finally`` closes the core stream, so closing the body aborts the engine
    request however the response ends (Starlette's own leaves a body suspended mid-``send``
    open until garbage collection). When the gateway stops, the stream ends with an error
    event instead of being cancelled under uvicorn.
    """

    def __init__(self, body: AsyncIterator[bytes], *, stopping: asyncio.Event, headers: dict[str, str]):
        super().__init__(body, media_type="text/event-stream", headers=headers)
        self._stopping = stopping

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            work = functools.partial(self.stream_response, send)
            if await _until_disconnect(receive, work, self._stopping) == "stopping":
                error = _error_event(CapacityError(_SHUTTING_DOWN))
                await send({"type": "http.response.body", "body": error, "more_body": True})
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            await _close_stream(self.body_iterator)


# -- the application ------------------------------------------------------------------------


class _Gateway:
    def __init__(
        self, core: RouterCoreLike, tokenizers: Mapping[str, TokenizerAdapter], config: GatewayConfig
    ):
        self.core, self.tokenizers, self.config = core, dict(tokenizers), config
        self._key_digests = [hashlib.sha256(k.get_secret_value().encode()).digest() for k in config.api_keys]
        self._started = int(time.time())
        self.stopping = asyncio.Event()
        """Set by :func:`stop_gateway` once the grace period is over: open requests end now."""

    def route(
        self, path: str, handler: Callable[[Request], Awaitable[Response]], method: str, *, auth: bool = True
    ) -> Route:
        async def endpoint(request: Request) -> Response:
            try:
                if auth:
                    self._authenticate(request)
                return await handler(request)
            except ClientDisconnect:  # gone while sending its body: nobody to answer
                return Response(status_code=499)
            except Exception as exc:
                return _error_response(exc)

        return Route(path, endpoint, methods=[method])

    def _authenticate(self, request: Request) -> None:
        if not self._key_digests:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise AuthenticationError("missing API key: send it as 'Authorization: Bearer <key>'")
        given = hashlib.sha256(token.strip().encode()).digest()
        ok = False
        for digest in self._key_digests:  # no early exit: the time taken does not depend on which key
            ok |= hmac.compare_digest(given, digest)
        if not ok:
            raise AuthenticationError("invalid API key")

    async def _read_body(self, request: Request) -> bytes:
        limit = self.config.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None:
            if not declared.isdigit():
                raise InvalidRequestError("invalid Content-Length header")
            if int(declared) > limit:
                raise RequestTooLargeError(f"request body is {declared} bytes; the limit is {limit} bytes")
        chunks, size = [], 0
        async for chunk in request.stream():  # counted too: chunked bodies declare no length
            size += len(chunk)
            if size > limit:
                raise RequestTooLargeError(f"request body exceeds the limit of {limit} bytes")
            chunks.append(chunk)
        return b"".join(chunks)

    def _resolve_model(self, model: str) -> tuple[TokenizerAdapter, InstanceInfo]:
        tok = self.tokenizers.get(model)
        if tok is None:
            known = ", ".join(sorted(self.tokenizers)) or "none"
            raise ModelNotFoundError(f"the model '{model}' does not exist (served: {known})", param="model")
        info = self.core.served_models().get(model)
        if info is None:
            raise CapacityError(f"no live instance serves the model '{model}' right now; retry later")
        return tok, info

    async def completions(self, request: Request) -> Response:
        return await self._generate(request, chat=False)

    async def chat_completions(self, request: Request) -> Response:
        return await self._generate(request, chat=True)

    async def _generate(self, request: Request, *, chat: bool) -> Response:
        body = await self._read_body(request)
        limit = self.config.max_stop_strings

        def parse() -> CompletionRequest | ChatCompletionRequest:
            if chat:
                return parse_request(ChatCompletionRequest, body, max_stop_strings=limit)
            return parse_request(CompletionRequest, body, max_stop_strings=limit)

        # Parsing is CPU work on the loop: a big body (a long token-ID list) parses in a thread.
        req = await asyncio.to_thread(parse) if len(body) > PARSE_OFFLOAD_BYTES else parse()
        tok, info = self._resolve_model(req.model)
        if isinstance(req, ChatCompletionRequest):
            prompt = await tok.encode_messages([m.for_template() for m in req.messages])
        else:
            if isinstance(req.prompt, str):
                prompt = await tok.encode_prompt(req.prompt)
            else:
                tok.check_token_ids(req.prompt, param="prompt")
                prompt = list(req.prompt)
        if not prompt:
            raise InvalidRequestError("the prompt is empty", param=req.prompt_param)
        sampling = req.sampling_options(len(prompt), info.max_model_len)
        request_id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        state = OutputDecoder(
            tok.decode,
            prompt_token_ids=prompt,
            stop=req.stop_strings,
            max_tokens=sampling.max_tokens,
            min_tokens=sampling.min_tokens,
        )
        stream = self.core.generate(RoutingRequest(request_id, req.model, prompt, sampling))
        created = int(time.time())
        headers = {"X-Request-Id": request_id}
        if req.stream:
            enc = ChunkEncoder(
                chat=chat,
                request_id=request_id,
                model=req.model,
                created=created,
                include_usage=req.include_usage,
            )
            headers |= {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
            return _EventStream(_events(stream, state, enc), stopping=self.stopping, headers=headers)
        parts: list[str] = []
        work = functools.partial(_collect, stream, state, parts)
        outcome = await _until_disconnect(request.receive, work, self.stopping)
        if outcome == "stopping":
            raise CapacityError(_SHUTTING_DOWN)
        if outcome == "disconnected":
            return Response(status_code=499)  # the client is gone; nobody reads this
        build = chat_completion_response if chat else completion_response
        result = build(request_id, req.model, created, "".join(parts), state.finish_reason, _usage(state))
        return JSONResponse(result, headers=headers)

    async def models(self, request: Request) -> Response:
        served = self.core.served_models()
        data = [
            {
                "id": name,
                "object": "model",
                "created": self._started,
                "owned_by": "switchyard",
                "root": name,
                "max_model_len": served[name].max_model_len,
            }
            for name in sorted(self.tokenizers)
            if name in served
        ]
        return JSONResponse({"object": "list", "data": data})

    async def health(self, request: Request) -> Response:
        membership = self.core.membership
        body: dict[str, Any] = {
            "membership_version": membership.version,
            "instances": len(membership.instances),
        }
        if self.core.ready:
            return JSONResponse({"status": "ok", **body})
        reason = "no live engine instances" if not membership.instances else "the router core is not ready"
        return JSONResponse({"status": "unavailable", "reason": reason, **body}, status_code=503)

    async def metrics(self, request: Request) -> Response:
        body, content_type = render_latest()
        return Response(body, headers={"Content-Type": content_type})

    async def debug_routing(self, request: Request) -> Response:
        body = json.dumps({"decisions": self.core.recent_decisions()}, default=str)
        return Response(body, media_type="application/json")


# -- response bodies ------------------------------------------------------------------------


def _usage(state: OutputDecoder) -> dict[str, Any]:
    return usage(state.prompt_tokens, state.completion_tokens, state.cached_tokens)


async def _events(
    stream: AsyncIterator[EngineOutput], state: OutputDecoder, enc: ChunkEncoder
) -> AsyncIterator[bytes]:
    """The SSE body: chunks as text becomes ready, the finish chunk, usage, ``[DONE]``."""
    try:
        role = enc.role()
        if role:
            yield role
        async for out in stream:
            if state.finish_reason is not None:  # output after the finished one: ignore
                break
            text = state.feed(out)
            if text:
                yield enc.delta(text)
            if state.finish_reason is not None and not out.finished:  # stop string, max_tokens
                break
        await _close_stream(stream)  # aborts the engine request if we ended it early
        if state.finish_reason is None:
            raise EngineRequestError("the engine stream ended before the request finished")
        yield enc.finish(state.finish_reason)
        if enc.include_usage:
            yield enc.usage(_usage(state))
        yield DONE
    except Exception as exc:
        yield _error_event(exc)
    finally:
        await _close_stream(stream)


async def _collect(stream: AsyncIterator[EngineOutput], state: OutputDecoder, parts: list[str]) -> None:
    """The whole completion text of a non-streamed request, into ``parts``."""
    try:
        async for out in stream:
            if state.finish_reason is not None:
                break
            parts.append(state.feed(out))
            if state.finish_reason is not None and not out.finished:
                break
    finally:
        await _close_stream(stream)
    if state.finish_reason is None:
        raise EngineRequestError("the engine stream ended before the request finished")


def build_gateway_app(
    core: RouterCoreLike, *, tokenizers: Mapping[str, TokenizerAdapter], config: GatewayConfig
) -> Starlette:
    """The gateway's ASGI app. ``tokenizers`` maps served model names to loaded tokenizers."""
    gw = _Gateway(core, tokenizers, config)

    async def http_error(request: Request, exc: Exception) -> Response:
        # Starlette's own 404 (no such route) and 405 (wrong method), in OpenAI's shape.
        status = exc.status_code if isinstance(exc, HTTPException) else 500
        message = exc.detail if isinstance(exc, HTTPException) else "internal server error"
        body = {"error": {"message": message, "type": "invalid_request_error", "param": None, "code": None}}
        return JSONResponse(body, status_code=status)

    routes = [
        gw.route("/v1/completions", gw.completions, "POST"),
        gw.route("/v1/chat/completions", gw.chat_completions, "POST"),
        gw.route("/v1/models", gw.models, "GET"),
        gw.route("/debug/routing", gw.debug_routing, "GET"),
        gw.route("/health", gw.health, "GET", auth=False),
        gw.route("/metrics", gw.metrics, "GET", auth=False),
    ]
    app = Starlette(routes=routes, exception_handlers={HTTPException: http_error})
    app.state.stopping = gw.stopping
    return app


class _Server(uvicorn.Server):  # type: ignore[misc]  # uvicorn is untyped here
    """uvicorn without its signal handlers: the process entry point (the CLI) owns signals."""

    grace_s = 5.0
    stopping: asyncio.Event | None = None

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


async def serve_gateway(
    app: Starlette, config: GatewayConfig, *, graceful_shutdown_s: float = 5.0
) -> tuple[uvicorn.Server, asyncio.Task[None], int]:
    """Start uvicorn on ``config.host:config.port`` and return once it listens.

    Returns the server, the task running it and the bound port (the real one when
    ``config.port`` is 0). Stop it with :func:`stop_gateway`, which gives open requests
    ``graceful_shutdown_s`` to finish.
    """
    # uvicorn's own timeout is only a backstop: stop_gateway ends open requests itself first.
    uv_config = uvicorn.Config(
        app,
        host=config.host,
        port=config.port,
        lifespan="off",
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=int(graceful_shutdown_s) + 5,
    )
    server = _Server(uv_config)
    server.grace_s, server.stopping = graceful_shutdown_s, getattr(app.state, "stopping", None)

    async def run() -> None:
        try:
            await server.serve()
        except SystemExit as exc:  # uvicorn exits the process on a bind failure; we must not
            raise ConfigError(f"the gateway could not listen on {config.host}:{config.port}") from exc

    task = asyncio.create_task(run(), name="switchyard-gateway")
    while not server.started:
        if task.done():
            task.result()  # raises the start-up error
            raise ConfigError("the gateway stopped during start-up")
        await asyncio.sleep(0.01)
    port = int(server.servers[0].sockets[0].getsockname()[1])
    logger.info("gateway listening on %s:%d", config.host, port)
    return server, task, port


async def stop_gateway(server: uvicorn.Server, task: asyncio.Task[None]) -> None:
    """Stop accepting, give open requests the grace period, then end them, and wait for the exit.

    Requests still open after the grace period end with a 503 (non-streamed) or an SSE error
    event (streamed), and their engine requests are aborted.
    """
    server.should_exit = True
    _, pending = await asyncio.wait({task}, timeout=getattr(server, "grace_s", 5.0))
    stopping = getattr(server, "stopping", None)
    if pending and stopping is not None:
        stopping.set()
    await task
