"""``switchyard`` command line: ``serve``, ``build-tiny-model`` (and later ``operator``, ``bench``).

This is a process entry point, so it is one of the two places allowed to import Ray and to
read environment variables. Arguments are parsed into the same pydantic config models the
operator and the CRDs use; a bad value exits with status 2 and a message naming the option.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from collections.abc import Coroutine, Sequence
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from switchyard.config import EngineConfig, GatewayConfig, RouterConfig, ServeConfig, SimConfig
from switchyard.errors import SwitchyardError

logger = logging.getLogger("switchyard")

__all__ = ["main"]


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="switchyard", description=__doc__.splitlines()[0])
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run engines, the router and the OpenAI gateway on this machine")
    serve.add_argument(
        "--model",
        type=Path,
        default=None,
        help="local Hugging Face model directory (default: build the tiny smoke-test model)",
    )
    serve.add_argument("--served-model-name", default=None, help="model name clients send")
    serve.add_argument(
        "--engine",
        choices=["vllm", "sim"],
        default="vllm",
        help="vllm: real inference; sim: the simulator (no inference, for scale tests)",
    )
    serve.add_argument("--sim-profile", default=None, help="simulator cost profile (with --engine sim)")
    serve.add_argument("--instances", type=int, default=2, help="engine instances (default 2)")
    serve.add_argument("--host", default="127.0.0.1", help="gateway address (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8000, help="gateway port (default 8000)")
    serve.add_argument("--router-port", type=int, default=0, help="router gRPC port (default: any free)")
    serve.add_argument("--policy", default="least_load", help="routing policy")
    serve.add_argument("--max-model-len", type=int, default=None, help="context length per instance")
    serve.add_argument(
        "--api-key",
        action="append",
        default=[],
        help="accepted bearer key (repeatable; default: no auth). Also SWITCHYARD_API_KEY.",
    )
    serve.add_argument("--max-body-bytes", type=int, default=None, help="largest request body (413 above)")

    tiny = sub.add_parser("build-tiny-model", help="build the tiny random-weight model and print its path")
    tiny.add_argument("--cache-dir", type=Path, default=None)
    return parser


def _serve_config(args: argparse.Namespace) -> ServeConfig:
    import os

    keys = list(args.api_key)
    if os.environ.get("SWITCHYARD_API_KEY"):
        keys.append(os.environ["SWITCHYARD_API_KEY"])
    engine: dict[str, object] = {
        "kind": args.engine,
        "model": args.model,
        "served_model_name": args.served_model_name,
    }
    if args.max_model_len is not None:
        engine["max_model_len"] = args.max_model_len
    if args.sim_profile is not None:
        engine["sim"] = SimConfig(profile=args.sim_profile)
    gateway: dict[str, object] = {"host": args.host, "port": args.port, "api_keys": tuple(keys)}
    if args.max_body_bytes is not None:
        gateway["max_body_bytes"] = args.max_body_bytes
    return ServeConfig(
        instances=args.instances,
        engine=EngineConfig.model_validate(engine),
        router=RouterConfig(policy=args.policy, grpc_port=args.router_port, grpc_host=args.host),
        gateway=GatewayConfig.model_validate(gateway),
    )


def _format_validation_error(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "config"
        lines.append(f"  {loc}: {err['msg']}")
    return "invalid configuration:\n" + "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``switchyard`` console script."""
    parser = _build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if args.command == "build-tiny-model":
        from switchyard.workers.tiny_model import build_tiny_model

        print(build_tiny_model(args.cache_dir))
        return 0
    if args.command == "serve":
        try:
            config = _serve_config(args)
        except ValidationError as exc:
            parser.exit(2, f"switchyard serve: {_format_validation_error(exc)}\n")
        from switchyard.serve import run_serve

        try:
            return _run_until_signal(run_serve(config))
        except SwitchyardError as exc:
            print(f"switchyard serve: {exc.message}", file=sys.stderr)
            return 1
    parser.error(f"unknown command {args.command}")
    return 2


def _run_until_signal(main_coro: Coroutine[Any, Any, int]) -> int:
    """Run ``main_coro`` and turn SIGINT/SIGTERM into a cancellation it can clean up after."""

    async def runner() -> int:
        task = asyncio.ensure_future(main_coro)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, task.cancel)
        try:
            return await task
        except asyncio.CancelledError:
            return 0

    return asyncio.run(runner())


if __name__ == "__main__":
    sys.exit(main())
