"""The OpenAI-compatible HTTP gateway in front of the router core.

Import the public names from here; the submodules are the implementation. The gateway does
all text handling (chat template, tokenization, detokenization, stop strings) so the core and
the engines see only token IDs. Nothing here imports vLLM, torch or Ray.
"""

from switchyard.router.gateway.app import RouterCoreLike, build_gateway_app
from switchyard.router.gateway.detokenizer import (
    DecodeStreamDetokenizer,
    Detokenizer,
    IncrementalDetokenizer,
    OutputDecoder,
    StopStringMatcher,
)
from switchyard.router.gateway.responses import ChunkEncoder
from switchyard.router.gateway.schemas import (
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    parse_request,
)
from switchyard.router.gateway.server import serve_gateway, stop_gateway
from switchyard.router.gateway.streaming import error_payload
from switchyard.router.gateway.tokenizer import TokenizerAdapter

__all__ = [
    "ChatCompletionRequest",
    "ChatMessage",
    "ChunkEncoder",
    "CompletionRequest",
    "DecodeStreamDetokenizer",
    "Detokenizer",
    "IncrementalDetokenizer",
    "OutputDecoder",
    "RouterCoreLike",
    "StopStringMatcher",
    "TokenizerAdapter",
    "build_gateway_app",
    "error_payload",
    "parse_request",
    "serve_gateway",
    "stop_gateway",
]
