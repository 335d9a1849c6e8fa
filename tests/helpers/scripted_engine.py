"""A scripted ``Engine`` for tests: replays token sequences, counts what runs, honours aborts.

Like vLLM's ``MockEngineCore`` and Ray Serve's ``FakeRunningReplica``: it implements the real
protocol, and each test scripts it. By default it "decodes" deterministically, each new token
being the previous context token plus one (prompt ``[5, 6, 7]`` yields ``8, 9, 10, ...``), so a
request resubmitted as prompt + tokens so far continues exactly where it stopped, the way
greedy decoding on a real engine does. Pass ``tokens`` to replay a fixed list instead.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence

from switchyard.errors import EngineDeadError, InvalidRequestError
from switchyard.messages import EngineOutput, EngineRequest, FinishReason, LoadReport

__all__ = ["ScriptedEngine"]


class ScriptedEngine:
    """An ``Engine`` that emits one token per ``delay_s`` from a script."""

    def __init__(
        self,
        instance_id: str = "scripted",
        *,
        tokens: Sequence[int] | None = None,
        delay_s: float = 0.005,
        block_size: int = 32,
        max_model_len: int = 4096,
        num_cached_tokens: int = 0,
    ) -> None:
        self.instance_id = instance_id
        self._tokens = tuple(tokens) if tokens is not None else None
        self.delay_s = delay_s
        self._block_size = block_size
        self._max_model_len = max_model_len
        self._num_cached_tokens = num_cached_tokens
        self.running = 0
        """Requests currently inside ``generate``."""
        self.requests: list[EngineRequest] = []
        """Every request received, in order."""
        self.aborted: list[str] = []
        """Ids of requests that ended by abort, cancellation or a closed stream."""
        self.finished: list[str] = []
        """Ids of requests that ran to their end."""
        self.dead = False
        """Set to make every later call fail with ``EngineDeadError``."""
        self._abort_flags: dict[str, asyncio.Event] = {}

    @property
    def block_size(self) -> int:
        return self._block_size

    @property
    def max_model_len(self) -> int:
        return self._max_model_len

    def script(self, req: EngineRequest) -> list[int]:
        """The tokens ``req`` would produce if nothing stopped it early."""
        n = req.sampling.max_tokens
        if self._tokens is not None:
            return list(self._tokens[:n])
        last = req.prompt_token_ids[-1] if req.prompt_token_ids else 0
        return [last + 1 + i for i in range(n)]

    async def generate(self, req: EngineRequest) -> AsyncIterator[EngineOutput]:
        if self.dead:
            raise EngineDeadError(f"{self.instance_id} is dead")
        if not req.prompt_token_ids:
            raise InvalidRequestError("empty prompt")
        self.requests.append(req)
        abort_flag = self._abort_flags[req.request_id] = asyncio.Event()
        self.running += 1
        script = self.script(req)
        stops = set(req.sampling.stop_token_ids)
        n_prompt, n_cached = len(req.prompt_token_ids), self._num_cached_tokens
        ended = False
        try:
            for i, token in enumerate(script):
                await asyncio.sleep(self.delay_s)
                if abort_flag.is_set():
                    ended = True
                    self.aborted.append(req.request_id)
                    yield EngineOutput(req.request_id, [], True, FinishReason.ABORT, n_prompt, n_cached)
                    return
                last = i == len(script) - 1
                stop = token in stops and i + 1 >= req.sampling.min_tokens
                if last or stop:
                    ended = True
                    self.finished.append(req.request_id)
                    reason = FinishReason.STOP if stop or self._tokens is not None else FinishReason.LENGTH
                    yield EngineOutput(req.request_id, [token], True, reason, n_prompt, n_cached)
                    return
                yield EngineOutput(req.request_id, [token], False, None, n_prompt, n_cached)
            ended = True
            self.finished.append(req.request_id)
            yield EngineOutput(req.request_id, [], True, FinishReason.LENGTH, n_prompt, n_cached)
        finally:
            # Reached by aclose() (GeneratorExit) or cancellation too: that is an abort.
            if not ended:
                self.aborted.append(req.request_id)
            self.running -= 1
            self._abort_flags.pop(req.request_id, None)

    async def abort(self, request_id: str) -> bool:
        flag = self._abort_flags.get(request_id)
        if flag is None:
            return False
        flag.set()
        return True

    def load(self) -> LoadReport:
        return LoadReport(
            instance_id=self.instance_id,
            timestamp=time.monotonic(),
            num_running=self.running,
            kv_blocks_used=self.running,
            kv_blocks_total=100,
            step_time_s=self.delay_s,
        )

    async def check_health(self) -> None:
        return None

    async def close(self) -> None:
        for flag in self._abort_flags.values():
            flag.set()
