"""Live migration in the simulator: the coordinator's protocol, staged and priced (sim_migration)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest

from switchyard.config import MigrationConfig
from switchyard.messages import EngineOutput, EngineRequest, FinishReason, SamplingOptions
from switchyard.workers.sim.cost import KvTransferCost, StepCostModel, available_profiles, load_profile
from switchyard.workers.sim.fleet import SimFleet
from switchyard.workers.sim.instance import SimInstance, simulated_token_id
from switchyard.workers.sim.migration import SimMigrationOutcome, admission_blocks

PROFILE = load_profile("llama3.1-8b-h100")
COST = StepCostModel.from_profile(PROFILE)
KV = KvTransferCost.from_profile(PROFILE, block_size=16)
BS, VOCAB = 16, 1000


def make_instance(instance_id: str, **overrides: Any) -> SimInstance:
    kwargs: dict[str, Any] = dict(
        block_size=BS, num_kv_blocks=8192, max_model_len=40000, max_num_seqs=64, max_num_batched_tokens=8192
    )
    kwargs.update(overrides)
    return SimInstance(COST, instance_id=instance_id, vocab_size=VOCAB, **kwargs)


def make_request(request_id: str, prompt_len: int, max_tokens: int, base: int = 0) -> EngineRequest:
    sampling = SamplingOptions(max_tokens=max_tokens, ignore_eos=True)
    return EngineRequest(request_id, tuple(range(base, base + prompt_len)), sampling)


def expected_tokens(request_id: str, n: int) -> list[int]:
    return [simulated_token_id(request_id, i, VOCAB) for i in range(n)]


@dataclass
class Run:
    """A two-instance fleet (``src``, ``dst``) that moves request ``r`` once ``cut`` tokens arrived."""

    fleet: SimFleet
    outputs: list[tuple[float, str, EngineOutput]] = field(default_factory=list)
    outcomes: list[SimMigrationOutcome] = field(default_factory=list)

    def tokens(self, request_id: str = "r", instance_id: str | None = None) -> list[int]:
        return [
            t
            for _, iid, o in self.outputs
            if o.request_id == request_id and instance_id in (None, iid)
            for t in o.token_ids
        ]

    @property
    def outcome(self) -> SimMigrationOutcome:
        assert len(self.outcomes) == 1, self.outcomes
        return self.outcomes[0]


def run_migration(
    prompt_len: int,
    *,
    max_tokens: int = 64,
    cut: int = 8,
    migration: MigrationConfig | None = None,
    dst: dict[str, Any] | None = None,
    seed: int = 0,
) -> Run:
    fleet = SimFleet(
        [make_instance("src", seed=seed), make_instance("dst", **{"seed": seed, **(dst or {})})],
        kv_transfer=KV,
        migration=migration or MigrationConfig(),
    )
    run = Run(fleet)

    def on_output(now: float, iid: str, out: EngineOutput) -> None:
        run.outputs.append((now, iid, out))
        if out.request_id == "r" and len(run.tokens()) == cut and iid == "src":
            fleet.migrate("r", "src", "dst", run.outcomes.append)

    fleet.on_output = on_output
    fleet.submit("src", make_request("r", prompt_len, max_tokens))
    fleet.run()
    return run


def test_block_bytes_follow_the_model_shape() -> None:
    """A block is layers x 2 (K, V) x kv heads x head dim x 2 B x block size; every profile agrees
    with its own per-GPU KV size, and TP ranks each carry their share."""
    assert KV.bytes_per_block == 32 * 2 * 8 * 128 * 2 * 16 == 2 * 1024 * 1024
    assert KV.descriptors_per_block == 2 * 32
    for name in available_profiles():
        p = load_profile(name)
        tp = p.hardware.tensor_parallel
        assert p.model.kv_bytes_per_token == p.engine.kv_bytes_per_token_per_gpu * tp, name
        cost = KvTransferCost.from_profile(p, block_size=BS)
        assert cost.bytes_per_block_per_rank * tp == cost.bytes_per_block


def test_transfer_time_is_setup_plus_descriptor_posting_plus_wire() -> None:
    """sim-profiles.md §7.3 with the H100 profile's link: 1 ms + n x (64 x 3.5 us + 2 MiB / 30 GB/s)."""
    assert KV.transfer_s(0) == 0.0
    per_block = 64 * 3.5e-6 + 2 * 1024 * 1024 / 3.0e10
    for n in (1, 128, 512):
        assert KV.transfer_s(n) == pytest.approx(1e-3 + n * per_block)
    assert KV.transfer_s(512) == pytest.approx(0.1515, abs=1e-4)  # 8k tokens: posting dominates


def test_migrated_request_continues_the_same_tokens_without_loss_or_duplication() -> None:
    """Source tokens then destination tokens are exactly the uninterrupted sequence, one
    finished output, and usage (prompt, cached tokens) stays the client's."""
    run = run_migration(300, max_tokens=50, cut=12)
    assert run.outcome.status == "moved", run.outcome
    assert run.tokens() == expected_tokens("r", 50)
    assert len(run.tokens(instance_id="src")) >= 12 and run.tokens(instance_id="dst")
    finished = [o for _, _, o in run.outputs if o.finished]
    assert len(finished) == 1 and finished[0].finish_reason is FinishReason.LENGTH
    assert {(o.num_prompt_tokens, o.num_cached_tokens) for _, _, o in run.outputs} == {(300, 0)}
    for inst in run.fleet.instances.values():  # nothing left behind, every block released
        load = inst.load(0.0)
        assert not inst.has_work and load.kv_blocks_used == 0 and load.waiting_prefill_tokens == 0


def test_a_seeded_request_continues_its_seeds_tokens_after_a_move() -> None:
    """Instances of one pool share the engine seed, so a moved request goes on with the
    sequence of that seed, not of the default one."""
    run = run_migration(300, max_tokens=40, cut=10, seed=7)
    assert run.outcome.status == "moved", run.outcome
    assert run.tokens() == [simulated_token_id("r", i, VOCAB, seed=7) for i in range(40)]
    assert run.tokens() != expected_tokens("r", 40)


def test_destination_does_not_recompute_the_moved_prefix() -> None:
    """The destination computes only the decodes it emits: the prefix arrives as KV and lands
    in its prefix cache."""
    run = run_migration(2000, max_tokens=40, cut=10)
    dst = run.fleet.instances["dst"]
    assert run.outcome.status == "moved"
    assert dst.num_computed_tokens_total == len(run.tokens(instance_id="dst"))
    assert dst.num_cached_blocks >= 2000 // BS


def test_bytes_are_the_moved_blocks_times_bytes_per_block() -> None:
    """Pre-copied plus tail blocks cover the request's KV at the suspend exactly once."""
    run = run_migration(1000, max_tokens=60, cut=20)
    o = run.outcome
    computed_at_suspend = 1000 + len(run.tokens(instance_id="src")) - 1
    assert o.blocks_moved == -(-computed_at_suspend // BS)
    assert o.bytes_moved == o.blocks_moved * KV.bytes_per_block
    assert o.precopied_blocks > 0 and 0 < o.tail_blocks <= 2


def test_downtime_is_nearly_flat_in_length_while_total_time_grows() -> None:
    """Pre-copy keeps the pause to a step boundary, a few control calls and a small tail
    (Llumnix: ~20-30 ms at any length); the whole move grows with the KV copied."""
    outcomes = [run_migration(n, max_tokens=200, cut=8).outcome for n in (512, 4096, 16384, 32768)]
    assert all(o.status == "moved" for o in outcomes), outcomes
    downtimes = [o.downtime_s for o in outcomes]
    assert all(d is not None and 0.01 < d < 0.05 for d in downtimes), downtimes
    assert max(d for d in downtimes if d) / min(d for d in downtimes if d) < 1.5
    totals = [o.total_s for o in outcomes]
    assert totals == sorted(totals) and totals[-1] > 8 * totals[0]
    assert all(o.tail_blocks <= MigrationConfig().last_stage_max_blocks for o in outcomes)


def test_stop_and_copy_pauses_for_the_whole_copy() -> None:
    """``max_stages=0`` moves everything while suspended: downtime grows with the length."""
    short, long = (
        run_migration(n, max_tokens=20, migration=MigrationConfig(max_stages=0)).outcome for n in (512, 16384)
    )
    assert (short.stages, short.precopied_blocks, long.stages, long.precopied_blocks) == (0, 0, 0, 0)
    assert long.tail_blocks == -(-(16384 + 8 - 1) // BS)
    assert short.downtime_s is not None and long.downtime_s is not None
    assert long.downtime_s > short.downtime_s + 0.9 * KV.transfer_s(1024 - 32)


@pytest.mark.parametrize(
    ("migration", "stages"),
    [
        (MigrationConfig(), 2),  # the first stage (~0.6 s) lets > 2 blocks accrue: a second one
        (MigrationConfig(max_stages=1), 1),
        (MigrationConfig(last_stage_max_blocks=1000), 1),  # later stages need 1000 new blocks
    ],
)
def test_precopy_stages_follow_the_coordinator_rules(migration: MigrationConfig, stages: int) -> None:
    """A stage after the first runs only when ``last_stage_max_blocks`` new blocks accrued, and
    never more than ``max_stages``."""
    run = run_migration(30000, max_tokens=200, cut=4, migration=migration)
    assert run.outcome.status == "moved" and run.outcome.stages == stages
    assert run.tokens() == expected_tokens("r", 200)


def test_full_destination_refuses_and_the_request_stays() -> None:
    """Fewer free blocks than the request's plus the admission margin: nothing moves."""
    run = run_migration(2048, max_tokens=30, dst={"num_kv_blocks": 140, "max_model_len": 2048})
    o = run.outcome
    assert (o.status, o.reason, o.instance_id, o.bytes_moved, o.downtime_s) == (
        "stayed",
        "destination_full",
        "src",
        0,
        None,
    )
    assert run.tokens(instance_id="src") == expected_tokens("r", 30)
    assert admission_blocks(2048, BS, 16) == 129 + 16


def test_destination_filled_before_the_admission_recomputes_there() -> None:
    """A burst that takes the destination's blocks (evicting the pre-copied ones) after the
    check: the request is admitted without KV, recomputed, and still loses no token."""
    fleet = SimFleet(
        [make_instance("src"), make_instance("dst", num_kv_blocks=300, max_model_len=4800)],
        kv_transfer=KV,
        migration=MigrationConfig(),
    )
    dst, outputs, outcomes = fleet.instances["dst"], list[EngineOutput](), list[SimMigrationOutcome]()
    burst: list[EngineRequest] = []

    def on_output(_now: float, iid: str, out: EngineOutput) -> None:
        outputs.append(out)
        if iid == "src" and dst.num_cached_blocks >= 2048 // BS and not burst:  # pre-copy landed
            burst.append(make_request("big", 4000, 5, base=10**6))
            fleet.submit("dst", burst[0])

    fleet.on_output = on_output
    fleet.submit("src", make_request("r", 2048, 40))
    fleet.call_at(0.2, lambda: fleet.migrate("r", "src", "dst", outcomes.append))
    fleet.run()
    (o,) = outcomes
    assert (o.status, o.reason, o.instance_id, o.stages, o.tail_blocks) == (
        "recomputed",
        "admission_failed",
        "dst",
        1,
        0,
    )
    assert [t for out in outputs if out.request_id == "r" for t in out.token_ids] == expected_tokens("r", 40)


def test_waiting_request_moves_without_kv() -> None:
    """A request still queued (no KV) moves at the cost of control calls only and runs there."""
    fleet = SimFleet(
        [make_instance("src", max_num_seqs=1), make_instance("dst")],
        kv_transfer=KV,
        migration=MigrationConfig(),
    )
    outputs: list[tuple[str, EngineOutput]] = []
    outcomes: list[SimMigrationOutcome] = []
    fleet.on_output = lambda _t, iid, out: outputs.append((iid, out))
    fleet.submit("src", make_request("busy", 100, 200))
    fleet.submit("src", make_request("queued", 100, 5, base=5000))
    fleet.call_at(0.05, lambda: fleet.migrate("queued", "src", "dst", outcomes.append))
    fleet.run()
    (o,) = outcomes
    assert (o.status, o.stages, o.bytes_moved) == ("moved", 0, 0)
    assert [
        t for iid, out in outputs if out.request_id == "queued" for t in out.token_ids
    ] == expected_tokens("queued", 5)
    assert {iid for iid, out in outputs if out.request_id == "queued"} == {"dst"}


def test_request_that_finishes_during_precopy_is_reported_finished() -> None:
    """The suspend finds the request gone: the outcome says so and the tokens are all there."""
    run = run_migration(30000, max_tokens=12, cut=4)
    assert (run.outcome.status, run.outcome.instance_id) == ("finished", "src")
    assert run.tokens(instance_id="src") == expected_tokens("r", 12)


def test_one_migration_per_instance_at_a_time() -> None:
    """A second move touching a busy instance stays put at once (``max_concurrent_per_instance``)."""
    fleet = SimFleet([make_instance(i) for i in ("a", "b", "c")], kv_transfer=KV, migration=MigrationConfig())
    outcomes: list[SimMigrationOutcome] = []
    fleet.submit("a", make_request("r1", 500, 50))
    fleet.submit("a", make_request("r2", 500, 50, base=9000))

    def start() -> None:
        fleet.migrate("r1", "a", "b", outcomes.append)
        fleet.migrate("r2", "a", "c", outcomes.append)
        fleet.migrate("r1", "a", "a", outcomes.append)

    fleet.call_at(0.2, start)
    fleet.run()
    assert [(o.request_id, o.status, o.reason) for o in outcomes] == [
        ("r2", "stayed", "busy"),
        ("r1", "stayed", "same_instance"),
        ("r1", "moved", ""),
    ]


def test_admit_migrated_refuses_without_blocks_and_changes_nothing() -> None:
    """Too few free blocks for the arriving KV: None, and the instance is untouched."""
    src, dst = make_instance("src"), make_instance("dst", num_kv_blocks=64, max_model_len=1024)
    src.add_request(make_request("r", 1500, 10))
    while "r" in src and not src.load(0).num_running:
        src.step()
    src.step()
    state = src.suspend("r")
    assert state is not None and state.num_computed > 64 * BS
    before = dst.load(0.0)
    assert dst.admit_migrated(state) is None
    assert dst.load(0.0) == before and "r" not in dst


def test_suspend_and_admit_keep_the_load_accounting() -> None:
    """A decoding request moved in waits with no prefill pending and holds its KV blocks."""
    src, dst = make_instance("src"), make_instance("dst")
    src.add_request(make_request("r", 100, 10))
    src.step()  # prefill + first token
    state = src.suspend("r")
    assert state is not None and (state.num_computed, len(state.outputs)) == (100, 1)
    assert src.load(0.0).num_running == 0 and not src.has_work
    assert dst.admit_migrated(state) == -(-100 // BS)  # nothing cached there: every block pulled
    load = dst.load(0.0)
    assert (load.num_waiting, load.waiting_prefill_tokens, load.kv_blocks_used) == (1, 0, 7)
    result = dst.step()
    assert result.work.num_tokens == 1 and result.work.prefill_pairs == 0  # a decode, not a prefill
    assert [t for o in result.outputs for t in o.token_ids] == [simulated_token_id("r", 1, VOCAB)]
