"""VLLMEngine against the real vLLM CPU engine and the tiny random-weight model.

One engine serves the whole module (starting one costs 12-30 s on a small CPU), so every
test leaves it idle: each request runs to its end or is aborted, and the tests that need an
idle engine poll ``load()`` for it. The last test closes the engine and checks that its
processes are gone. The error-table tests need no engine.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path

import psutil  # type: ignore[import-untyped]
import pytest
import pytest_asyncio
from vllm import SamplingParams
from vllm.exceptions import QueueOverflowError, VLLMValidationError
from vllm.inputs.engine import tokens_input
from vllm.sampling_params import RequestOutputKind
from vllm.v1.engine.exceptions import EngineDeadError as VLLMEngineDeadError
from vllm.v1.engine.exceptions import EngineGenerateError

from switchyard.config import EngineConfig
from switchyard.errors import (
    CapacityError,
    ContextLengthError,
    EngineDeadError,
    EngineRequestError,
    InvalidRequestError,
    SwitchyardError,
)
from switchyard.messages import EngineOutput, EngineRequest, FinishReason, SamplingOptions
from switchyard.testing.tiny_model import TINY_MODEL_NAME, build_tiny_model
from switchyard.workers.engine import Engine
from switchyard.workers.vllm.engine import VLLMEngine, translate_vllm_error
from switchyard.workers.vllm.env import CPU_THREAD_VARS, apply_vllm_env, restore_env, vllm_env

pytestmark = [pytest.mark.vllm, pytest.mark.asyncio(loop_scope="module")]

MAX_MODEL_LEN = 256
_ids = iter(range(1_000_000))


def make_request(
    tokens: Sequence[int],
    *,
    max_tokens: int = 16,
    ignore_eos: bool = False,
    stop_token_ids: tuple[int, ...] = (),
) -> EngineRequest:
    """A greedy request with a fresh id."""
    opts = SamplingOptions(
        max_tokens=max_tokens, temperature=0.0, ignore_eos=ignore_eos, stop_token_ids=stop_token_ids
    )
    return EngineRequest(request_id=f"req-{next(_ids)}", prompt_token_ids=list(tokens), sampling=opts)


def prompt(seed: int, length: int) -> list[int]:
    """A deterministic prompt inside the tiny vocabulary (ids 5..511), distinct per seed."""
    return [5 + (seed * 131 + i * 17) % 500 for i in range(length)]


def _live_children() -> list[psutil.Process]:
    """This process's running descendants, less multiprocessing's resource tracker.

    Zombies (children of earlier modules that exited and are not reaped yet) are skipped:
    they run nothing, and reading their command line raises.
    """
    live = []
    for child in psutil.Process().children(recursive=True):
        try:
            if child.status() == psutil.STATUS_ZOMBIE or "resource_tracker" in " ".join(child.cmdline()):
                continue
        except (psutil.NoSuchProcess, psutil.ZombieProcess):
            continue
        live.append(child)
    return live


async def collect(engine: VLLMEngine, req: EngineRequest) -> list[EngineOutput]:
    return [out async for out in engine.generate(req)]


def tokens_of(outputs: Sequence[EngineOutput]) -> list[int]:
    return [t for out in outputs for t in out.token_ids]


async def vllm_reference(engine: VLLMEngine, tokens: list[int], *, max_tokens: int) -> list[int]:
    """vLLM's own greedy output for the same token ids, straight from the wrapped AsyncLLM."""
    params = SamplingParams(
        max_tokens=max_tokens, temperature=0.0, ignore_eos=True, detokenize=False,
        output_kind=RequestOutputKind.FINAL_ONLY,
    )  # fmt: skip
    final = None
    async for out in engine.async_llm.generate(tokens_input(tokens), params, f"ref-{next(_ids)}"):
        final = out
    assert final is not None and final.finished
    return list(final.outputs[0].token_ids)


async def wait_idle(engine: VLLMEngine, timeout_s: float = 10.0) -> None:
    """Poll load() until the engine reports nothing running or waiting and no KV in use."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        load = engine.load()
        if load.num_running == 0 and load.num_waiting == 0 and load.kv_blocks_used == 0:
            return
        await asyncio.sleep(0.02)
    pytest.fail(f"engine still busy after {timeout_s} s: {engine.load()}")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    cache = tmp_path_factory.mktemp("switchyard-cache")
    previous = apply_vllm_env(
        {**vllm_env(EngineConfig(), cache_dir=cache), "SWITCHYARD_CACHE_DIR": str(cache)}
    )
    yield build_tiny_model(cache)
    restore_env(previous)


@pytest.fixture(scope="module")
def pids_before_engine() -> set[int]:
    """Descendants that existed before the module's engine started (earlier modules' leftovers)."""
    return {child.pid for child in _live_children()}


@pytest.fixture(scope="module")
def host_thread_env() -> dict[str, str | None]:
    """This process's OpenMP variables before the engine started (the engine must not change them)."""
    return {var: os.environ.get(var) for var in CPU_THREAD_VARS}


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def engine(
    model_dir: Path, pids_before_engine: set[int], host_thread_env: dict[str, str | None]
) -> AsyncIterator[VLLMEngine]:
    cfg = EngineConfig(dtype="float32", max_model_len=MAX_MODEL_LEN, max_num_seqs=8, cpu_threads=1)
    eng = await VLLMEngine.start(cfg, instance_id="vllm-test-0", model_dir=model_dir)
    yield eng
    await eng.close()


async def test_started_engine_reports_its_geometry_and_idle_load(engine: VLLMEngine) -> None:
    """The engine implements the protocol, reports the configured geometry and an idle KV pool."""
    assert isinstance(engine, Engine)
    assert (engine.block_size, engine.max_model_len) == (32, MAX_MODEL_LEN)
    assert engine.served_model_name == TINY_MODEL_NAME
    load = engine.load()
    assert load.instance_id == "vllm-test-0"
    # 1 GiB of KV for 2 layers x 1 KV head x 32 head dim x fp32 K+V = 64 Ki blocks of 32 tokens.
    assert load.kv_blocks_total > 60_000
    assert (load.num_running, load.num_waiting, load.kv_blocks_used) == (0, 0, 0)


async def test_an_engine_with_cpu_threads_leaves_the_hosts_openmp_settings(
    engine: VLLMEngine, pids_before_engine: set[int], host_thread_env: dict[str, str | None]
) -> None:
    """An engine with cpu_threads starts its engine core and CPU worker, and the hosting process
    keeps its own OpenMP values (another engine it starts may want others).

    What the children received cannot be read back here: vLLM renames its processes with
    setproctitle, which overwrites /proc/<pid>/environ. The engine core logs it on start
    (``VLLM_CPU_OMP_THREADS_BIND='nobind'``).
    """
    spawned = [child for child in _live_children() if child.pid not in pids_before_engine]
    assert len(spawned) >= 2, [child.cmdline() for child in spawned]  # engine core + CPU worker
    assert {var: os.environ.get(var) for var in CPU_THREAD_VARS} == host_thread_env


async def test_greedy_output_equals_vllms_own_output(engine: VLLMEngine) -> None:
    """For the same prompt ids, the adapter's greedy tokens are exactly what vLLM generates."""
    tokens = prompt(1, 40)
    expected = await vllm_reference(engine, tokens, max_tokens=24)
    outputs = await collect(engine, make_request(tokens, max_tokens=24, ignore_eos=True))
    assert tokens_of(outputs) == expected
    assert len(expected) == 24


async def test_streamed_deltas_concatenate_to_the_full_output(engine: VLLMEngine) -> None:
    """Outputs are deltas: many small ones, only the last finished, all with the prompt counts."""
    tokens = prompt(2, 20)
    outputs = await collect(engine, make_request(tokens, max_tokens=32, ignore_eos=True))
    assert len(outputs) > 1
    assert len(tokens_of(outputs)) == 32
    assert [out.finished for out in outputs] == [False] * (len(outputs) - 1) + [True]
    assert all(out.num_prompt_tokens == 20 and out.instance_id == "vllm-test-0" for out in outputs)
    assert tokens_of(outputs) == await vllm_reference(engine, tokens, max_tokens=32)


async def test_max_tokens_ends_the_stream_with_length(engine: VLLMEngine) -> None:
    """A request generates exactly max_tokens tokens and finishes with LENGTH."""
    outputs = await collect(engine, make_request(prompt(3, 10), max_tokens=5, ignore_eos=True))
    assert len(tokens_of(outputs)) == 5
    assert outputs[-1].finish_reason is FinishReason.LENGTH


async def test_stop_token_id_ends_the_stream_with_stop(engine: VLLMEngine) -> None:
    """Generation stops at the first stop token id, which is the last token, with STOP."""
    tokens = prompt(4, 12)
    free_run = await vllm_reference(engine, tokens, max_tokens=12)
    stop = free_run[3]
    expected = free_run[: free_run.index(stop) + 1]
    outputs = await collect(engine, make_request(tokens, max_tokens=12, stop_token_ids=(stop,)))
    assert tokens_of(outputs) == expected
    assert outputs[-1].finish_reason is FinishReason.STOP


async def test_abort_mid_stream_ends_with_abort_and_frees_the_engine(engine: VLLMEngine) -> None:
    """abort() ends a running stream with ABORT; the engine's running count returns to 0."""
    req = make_request(prompt(5, 16), max_tokens=200, ignore_eos=True)
    outputs: list[EngineOutput] = []
    async for out in engine.generate(req):
        outputs.append(out)
        if len(outputs) == 3:
            load = engine.load()
            assert (load.num_running, load.kv_blocks_used) == (1, 1)  # 16 + 3 tokens: one block
            assert await engine.abort(req.request_id) is True
    assert outputs[-1].finished and outputs[-1].finish_reason is FinishReason.ABORT
    assert len(tokens_of(outputs)) < 200
    await wait_idle(engine)
    assert await engine.abort(req.request_id) is False


async def test_cancelling_the_consumer_aborts_the_request(engine: VLLMEngine) -> None:
    """Cancelling the task that consumes a stream aborts the request inside vLLM."""
    req = make_request(prompt(6, 16), max_tokens=200, ignore_eos=True)
    first = asyncio.Event()

    async def consume() -> None:
        async for _ in engine.generate(req):
            first.set()

    task = asyncio.create_task(consume())
    await asyncio.wait_for(first.wait(), timeout=10)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert engine.async_llm.get_num_unfinished_requests() == 0
    await wait_idle(engine)
    assert await engine.abort(req.request_id) is False


async def test_closing_the_stream_early_aborts_the_request(engine: VLLMEngine) -> None:
    """A consumer that stops iterating and closes the stream (GeneratorExit) aborts the request."""
    req = make_request(prompt(14, 16), max_tokens=200, ignore_eos=True)
    stream = engine.generate(req)
    await anext(stream)
    await stream.aclose()
    assert engine.async_llm.get_num_unfinished_requests() == 0
    await wait_idle(engine)
    assert await engine.abort(req.request_id) is False


async def test_repeated_long_prompt_is_served_from_the_prefix_cache(engine: VLLMEngine) -> None:
    """The second run of a 100-token prompt reuses its full blocks; load() counts the hits."""
    tokens = prompt(7, 100)
    before = engine.load()
    first = await collect(engine, make_request(tokens, max_tokens=4))
    second = await collect(engine, make_request(tokens, max_tokens=4))
    assert first[0].num_cached_tokens == 0
    assert second[0].num_cached_tokens == 96  # the three full 32-token blocks
    assert all(out.num_cached_tokens == 96 for out in second)
    after = engine.load()
    assert after.prefix_cache_queries_total - before.prefix_cache_queries_total >= 200
    assert after.prefix_cache_hits_total - before.prefix_cache_hits_total >= 96
    assert 0 < after.step_time_s < 1.0
    assert after.waiting_prefill_tokens == 0


async def test_prompt_longer_than_max_model_len_is_a_context_length_error(engine: VLLMEngine) -> None:
    """A 300-token prompt against max_model_len 256 is refused, naming both lengths."""
    with pytest.raises(ContextLengthError, match=r"300 tokens.*max_model_len is 256") as info:
        await collect(engine, make_request(prompt(8, 300)))
    assert isinstance(info.value.__cause__, VLLMValidationError)


async def test_rejected_requests_leave_the_engine_serving(engine: VLLMEngine) -> None:
    """Out-of-vocabulary ids and a reused running id fail alone; the next request completes."""
    with pytest.raises(InvalidRequestError, match="out of vocabulary"):
        await collect(engine, make_request([5, 6, 100_000]))
    running = make_request(prompt(9, 8), max_tokens=50, ignore_eos=True)
    stream = engine.generate(running)
    await anext(stream)
    duplicate = EngineRequest(running.request_id, prompt(10, 8), running.sampling)
    with pytest.raises(InvalidRequestError, match="already running"):
        await collect(engine, duplicate)
    rest = [out async for out in stream]
    assert rest[-1].finish_reason is FinishReason.LENGTH
    outputs = await collect(engine, make_request(prompt(11, 8), max_tokens=3))
    assert len(tokens_of(outputs)) == 3
    await wait_idle(engine)


_CONTEXT = {"prompt_len": 10, "max_model_len": 256}


@pytest.mark.parametrize(
    ("exc", "admitted", "expected"),
    [
        (VLLMEngineDeadError(), True, EngineDeadError),
        (QueueOverflowError(), False, CapacityError),
        (VLLMValidationError("Token id 9999 is out of vocabulary"), False, InvalidRequestError),
        (ValueError("bad input"), False, InvalidRequestError),
        (ValueError("bad state"), True, EngineRequestError),
        (RuntimeError("boom"), True, EngineRequestError),
    ],
)
def test_vllm_errors_translate_through_one_table(
    exc: BaseException, admitted: bool, expected: type[SwitchyardError]
) -> None:
    """Each vLLM failure class maps to its place in Switchyard's error tree."""
    assert type(translate_vllm_error(exc, admitted=admitted, **_CONTEXT)) is expected


def test_wrapped_generate_errors_are_judged_by_their_cause() -> None:
    """AsyncLLM.generate wraps input errors in EngineGenerateError; the cause decides."""
    try:
        raise EngineGenerateError() from ValueError("prompt rejected")
    except EngineGenerateError as exc:
        assert type(translate_vllm_error(exc, admitted=False, **_CONTEXT)) is InvalidRequestError
        assert type(translate_vllm_error(exc, admitted=True, **_CONTEXT)) is EngineRequestError


def test_switchyard_errors_pass_through_unchanged() -> None:
    """Our own errors are returned as they are, never re-wrapped."""
    err = ContextLengthError("too long")
    assert translate_vllm_error(err, admitted=False, **_CONTEXT) is err


async def test_close_aborts_streams_and_stops_the_engine_processes(
    engine: VLLMEngine, pids_before_engine: set[int]
) -> None:
    """close() ends running streams with ABORT, refuses new work and leaves no child process.

    Runs last: it closes the module's engine (the fixture's close is then a no-op).
    """
    children = [child for child in _live_children() if child.pid not in pids_before_engine]
    assert children, "the engine core should run in a child process"
    req = make_request(prompt(12, 8), max_tokens=200, ignore_eos=True)
    stream = engine.generate(req)
    await anext(stream)
    await engine.close()
    rest = [out async for out in stream]
    assert rest and rest[-1].finish_reason is FinishReason.ABORT
    with pytest.raises(EngineDeadError):
        await collect(engine, make_request(prompt(13, 8)))
    _, alive = psutil.wait_procs(children, timeout=10)
    assert not alive
    await engine.close()
