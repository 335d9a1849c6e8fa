"""Waiting for a supervisor that Ray restarts (tests that kill it)."""

from __future__ import annotations

import asyncio
from typing import Any

import ray

from switchyard.messages import Membership


async def membership_after_restart(supervisor: Any, before: Membership, within_s: float = 60.0) -> Membership:
    """The membership of the restarted ``supervisor``, once it answers.

    Calls fail while Ray restarts it, and one made right after ``ray.kill`` may still reach the
    old process (the kill is asynchronous); that one answers with a version not above
    ``before``'s, whereas a restarted supervisor's versions start above every earlier one.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within_s
    while loop.time() < deadline:
        try:
            membership: Membership = await supervisor.membership.remote()
        except ray.exceptions.RayActorError:
            membership = before
        if membership.version > before.version:
            return membership
        await asyncio.sleep(0.2)
    raise AssertionError(f"the supervisor did not come back within {within_s} s")
