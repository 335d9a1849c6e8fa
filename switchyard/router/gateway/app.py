"""The OpenAI-compatible HTTP gateway: the front door of the data path (DESIGN §2).

It does everything that needs text, so the router core and the engines only see token IDs:
parse and validate the request, apply the chat template, tokenize once, check the prompt
against the model's context, build a :class:`RoutingRequest`, then stream the core's token
deltas back as text (incremental detokenization, stop strings, ``max_tokens``).

Decisions a reader should know:

* **One error translation point.** Every failure, from a bad body or an unknown route to an
  engine dying after the stream began, goes through ``streaming.error_payload``, which maps
  our error tree to OpenAI's ``{"error": {...}}`` with :func:`switchyard.errors.http_status`.
  Before the response starts that is an HTTP error; after, an SSE ``data: {"error": ...}``
  event that ends the stream. Unknown exceptions become a logged 500; nothing escapes to uvicorn.
* **``max_tokens``.** Unset means "as much as fits": the context minus the prompt for chat,
  ``min(16, that)`` for completions (OpenAI's legacy default). An explicit value that does
  not fit is a 400 stating the context, the prompt tokens and the request, never a silent
  clamp, because the client asked for something we cannot give.
* **Nothing proportional to a large body runs on the event loop**, so one hostile request
  cannot freeze every open stream: large bodies are parsed in a helper process
  (``parsing.py``), chats are capped at ``max_chat_messages``, a prompt that cannot fit is
  refused by its length before tokenizing, and long prompts are tokenized in a thread that
  releases the GIL (``tokenizer.py``).
* **Aborts.** The engine request is aborted (``aclose()`` on the core's stream, which the
  core turns into an engine abort) when a stop string or ``max_tokens`` ends it early, and
  when the client disconnects, streaming or not. :class:`EventStream` watches for the
  disconnect itself and always closes the body iterator; Starlette's own response leaves an
  iterator suspended mid-``send`` unclosed until garbage collection.
* **Shutdown.** ``server.stop_gateway`` stops accepting, gives open requests a grace period,
  then ends the rest with a 503 or an SSE error event (aborting their engine requests), so
  uvicorn never has to cancel a handler mid-flight.
* **Auth.** Bearer keys compared in constant time over SHA-256 digests; ``/health`` and
  ``/metrics`` are exempt so probes and Prometheus need no secret. Keys are never logged.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import json
import logging
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any, Protocol

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from switchyard.config import GatewayConfig
from switchyard.errors import (
    AuthenticationError,
    CapacityError,
    InvalidRequestError,
    ModelNotFoundError,
    RequestTooLargeError,
)
from switchyard.messages import EngineOutput, InstanceInfo, Membership, RoutingRequest
from switchyard.metrics import render_latest
from switchyard.router.gateway import admin
from switchyard.router.gateway.detokenizer import OutputDecoder
from switchyard.router.gateway.parsing import BodyParser
from switchyard.router.gateway.responses import (
    ChunkEncoder,
    CompactJSONResponse,
    chat_completion_response,
    completion_response,
)
from switchyard.router.gateway.schemas import ChatCompletionRequest, CompletionRequest
from switchyard.router.gateway.streaming import (
    SHUTTING_DOWN,
    EventStream,
    StopSignal,
    collect,
    disconnect_future,
    error_response,
    events,
    until_disconnect,
    usage_of,
)
from switchyard.router.gateway.tokenizer import TokenizerAdapter

logger = logging.getLogger(__name__)

__all__ = ["RouterCoreLike", "build_gateway_app"]


class RouterCoreLike(Protocol):
    """What the gateway needs from the router core (``switchyard.router.core.RouterCore``)."""

    @property
    def unready_reason(self) -> str | None: ...
    @property
    def membership(self) -> Membership: ...
    def served_models(self) -> dict[str, InstanceInfo]: ...
    def generate(self, req: RoutingRequest) -> AsyncIterator[EngineOutput]: ...
    def recent_decisions(self) -> list[dict[str, Any]]: ...


# -- the application ------------------------------------------------------------------------


class _Gateway:
    def __init__(
        self, core: RouterCoreLike, tokenizers: Mapping[str, TokenizerAdapter], config: GatewayConfig
    ):
        self.core, self.tokenizers, self.config = core, dict(tokenizers), config
        self._key_digests = [hashlib.sha256(k.get_secret_value().encode()).digest() for k in config.api_keys]
        self._started = int(time.time())
        self.stopping = StopSignal()
        """Set by ``server.stop_gateway`` once the grace period is over: open requests end now."""
        self.parser = BodyParser(
            max_stop_strings=config.max_stop_strings, max_chat_messages=config.max_chat_messages
        )
        """Parses request bodies, large ones in a helper process that ``stop_gateway`` ends."""

    def endpoint(
        self, handler: Callable[[Request], Awaitable[Response]], *, auth: bool = True
    ) -> Callable[[Request], Awaitable[Response]]:
        """``handler`` behind the API-key check, with every failure answered in OpenAI's shape."""

        async def endpoint(request: Request) -> Response:
            try:
                if auth:
                    self._authenticate(request)
                return await handler(request)
            except ClientDisconnect:  # gone while sending its body: nobody to answer
                return Response(status_code=499)
            except Exception as exc:
                return error_response(exc)

        return endpoint

    def route(
        self, path: str, handler: Callable[[Request], Awaitable[Response]], method: str, *, auth: bool = True
    ) -> Route:
        return Route(path, self.endpoint(handler, auth=auth), methods=[method])

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
        req: CompletionRequest | ChatCompletionRequest
        if chat:
            req = await self.parser.parse(ChatCompletionRequest, body)
        else:
            req = await self.parser.parse(CompletionRequest, body)
        tok, info = self._resolve_model(req.model)
        if isinstance(req, ChatCompletionRequest):
            messages = [m.for_template() for m in req.messages]
            prompt = await tok.encode_messages(messages, context=info.max_model_len)
        elif isinstance(req.prompt, str):
            prompt = await tok.encode_prompt(req.prompt, context=info.max_model_len)
        else:
            tok.check_token_ids(req.prompt, param="prompt")
            prompt = list(req.prompt)
        if not prompt:
            raise InvalidRequestError("the prompt is empty", param=req.prompt_param)
        sampling = req.sampling_options(len(prompt), info.max_model_len)
        request_id = f"{'chatcmpl' if chat else 'cmpl'}-{secrets.token_hex(16)}"  # uuid4().hex: 5x the cost
        state = OutputDecoder(
            tok.detokenizer(prompt),
            num_prompt_tokens=len(prompt),
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
            return EventStream(events(stream, state, enc), stopping=self.stopping, headers=headers)
        parts: list[str] = []
        work = functools.partial(collect, stream, state, parts)
        gone = disconnect_future(request.scope)
        outcome = await until_disconnect(request.receive, work, self.stopping, gone)
        if outcome == "stopping":
            raise CapacityError(SHUTTING_DOWN)
        if outcome == "disconnected":
            return Response(status_code=499)  # the client is gone; nobody reads this
        build = chat_completion_response if chat else completion_response
        result = build(request_id, req.model, created, "".join(parts), state.finish_reason, usage_of(state))
        return CompactJSONResponse(result, headers=headers)

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
        reason = self.core.unready_reason  # all drained or none live: a readiness probe must fail
        if reason is None:
            return JSONResponse({"status": "ok", **body})
        return JSONResponse({"status": "unavailable", "reason": reason, **body}, status_code=503)

    async def metrics(self, request: Request) -> Response:
        body, content_type = render_latest()
        return Response(body, headers={"Content-Type": content_type})

    async def debug_routing(self, request: Request) -> Response:
        body = json.dumps({"decisions": self.core.recent_decisions()}, default=str)
        return Response(body, media_type="application/json")

    async def admin_drain(self, request: Request) -> Response:
        return await admin.drain(self.core, await self._read_body(request))

    async def admin_undrain(self, request: Request) -> Response:
        return await admin.undrain(self.core, await self._read_body(request))


def build_gateway_app(
    core: RouterCoreLike, *, tokenizers: Mapping[str, TokenizerAdapter], config: GatewayConfig
) -> Starlette:
    """The gateway's ASGI app. ``tokenizers`` maps served model names to loaded tokenizers."""
    gw = _Gateway(core, tokenizers, config)

    async def http_error(request: Request, exc: Exception) -> Response:
        return error_response(exc)  # Starlette's own 404 (no such route) and 405 (wrong method)

    hot = {"/v1/completions": gw.completions, "/v1/chat/completions": gw.chat_completions}
    routes = [gw.route(path, handler, "POST") for path, handler in hot.items()] + [
        gw.route("/v1/models", gw.models, "GET"),
        gw.route("/debug/routing", gw.debug_routing, "GET"),
        gw.route("/admin/drain", gw.admin_drain, "POST"),
        gw.route("/admin/undrain", gw.admin_undrain, "POST"),
        gw.route("/health", gw.health, "GET", auth=False),
        gw.route("/metrics", gw.metrics, "GET", auth=False),
    ]
    hot_routes = {path: gw.endpoint(handler) for path, handler in hot.items()}
    app = _GatewayApp(hot_routes, routes=routes, exception_handlers={HTTPException: http_error})
    app.state.stopping = gw.stopping
    app.state.body_parser = gw.parser
    return app


class _GatewayApp(Starlette):
    """Starlette with a direct path for the generation endpoints, the only per-token routes.

    Why: Starlette's router, its two exception middlewares and its request wrapper cost about
    40 µs per request on the benchmark machine, and two of them wrap ``send``, which a streamed
    response calls once per token. The generation endpoints answer every failure themselves
    (``_Gateway.endpoint``), so those layers add nothing there. Every other path, and the
    generation paths with another method (405), go through Starlette as before.
    """

    def __init__(
        self, hot_routes: Mapping[str, Callable[[Request], Awaitable[Response]]], **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        self.hot_routes = dict(hot_routes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            endpoint = self.hot_routes.get(scope["path"])
            if endpoint is not None:
                scope["app"] = self
                response = await endpoint(Request(scope, receive, send))
                await response(scope, receive, send)
                return
        await super().__call__(scope, receive, send)
