"""``switchyard`` command line: ``serve``, ``drain``, ``build-tiny-model``, ``crds``, ``operator``,
``kvcache-server``.

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
from collections.abc import Callable, Coroutine, Mapping, Sequence
from pathlib import Path
from typing import Any

from pydantic import SecretStr, ValidationError

from switchyard import event_loop
from switchyard.config import ServeConfig, read_api_key_file
from switchyard.errors import ConfigError, SwitchyardError
from switchyard.event_loop import EVENT_LOOPS, EventLoopName

logger = logging.getLogger("switchyard")

__all__ = ["main"]


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="switchyard", description=__doc__.splitlines()[0])
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    sub = parser.add_subparsers(dest="command", required=True)

    # Defaults live in the config models, not here: an option left out is absent from the
    # namespace (SUPPRESS), so --config values and model defaults apply unless a flag is given.
    serve = sub.add_parser(
        "serve",
        help="run engines, the router and the OpenAI gateway on this machine",
        argument_default=argparse.SUPPRESS,
    )
    serve.add_argument(
        "--model",
        type=Path,
        help="local Hugging Face model directory (default: build the tiny smoke-test model)",
    )
    serve.add_argument("--served-model-name", help="model name clients send")
    serve.add_argument(
        "--engine",
        choices=["vllm", "sim"],
        help="vllm (default): real inference; sim: the simulator (no inference, for scale tests)",
    )
    serve.add_argument("--sim-profile", help="simulator cost profile (with --engine sim)")
    serve.add_argument("--instances", type=int, help="engine instances (default 2)")
    serve.add_argument("--host", help="gateway (HTTP) listen address (default 127.0.0.1)")
    serve.add_argument(
        "--router-host",
        help="router gRPC listen address (default 127.0.0.1; an internal port: bind the pod or node IP, "
        "never 0.0.0.0, to reach it from elsewhere)",
    )
    serve.add_argument("--port", type=int, help="gateway port (default 8000)")
    serve.add_argument("--router-port", type=int, help="router gRPC port (default: any free)")
    serve.add_argument("--policy", help="routing policy (default dualmap)")
    serve.add_argument(
        "--slo-ttft-ms", type=float, help="TTFT objective in ms the routing policy steers by (default 2000)"
    )
    serve.add_argument("--max-model-len", type=int, help="context length per instance")
    serve.add_argument(
        "--migration",
        action="store_true",
        help="load the KV-transfer connector (NIXL) so requests can be live-migrated (drain, rebalancer)",
    )
    serve.add_argument(
        "--rebalance", action="store_true", help="run the hotspot rebalancer (needs --migration with vllm)"
    )
    serve.add_argument(
        "--api-key",
        action="append",
        help="accepted bearer key (repeatable; default: no auth); ps shows it: prefer --api-key-file "
        "or SWITCHYARD_API_KEY",
    )
    serve.add_argument(
        "--api-key-file",
        type=Path,
        help="file holding the accepted bearer keys, one per line (a mounted Secret). Also "
        "SWITCHYARD_API_KEY_FILE; give keys one way only",
    )
    serve.add_argument(
        "--internal-token-file",
        type=Path,
        help="file holding the bearer token of the router's and workers' gRPC services (default: "
        "$SWITCHYARD_INTERNAL_TOKEN, $SWITCHYARD_INTERNAL_TOKEN_FILE, else a random one); never a flag value",
    )
    serve.add_argument("--max-body-bytes", type=int, help="largest request body (413 above)")
    serve.add_argument(
        "--shutdown-grace-s",
        type=float,
        help="on SIGTERM/SIGINT, seconds open requests may finish before they end with an error (default 5)",
    )
    serve.add_argument(
        "--ray-address", help="join this Ray cluster (host:port or ray://host:10001) instead of starting one"
    )
    serve.add_argument(
        "--config",
        type=Path,
        help="a ServeConfig as JSON or YAML (pools, engine, router, gateway); flags override it",
    )
    serve.add_argument(
        "--event-loop",
        choices=list(EVENT_LOOPS),
        default="uvloop",
        help="the process's event loop: uvloop (default, less CPU per request and token) or asyncio",
    )

    drain = sub.add_parser(
        "drain",
        help="stop routing to an instance and move its requests off (gateway /admin/drain)",
    )
    drain.add_argument("instance", help="instance id (as in the membership)")
    drain.add_argument("--url", required=True, help="the gateway, e.g. http://127.0.0.1:8000")
    drain.add_argument("--api-key", default=None, help="bearer key (visible in `ps`: prefer --api-key-file)")
    drain.add_argument(
        "--api-key-file",
        type=Path,
        default=None,
        help="file whose first key is sent (default: SWITCHYARD_API_KEY_FILE, else SWITCHYARD_API_KEY)",
    )
    drain.add_argument("--timeout-s", type=float, default=60.0, help="drain deadline (default 60)")
    drain.add_argument("--undrain", action="store_true", help="route to the instance again instead")

    tiny = sub.add_parser("build-tiny-model", help="build the tiny random-weight model and print its path")
    tiny.add_argument("--cache-dir", type=Path, default=None)

    from switchyard.operator.crd import schema as crds_module

    crds = sub.add_parser("crds", help="write the CRD manifests generated from the operator's models")
    crds_module.add_arguments(crds)

    op = sub.add_parser(
        "operator", help="run the Kubernetes operator (Kopf) for Switchyard's custom resources"
    )
    op.add_argument(
        "--namespace",
        action="append",
        default=[],
        help="watch only this namespace (repeatable; default: all namespaces)",
    )
    op.add_argument("--kubeconfig", default=None, help="kubeconfig outside a cluster (default: $KUBECONFIG)")
    op.add_argument(
        "--peering", default=None, help="Kopf peering object for several replicas (default: standalone)"
    )
    op.add_argument("--liveness", default=None, help="liveness endpoint, e.g. http://0.0.0.0:8080/healthz")
    op.add_argument(
        "--autoscale-interval-s",
        type=float,
        default=argparse.SUPPRESS,
        help="seconds between two router scrapes / autoscaler decisions per LLMService (default 30)",
    )
    op.add_argument(
        "--router-url",
        default=argparse.SUPPRESS,
        help="where routers are reached, with {router} {namespace} {port} {service} placeholders "
        "(default: the in-cluster Service; a port-forward when the operator runs outside)",
    )

    from switchyard.kvcache import cli as kvcache_cli

    kvcache = sub.add_parser("kvcache-server", help="run one shard of a KVCachePool's shared KV-block store")
    kvcache_cli.add_arguments(kvcache)
    return parser


def _serve_config(args: argparse.Namespace) -> ServeConfig:
    """Merge ``--config`` (if any) with the flags given, then validate once."""
    import os

    given = vars(args)
    data: dict[str, Any] = _load_config_file(given["config"]) if "config" in given else {}

    def section(name: str, flags: dict[str, str]) -> dict[str, Any]:
        values: dict[str, Any] = dict(data.get(name, {}))
        values.update({key: given[flag] for flag, key in flags.items() if flag in given})
        return values

    engine = section(
        "engine",
        {
            "engine": "kind",
            "model": "model",
            "served_model_name": "served_model_name",
            "max_model_len": "max_model_len",
        },
    )
    if given.get("migration"):
        engine["kv_transfer"] = engine.get("kv_transfer") or {}
    if "sim_profile" in given:
        engine["sim"] = {**engine.get("sim", {}), "profile": given["sim_profile"]}
    gateway = section("gateway", {"host": "host", "port": "port", "max_body_bytes": "max_body_bytes"})
    keys = _api_key_source(given, os.environ)
    if keys is not None:
        gateway["api_keys"] = keys
    router = section(
        "router",
        {
            "policy": "policy",
            "slo_ttft_ms": "ttft_slo_ms",
            "router_port": "grpc_port",
            "router_host": "grpc_host",
        },
    )
    if given.get("rebalance"):
        router["rebalancer"] = {**router.get("rebalancer", {}), "enabled": True}
    top: dict[str, Any] = {
        flag: given[flag] for flag in ("instances", "ray_address", "shutdown_grace_s") if flag in given
    }
    top |= _internal_token_source(given, os.environ)
    return ServeConfig.model_validate({**data, **top, "engine": engine, "gateway": gateway, "router": router})


API_KEY_ENV = "SWITCHYARD_API_KEY"
"""Environment variable holding one accepted API key (router pods get it from a Secret)."""

API_KEY_FILE_ENV = "SWITCHYARD_API_KEY_FILE"
"""Environment variable naming a file of accepted API keys, one per line (a mounted Secret)."""


def _one_source(what: str, sources: Mapping[str, Callable[[], Any]]) -> Any:
    """The value of the one source given for the secret ``what`` (None if none is), read only then.

    A process-level source overrides ``--config`` (a process setting beats the shared file);
    two at once are refused rather than ranked or merged, since a silent choice between two
    secrets is how a router ends up with the wrong one, or keeps accepting a key that was
    meant to be gone.
    """
    if len(sources) > 1:
        raise ConfigError(f"{what} given more than once ({', '.join(sources)}); give one of them")
    return next(iter(sources.values()))() if sources else None


def _internal_token_source(given: dict[str, Any], environ: Mapping[str, str]) -> dict[str, Any]:
    """``internal_token``/``internal_token_file`` from the flag or the environment, if one gives it."""
    from switchyard.api.auth import TOKEN_ENV, TOKEN_FILE_ENV

    sources: dict[str, Callable[[], dict[str, Any]]] = {}
    if "internal_token_file" in given:
        sources["--internal-token-file"] = lambda: {"internal_token_file": given["internal_token_file"]}
    if environ.get(TOKEN_FILE_ENV):
        sources[TOKEN_FILE_ENV] = lambda: {"internal_token_file": Path(environ[TOKEN_FILE_ENV])}
    if environ.get(TOKEN_ENV):
        sources[TOKEN_ENV] = lambda: {"internal_token": environ[TOKEN_ENV]}
    chosen: dict[str, Any] | None = _one_source("the internal token is", sources)
    return {"internal_token": None, "internal_token_file": None, **chosen} if chosen else {}


def _api_key_source(given: dict[str, Any], environ: Mapping[str, str]) -> tuple[Any, ...] | None:
    """The gateway's API keys from a flag or the environment, if one gives them (else None).

    A key file is read here, at start-up, through the same reader as the internal token's file.
    """
    sources: dict[str, Callable[[], tuple[Any, ...]]] = {}
    if given.get("api_key"):
        sources["--api-key"] = lambda: tuple(given["api_key"])
    if "api_key_file" in given:
        sources["--api-key-file"] = lambda: read_api_key_file(given["api_key_file"])
    if environ.get(API_KEY_FILE_ENV):
        sources[API_KEY_FILE_ENV] = lambda: read_api_key_file(Path(environ[API_KEY_FILE_ENV]))
    if environ.get(API_KEY_ENV):
        sources[API_KEY_ENV] = lambda: (environ[API_KEY_ENV],)
    keys: tuple[Any, ...] | None = _one_source("API keys are", sources)
    return keys


def _load_config_file(path: Path) -> dict[str, Any]:
    """Read a JSON or YAML config file into a dict; errors name the file."""
    import json

    try:
        text = path.read_text()
    except OSError as exc:
        raise SystemExit(f"switchyard serve: cannot read --config {path}: {exc.strerror}") from exc
    try:
        if path.suffix in {".yaml", ".yml"}:
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except ValueError as exc:
        raise SystemExit(f"switchyard serve: --config {path} is not valid JSON/YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise SystemExit(f"switchyard serve: --config {path} must hold a mapping, got {type(data).__name__}")
    return data


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
    if args.command == "drain":
        return _drain(args)
    if args.command == "build-tiny-model":
        from switchyard.testing.tiny_model import build_tiny_model

        print(build_tiny_model(args.cache_dir))
        return 0
    if args.command == "crds":
        from switchyard.operator.crd.schema import run as write_crds

        return write_crds(args)
    if args.command == "operator":
        import os

        from switchyard.operator.settings import OperatorOptions

        given = vars(args)
        try:
            options = OperatorOptions(
                kubeconfig=args.kubeconfig or os.environ.get("KUBECONFIG"),
                **{k: given[k] for k in ("autoscale_interval_s", "router_url") if k in given},
            )
        except ValidationError as exc:
            parser.exit(2, f"switchyard operator: {_format_validation_error(exc)}\n")
        if args.kubeconfig:  # Kopf's own login reads it too (before `kubernetes` is imported)
            os.environ["KUBECONFIG"] = args.kubeconfig
        from switchyard.operator.run import run_operator

        return run_operator(
            namespaces=args.namespace, options=options, peering=args.peering, liveness_endpoint=args.liveness
        )
    if args.command == "kvcache-server":
        from switchyard.kvcache.cli import run as run_kvcache_server

        return run_kvcache_server(args)
    if args.command == "serve":
        try:
            config = _serve_config(args)
        except ValidationError as exc:
            parser.exit(2, f"switchyard serve: {_format_validation_error(exc)}\n")
        except ConfigError as exc:  # a secret given twice, an unreadable key file
            parser.exit(2, f"switchyard serve: {exc.message}\n")
        from switchyard.serve import run_serve

        try:
            return _run_until_signal(run_serve(config), loop=args.event_loop)
        except SwitchyardError as exc:
            print(f"switchyard serve: {exc.message}", file=sys.stderr)
            return 1
    parser.error(f"unknown command {args.command}")
    return 2


def _drain(args: argparse.Namespace) -> int:
    """POST to the gateway's admin endpoint, print its JSON; 1 if a request failed or the call did."""
    import json
    import os
    import urllib.error
    import urllib.request

    given: dict[str, Any] = {"api_key": [args.api_key]} if args.api_key else {}
    if args.api_key_file is not None:
        given["api_key_file"] = args.api_key_file
    try:  # the same sources, one at a time, as serve's keys; a client sends the first
        keys = _api_key_source(given, os.environ)
    except ConfigError as exc:
        print(f"switchyard drain: {exc.message}", file=sys.stderr)
        return 2
    key = None
    if keys:
        key = keys[0].get_secret_value() if isinstance(keys[0], SecretStr) else str(keys[0])
    body: dict[str, Any] = {"instance": args.instance}
    if not args.undrain:
        body["timeout_s"] = args.timeout_s
    path = "/admin/undrain" if args.undrain else "/admin/drain"
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    req = urllib.request.Request(
        args.url.rstrip("/") + path, data=json.dumps(body).encode(), headers=headers, method="POST"
    )
    try:
        with urllib.request.urlopen(req, timeout=args.timeout_s + 30) as resp:
            result = json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        print(f"switchyard drain: HTTP {exc.code}: {exc.read().decode(errors='replace')}", file=sys.stderr)
        return 1
    except (urllib.error.URLError, OSError, ValueError) as exc:
        print(f"switchyard drain: {args.url}: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(result, indent=2))
    return 1 if result.get("failed") else 0


def _run_until_signal(main_coro: Coroutine[Any, Any, int], *, loop: EventLoopName = "asyncio") -> int:
    """Run ``main_coro`` on ``loop``; SIGINT/SIGTERM become a cancellation it can clean up after.

    SIGTERM is how Kubernetes, systemd and ``docker stop`` stop a process, so it must mean the
    same orderly stop as Ctrl-C. The handlers live on the event loop; ``start_local_pools``
    keeps ``ray.init`` from replacing them with Ray's own (a ``sys.exit`` from wherever the
    process happens to be). Only the first signal cancels: a second one (Ctrl-C pressed again,
    a supervisor repeating SIGTERM) would cancel the shutdown itself halfway, leaving engines and
    Ray running, so it is logged and otherwise ignored; SIGKILL remains for a hard stop.
    """

    async def runner() -> int:
        task = asyncio.ensure_future(main_coro)
        loop = asyncio.get_running_loop()

        def on_signal(sig: signal.Signals) -> None:
            if task.cancelling():
                logger.warning("%s: already shutting down; SIGKILL stops at once", sig.name)
                return
            logger.info("%s: shutting down", sig.name)
            task.cancel()

        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, on_signal, sig)
        try:
            return await task
        except asyncio.CancelledError:
            return 0

    return event_loop.run(runner(), loop=loop)


if __name__ == "__main__":
    sys.exit(main())
