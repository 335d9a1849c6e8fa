"""``switchyard kvcache-server``: flags, their validation, JSON logs, and the signal-driven run.

Kept apart from ``switchyard/cli.py`` so the command line there only wires the subcommand in
(``add_arguments``, ``run``); importing this module is cheap (argparse and logging): the server
and its HTTP stack load only when it runs. Flags map one to one onto ``KVCacheServerConfig``
fields and are validated by it; a bad value exits with status 2 and names the flag.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import sys
from typing import Any

__all__ = ["JsonFormatter", "add_arguments", "run"]

logger = logging.getLogger("switchyard.kvcache")

# flag -> KVCacheServerConfig field (argparse dest names equal the field names)
_FLAGS = {
    "host": "--host",
    "port": "--port",
    "memory": "--memory",
    "eviction": "--eviction",
    "max_block_bytes": "--max-block-bytes",
    "max_batch_keys": "--max-batch-keys",
    "shutdown_grace_s": "--shutdown-grace-s",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The subcommand's flags. Defaults live in ``KVCacheServerConfig``, so none are set here."""
    unset = argparse.SUPPRESS
    parser.add_argument("--host", default=unset, help="listen address (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=unset, help="listen port; 0 picks one (default 9700)")
    parser.add_argument(
        "--memory",
        default=unset,
        help="KV bytes to hold, as a Kubernetes quantity (16Gi, 512Mi); required",
    )
    parser.add_argument(
        "--eviction", default=unset, help="lru (default) or lfu: which block goes first when full"
    )
    parser.add_argument("--max-block-bytes", type=int, default=unset, help="largest block (default 64 MiB)")
    parser.add_argument(
        "--max-batch-keys", type=int, default=unset, help="most keys per contains request (default 4096)"
    )
    parser.add_argument(
        "--shutdown-grace-s", type=float, default=unset, help="time open requests get on SIGTERM (default 5)"
    )
    parser.add_argument(
        "--log-format", choices=["text", "json"], default="text", help="json: one JSON object per line"
    )


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time, level, logger, message (and the exception, if any)."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S%z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def run(args: argparse.Namespace) -> int:
    """Validate the flags, serve until SIGTERM/SIGINT, shut down gracefully; 2 on a bad flag."""
    from pydantic import ValidationError

    from switchyard.errors import ConfigError
    from switchyard.kvcache.config import KVCacheServerConfig
    from switchyard.kvcache.server import KVCacheServer

    if args.log_format == "json":
        for handler in logging.getLogger().handlers:
            handler.setFormatter(JsonFormatter())
    given = {field: getattr(args, field) for field in _FLAGS if hasattr(args, field)}
    try:
        config = KVCacheServerConfig.model_validate(given)
    except ValidationError as exc:
        lines = [
            f"  {_FLAGS.get(str(err['loc'][0]), str(err['loc'][0])) if err['loc'] else 'flags'}: {err['msg']}"
            for err in exc.errors()
        ]
        print("switchyard kvcache-server: invalid flags:\n" + "\n".join(lines), file=sys.stderr)
        return 2

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, _on_signal, sig, stop)
        await KVCacheServer(config).run_until(stop)

    try:
        asyncio.run(main())
    except ConfigError as exc:
        print(f"switchyard kvcache-server: {exc.message}", file=sys.stderr)
        return 1
    return 0


def _on_signal(sig: signal.Signals, stop: asyncio.Event) -> None:
    logger.info("kvcache server received %s, shutting down", sig.name)
    stop.set()
