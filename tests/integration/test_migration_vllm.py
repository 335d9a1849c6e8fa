"""Live migration between two real vLLM CPU engines over NIXL, checked token for token.

Two engines (``a``, ``b``) serve the whole module, both with the migration connector; they
start one after the other (vLLM's start holds the event loop). Every request is greedy with
``ignore_eos``, so the uninterrupted output on ``a`` is the reference a migrated run must equal.
Block size is 32; the KV pool is cut to 96 blocks so the "destination full" test can really
fill one. The last test closes ``b`` (the fault tests run before it).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path

import pytest
import pytest_asyncio

from switchyard.config import EngineConfig, KvTransferConfig
from switchyard.messages import EngineOutput, EngineRequest, FinishReason, SamplingOptions
from switchyard.router.migration import EnginePeer, MigrationCoordinator, MigrationOutcome
from switchyard.router.movable_stream import MovableStream
from switchyard.testing.tiny_model import build_tiny_model
from switchyard.workers.vllm.engine import VLLMEngine
from switchyard.workers.vllm.env import apply_vllm_env, restore_env, vllm_env

pytestmark = [pytest.mark.vllm, pytest.mark.asyncio(loop_scope="module")]

BS = 32
PROMPT_LEN = 101
MAX_TOKENS = 120
NUM_BLOCKS = 96
_ids = iter(range(1_000_000))
TIMINGS: list[tuple[str, MigrationOutcome]] = []


def prompt(seed: int, length: int = PROMPT_LEN) -> list[int]:
    return [5 + (seed * 131 + i * 17) % 500 for i in range(length)]


def make_request(tokens: Sequence[int], max_tokens: int = MAX_TOKENS) -> EngineRequest:
    opts = SamplingOptions(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    return EngineRequest(f"mig-{next(_ids)}", list(tokens), opts)


def tokens_of(outs: Sequence[EngineOutput]) -> list[int]:
    return [t for o in outs for t in o.token_ids]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    cache = tmp_path_factory.mktemp("switchyard-cache")
    previous = apply_vllm_env(
        {**vllm_env(EngineConfig(), cache_dir=cache), "SWITCHYARD_CACHE_DIR": str(cache)}
    )
    yield build_tiny_model(cache)
    restore_env(previous)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def engines(model_dir: Path) -> AsyncIterator[tuple[VLLMEngine, VLLMEngine]]:
    cfg = EngineConfig(
        dtype="float32", max_model_len=512, max_num_seqs=8, extra_args={"num_gpu_blocks_override": NUM_BLOCKS}
    )
    started = await asyncio.gather(
        *(
            VLLMEngine.start(cfg, instance_id=i, model_dir=model_dir, kv_transfer=KvTransferConfig())
            for i in "ab"
        )
    )
    a, b = started
    yield a, b
    await asyncio.gather(a.close(), b.close())
    for name, o in TIMINGS:
        down = "-" if o.downtime_s is None else f"{o.downtime_s * 1000:.0f} ms"
        print(f"{name}: {o.status} stages={o.stages} downtime={down} total={o.total_s * 1000:.0f} ms")


@pytest.fixture(scope="module")
def reference(engines: tuple[VLLMEngine, VLLMEngine]) -> dict[int, list[int]]:
    return {}


async def ref_tokens(engine: VLLMEngine, seed: int, cache: dict[int, list[int]]) -> list[int]:
    """The uninterrupted greedy output for prompt ``seed`` (computed once per module)."""
    if seed not in cache:
        cache[seed] = tokens_of([o async for o in engine.generate(make_request(prompt(seed)))])
    return cache[seed]


async def migrate_at(
    coord: MigrationCoordinator,
    src: VLLMEngine,
    dst: VLLMEngine,
    req: EngineRequest,
    cut: int,
    *,
    after: asyncio.Event | None = None,
    done: asyncio.Event | None = None,
) -> tuple[list[int], MigrationOutcome]:
    """Stream ``req`` on ``src`` and move it to ``dst`` once ``cut`` tokens arrived.

    With ``after``, the move also waits for that event: an instance takes part in one
    migration at a time (``max_concurrent_per_instance``), so a second move that overlapped
    the first would stay on its source as ``busy``, and which one comes first depends on
    how fast each engine decodes. ``done`` is set once this move has its outcome.
    """
    stream = MovableStream(req.request_id, src.instance_id, src.generate(req))
    got: list[int] = []
    outcome: MigrationOutcome | None = None
    async for out in stream:
        got.extend(out.token_ids)
        assert out.num_prompt_tokens == len(req.prompt_token_ids)  # usage stays the client's
        if outcome is None and len(got) >= cut and (after is None or after.is_set()):
            outcome = await stream.move(
                coord, EnginePeer(src, src.instance_id), EnginePeer(dst, dst.instance_id)
            )
            if done is not None:
                done.set()
    assert outcome is not None
    return got, outcome


async def wait_idle(*engines: VLLMEngine, timeout_s: float = 40.0) -> None:
    """Every engine reports nothing running or waiting and no KV held (held blocks included)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if all(
            (e.load().num_running, e.load().num_waiting, e.load().kv_blocks_used) == (0, 0, 0)
            for e in engines
        ):
            return
        await asyncio.sleep(0.05)
    pytest.fail(f"engines still busy: {[e.load() for e in engines]}")


@pytest.mark.parametrize("cut", [10, 40, 75])
async def test_multistage_migration_mid_decode_is_token_identical(
    engines: tuple[VLLMEngine, VLLMEngine], reference: dict[int, list[int]], cut: int
) -> None:
    """A request moved a -> b after ``cut`` tokens produces exactly the uninterrupted output."""
    a, b = engines
    expected = await ref_tokens(a, 1, reference)
    got, outcome = await migrate_at(MigrationCoordinator(), a, b, make_request(prompt(1)), cut)
    TIMINGS.append((f"multistage cut={cut}", outcome))
    assert outcome.status == "moved", outcome
    assert outcome.downtime_s is not None and outcome.stages >= (1 if cut >= 40 else 0)
    assert got == expected
    await wait_idle(a, b)


class Pump:
    """Reads a stream in a task, so waiting for "no more output" never cancels the stream."""

    def __init__(self, stream: AsyncIterator[EngineOutput]) -> None:
        self.queue: asyncio.Queue[EngineOutput] = asyncio.Queue()
        self.task = asyncio.create_task(self._run(stream))

    async def _run(self, stream: AsyncIterator[EngineOutput]) -> None:
        async for out in stream:
            await self.queue.put(out)

    async def next(self, timeout_s: float = 30.0) -> EngineOutput | None:
        try:
            async with asyncio.timeout(timeout_s):
                return await self.queue.get()
        except TimeoutError:
            return None

    async def rest(self) -> list[EngineOutput]:
        await self.task
        return [self.queue.get_nowait() for _ in range(self.queue.qsize())]


async def _step_to(engine: VLLMEngine, pump: Pump, got: list[int], residue: int, limit: int) -> None:
    """Advance a paused request a step or two at a time until prompt + outputs - 1 (its
    computed tokens) is ``residue`` mod 32; an overshoot waits for the next block. Leaves the
    engine paused."""
    llm = engine.async_llm
    while (distance := (residue - (PROMPT_LEN + len(got) - 1)) % BS) != 0:
        assert len(got) < limit - 2, "ran out of tokens before landing on the boundary"
        await llm.resume_generation()
        if distance > 2:  # far away: let at least one token through
            out = await pump.next()
            assert out is not None and not out.finished
            got.extend(out.token_ids)
        await llm.pause_generation(mode="keep", clear_cache=False)
        while (out := await pump.next(0.2)) is not None:  # what was in flight when the pause landed
            got.extend(out.token_ids)


@pytest.mark.parametrize("residue", [BS - 1, 0, 1])
async def test_stop_and_copy_at_block_boundaries_is_token_identical(
    engines: tuple[VLLMEngine, VLLMEngine], reference: dict[int, list[int]], residue: int
) -> None:
    """Suspending with the source's computed tokens at a block boundary or one off it (the
    case that killed the destination in stock NIXL) continues exactly on the destination."""
    a, b = engines
    long = 250
    if -2 not in reference:
        reference[-2] = tokens_of([o async for o in a.generate(make_request(prompt(2), long))])
    expected = reference[-2]
    req = make_request(prompt(2), long)
    pump = Pump(a.generate(req))
    got: list[int] = []
    while len(got) < 2:
        out = await pump.next()
        assert out is not None
        got.extend(out.token_ids)
    await a.async_llm.pause_generation(mode="keep", clear_cache=False)
    while (out := await pump.next(0.2)) is not None:
        got.extend(out.token_ids)
    await _step_to(a, pump, got, residue, long)
    suspend = asyncio.create_task(a.suspend(req.request_id))
    await asyncio.sleep(0.05)  # the abort lands while paused; the hold publishes at the next step
    await a.async_llm.resume_generation()
    suspended = await suspend
    rest = await pump.rest()
    assert rest[-1].finish_reason is FinishReason.ABORT
    got.extend(tokens_of(rest))
    computed = len(suspended.prompt_token_ids) + len(suspended.output_token_ids) - 1
    assert computed % BS == residue and suspended.kv_transfer_params["remote_num_tokens"] == computed
    assert got == list(suspended.output_token_ids)
    tail = [o async for o in b.admit_migrated(suspended)]
    assert got + tokens_of(tail) == expected
    assert tail[0].num_cached_tokens <= PROMPT_LEN and tail[-1].finish_reason is FinishReason.LENGTH
    await wait_idle(a, b)


async def test_migration_under_concurrent_load_on_both_instances(
    engines: tuple[VLLMEngine, VLLMEngine], reference: dict[int, list[int]]
) -> None:
    """With three other requests decoding on each instance, two requests moved in opposite
    directions both equal their references, and so do the bystanders."""
    a, b = engines
    seeds = (3, 4, 5, 6, 7, 8)
    expected = {s: await ref_tokens(a, s, reference) for s in (1, 2, *seeds)}

    async def bystander(engine: VLLMEngine, seed: int) -> None:
        assert tokens_of([o async for o in engine.generate(make_request(prompt(seed)))]) == expected[seed]

    coord = MigrationCoordinator()
    background = [
        asyncio.create_task(bystander(e, s)) for e, s in zip((a, a, a, b, b, b), seeds, strict=True)
    ]
    first_moved = asyncio.Event()
    (ab, o1), (ba, o2) = await asyncio.gather(
        migrate_at(coord, a, b, make_request(prompt(1)), 30, done=first_moved),
        migrate_at(coord, b, a, make_request(prompt(2)), 50, after=first_moved),
    )
    await asyncio.gather(*background)
    TIMINGS.extend([("under load a->b", o1), ("under load b->a", o2)])
    assert (o1.status, o2.status) == ("moved", "moved")
    assert ab == expected[1] and ba == expected[2]
    await wait_idle(a, b)


async def test_full_destination_refuses_and_the_request_stays(
    engines: tuple[VLLMEngine, VLLMEngine], reference: dict[int, list[int]]
) -> None:
    """With b's KV pool nearly full, admission refuses: nothing moves and a finishes the request."""
    a, b = engines
    expected = await ref_tokens(a, 1, reference)
    fill = [b.generate(make_request(prompt(20 + i, 400), max_tokens=100)) for i in range(7)]
    await asyncio.gather(*(anext(s) for s in fill))  # 7 x 13 blocks of 96 are in use
    got, outcome = await migrate_at(MigrationCoordinator(), a, b, make_request(prompt(1)), 20)
    TIMINGS.append(("destination full", outcome))
    assert (outcome.status, outcome.reason, outcome.instance_id) == ("stayed", "destination_full", "a")
    assert got == expected
    for s in fill:
        await s.aclose()
    await wait_idle(a, b)


async def test_destination_closed_during_precopy_leaves_the_request_on_the_source(
    engines: tuple[VLLMEngine, VLLMEngine], reference: dict[int, list[int]], model_dir: Path
) -> None:
    """The destination dies while pulling a pre-copy stage: the request completes on the source.

    Runs on a third engine so the module's two stay up for the remaining test."""
    a, _ = engines
    expected = await ref_tokens(a, 1, reference)
    cfg = EngineConfig(dtype="float32", max_model_len=512, max_num_seqs=8)
    c = await VLLMEngine.start(cfg, instance_id="c", model_dir=model_dir, kv_transfer=KvTransferConfig())
    peer_c = EnginePeer(c, "c")

    class ClosingPeer:
        """Closes engine c as its first shadow pull starts."""

        instance_id = "c"
        snapshot, suspend, admit_migrated = peer_c.snapshot, peer_c.suspend, peer_c.admit_migrated
        release_suspended, current_load = peer_c.release_suspended, peer_c.current_load

        async def shadow_pull(self, snap: object) -> int:
            await c.close()
            return await peer_c.shadow_pull(snap)  # type: ignore[arg-type]

    req = make_request(prompt(1))
    stream = MovableStream(req.request_id, "a", a.generate(req))
    got: list[int] = []
    outcome = None
    async for out in stream:
        got.extend(out.token_ids)
        if outcome is None and len(got) >= 40:
            outcome = await stream.move(MigrationCoordinator(), EnginePeer(a, "a"), ClosingPeer())
    assert outcome is not None and (outcome.status, outcome.reason) == ("stayed", "precopy_failed")
    assert got == expected
    await wait_idle(a)


async def test_source_closed_after_suspend_recomputes_on_the_destination(
    engines: tuple[VLLMEngine, VLLMEngine], reference: dict[int, list[int]]
) -> None:
    """The source dies right after the suspend, before the destination pulled: the destination
    recomputes from prompt + outputs and the output is still exact. Closes engine a."""
    a, b = engines
    expected = await ref_tokens(a, 1, reference)
    peer_a = EnginePeer(a, "a")

    class DyingSource:
        """Suspends on engine a, then closes it before returning."""

        instance_id = "a"
        snapshot, admit_migrated = peer_a.snapshot, peer_a.admit_migrated
        release_suspended, current_load = peer_a.release_suspended, peer_a.current_load

        async def shadow_pull(self, snap: object) -> int:  # pragma: no cover - a is the source
            raise AssertionError

        async def suspend(self, request_id: str) -> object:
            suspended = await peer_a.suspend(request_id)
            await a.close()
            return suspended

    req = make_request(prompt(1))
    stream = MovableStream(req.request_id, "a", a.generate(req))
    got2: list[int] = []
    outcome2 = None
    async for out in stream:
        got2.extend(out.token_ids)
        if outcome2 is None and len(got2) >= 40:
            outcome2 = await stream.move(MigrationCoordinator(), DyingSource(), EnginePeer(b, "b"))  # type: ignore[arg-type]
    assert outcome2 is not None
    TIMINGS.append(("source dies after suspend", outcome2))
    assert outcome2.status in ("moved", "recomputed") and outcome2.instance_id == "b"
    assert got2 == expected
    await wait_idle(b)
