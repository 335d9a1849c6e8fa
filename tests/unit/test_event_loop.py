"""``switchyard.event_loop``: the process's loop is chosen by name, and a missing uvloop is a
clear configuration error, not an ImportError from deep inside start-up."""

from __future__ import annotations

import asyncio
import builtins
from typing import Any

import pytest

from switchyard import event_loop
from switchyard.cli import _build_parser
from switchyard.errors import ConfigError


async def _loop_type() -> str:
    await asyncio.sleep(0)
    return type(asyncio.get_running_loop()).__module__


@pytest.mark.parametrize(("name", "module"), [("uvloop", "uvloop"), ("asyncio", "asyncio.unix_events")])
def test_run_uses_the_named_loop(name: event_loop.EventLoopName, module: str) -> None:
    assert event_loop.run(_loop_type(), loop=name) == module


def test_missing_uvloop_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    real_import = builtins.__import__

    def no_uvloop(name: str, *args: Any, **kwargs: Any) -> Any:
        if name == "uvloop":
            raise ImportError("No module named 'uvloop'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_uvloop)
    coro = _loop_type()
    with pytest.raises(ConfigError, match="'uvloop' is not installed here; use 'asyncio'"):
        event_loop.run(coro, loop="uvloop")
    assert coro.cr_frame is None  # closed, so no "never awaited" warning


def test_serve_runs_on_uvloop_unless_told_otherwise(capsys: pytest.CaptureFixture[str]) -> None:
    parser = _build_parser()
    assert parser.parse_args(["serve"]).event_loop == "uvloop"
    assert parser.parse_args(["serve", "--event-loop", "asyncio"]).event_loop == "asyncio"
    with pytest.raises(SystemExit) as exc:
        parser.parse_args(["serve", "--event-loop", "trio"])
    assert exc.value.code == 2 and "invalid choice: 'trio'" in capsys.readouterr().err
