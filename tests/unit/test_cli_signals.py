"""`serve`'s signal handling: SIGTERM and SIGINT cancel the main coroutine once, so it can stop in order.

Real signals, sent to this process while the handler runs on the event loop (as `serve` does).
"""

from __future__ import annotations

import asyncio
import os
import signal

import pytest

from switchyard.cli import _run_until_signal
from switchyard.event_loop import EVENT_LOOPS, EventLoopName


@pytest.mark.parametrize("loop", EVENT_LOOPS)
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=lambda s: s.name)
def test_a_signal_cancels_once_and_a_second_one_does_not_cut_the_shutdown(
    loop: EventLoopName, sig: signal.Signals
) -> None:
    """The first signal cancels; one arriving during the clean-up (Ctrl-C pressed twice, a
    process manager repeating SIGTERM) must not cancel the clean-up itself, which would leave
    engines and Ray running. The exit status of an orderly stop is 0."""
    steps: list[str] = []

    async def main() -> int:
        asyncio.get_running_loop().call_later(0.05, os.kill, os.getpid(), sig)
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            steps.append("cancelled")
            os.kill(os.getpid(), sig)  # the second signal, while stopping
            await asyncio.sleep(0.2)  # the stop's own awaits (gateway grace, engines) go on
            steps.append("stopped")
            raise
        return 1

    assert _run_until_signal(main(), loop=loop) == 0
    assert steps == ["cancelled", "stopped"]
