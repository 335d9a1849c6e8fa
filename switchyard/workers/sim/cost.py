"""Step-time cost model of one vLLM V1 instance, and the GPU profiles that calibrate it.

The simulator (``SimInstance``/``SimEngine``) needs the duration of one engine step, and vLLM
V1 runs one *mixed* forward pass per step (decodes first, prefill chunks fill the rest of the
token budget), so the cost is a function of the whole batch rather than separate prefill and
decode costs. The form and every constant come from ``shared/research/sim-profiles.md`` (§1,
§10), which cites the published measurements behind them::

    t_step_ms = t_fixed
              + sqrt(t_weights² + (c_lin·T + c_head·S)²)   # linear layers: weight read vs GEMM
              + c_attn_pair·P                               # prefill attention (causal pairs)
              + c_kv·C                                      # decode attention (KV read)
              + c_seq·B                                     # per-sequence bookkeeping
              + [tp > 1] calls·(latency + 2(tp-1)/tp · T·bytes_per_token / bus_bw)

Profiles are JSON files in ``workers/sim/profiles/``, one per (model, GPU, TP) pair, each with a
``sources`` list; they are data, validated by pydantic models on load. The model is a plain
frozen dataclass holding the coefficients in milliseconds, because it sits on the simulator's
hot path (one call per simulated step). Nothing here runs a model: it is a performance model.
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass
from importlib import resources
from typing import Any, Literal

from pydantic import Field, ValidationError

from switchyard.config import StrictModel
from switchyard.errors import ConfigError

__all__ = [
    "AllReduceCost",
    "ClosedFormFits",
    "EngineDefaults",
    "GpuProfile",
    "KvTransferCost",
    "KvTransferProfile",
    "ModelShape",
    "StepCostModel",
    "StepTimeCoefficients",
    "StepWork",
    "available_profiles",
    "load_profile",
    "prefill_pairs",
]

_PROFILE_DIR = "profiles"  # under switchyard/workers/sim; data files, not a package
_DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4, "fp8": 1}  # KV cache dtype "auto" = model dtype


class ModelShape(StrictModel):
    """The served model's architecture (Hugging Face ``config.json``), for reference and KV sizing."""

    hf_id: str
    layers: int = Field(ge=1)
    hidden: int = Field(ge=1)
    q_heads: int = Field(ge=1)
    kv_heads: int = Field(ge=1)
    head_dim: int = Field(ge=1)
    ffn: int = Field(ge=1)
    vocab: int = Field(ge=2)
    params: int = Field(ge=1)
    dtype: Literal["bfloat16", "float16", "float32", "fp8"] = "bfloat16"
    max_model_len: int = Field(ge=16)
    """Native context length of the model, in tokens."""

    @property
    def kv_bytes_per_token(self) -> int:
        """K and V of every layer (vLLM's ``AttentionSpec.page_size_bytes`` per token, all TP ranks)."""
        return 2 * self.layers * self.kv_heads * self.head_dim * _DTYPE_BYTES[self.dtype]


class Hardware(StrictModel):
    """The GPUs of one instance, with the datasheet peaks the calibration is a fraction of."""

    gpu: str
    num_gpus: int = Field(ge=1)
    tensor_parallel: int = Field(ge=1)
    hbm_peak_bytes_per_s: float = Field(gt=0)
    bf16_dense_peak_flops: float = Field(gt=0)
    torch_total_gib_per_gpu: float = Field(gt=0)


class EngineDefaults(StrictModel):
    """vLLM V1 defaults for this GPU (sim-profiles.md §5) and the KV capacity they leave (§4)."""

    block_size: int = Field(ge=1)
    max_num_batched_tokens: int = Field(ge=1)
    max_num_seqs: int = Field(ge=1)
    gpu_memory_utilization: float = Field(gt=0, le=1)
    kv_bytes_per_token_per_gpu: int = Field(ge=1)
    kv_cache_tokens: int = Field(ge=1)
    """Tokens of KV that fit at ``gpu_memory_utilization``; blocks = this // block_size."""


class AllReduceCost(StrictModel):
    """Tensor-parallel all-reduces of one step (absent at TP1)."""

    calls_per_step: int = Field(ge=0)
    latency_ms: float = Field(ge=0)
    bus_bw_bytes_per_s: float = Field(gt=0)
    bytes_per_token: int = Field(ge=0)
    """Bytes all-reduced per scheduled token per call (hidden size x 2 B)."""


class StepTimeCoefficients(StrictModel):
    """Coefficients of the step-time formula, in milliseconds (per token, pair or sequence)."""

    t_fixed: float = Field(ge=0)
    t_weights: float = Field(ge=0)
    c_lin: float = Field(ge=0)
    c_head: float = Field(ge=0)
    c_attn_pair: float = Field(ge=0)
    c_kv: float = Field(ge=0)
    c_seq: float = Field(ge=0)
    allreduce: AllReduceCost | None = None


class KvTransferProfile(StrictModel):
    """Moving KV blocks between instances (sim-profiles.md §7.3, vLLM's NixlConnector pull model).

    ``setup_ms + descriptors x post_us + bytes / bandwidth`` per pull and per TP rank (ranks pull
    in parallel, each over its own NIC); a descriptor is one (layer, K or V, block).
    """

    link: str = "RDMA 400 Gb/s, one NIC per GPU"
    """The link the bandwidth stands for (a calibration choice, sim-profiles.md §7.1)."""

    bandwidth_bytes_per_s: float = Field(default=3.0e10, gt=0)
    """Achievable bytes/s per TP rank; 400 Gb/s RDMA measured 24-33 GB/s per NIC (Mooncake, PegaFlow)."""

    setup_ms: float = Field(default=1.0, ge=0)
    """Fixed cost of one pull (request, notification), sim-profiles.md §7.3."""

    post_us_per_descriptor: float = Field(default=3.5, ge=0)
    """NIXL posting cost per descriptor: 3.2-3.75 us measured in vLLM issues #34054 and #50913."""

    control_rpc_ms: float = Field(default=5.0, ge=0)
    """Round trip of one migration control call (snapshot, shadow pull, suspend, admit). An
    assumption: a LAN gRPC call is under 1 ms, the CPU prototype's suspend took 6-13 ms
    (vllm-migration.md §5.6); not measured on GPUs."""


class PrefillFit(StrictModel):
    """Isolated prefill of n tokens: ``a_n2·n² + b_n·n + c`` ms (default chunking)."""

    a_n2: float
    b_n: float
    c: float


class DecodeFit(StrictModel):
    """Pure decode step: ``d0 + d1_per_seq·B + d2_per_context_token·ΣC`` ms."""

    d0: float
    d1_per_seq: float
    d2_per_context_token: float


class ClosedFormFits(StrictModel):
    """Closed-form fits of the step model, good enough for an explainable TTFT estimator."""

    prefill_ms: PrefillFit
    decode_ms: DecodeFit


class GpuProfile(StrictModel):
    """One (model, GPU, TP) calibration, as stored in ``workers/sim/profiles/<name>.json``."""

    name: str
    """File stem, the name ``SimConfig.profile`` uses."""

    id: str
    """The profile's id in sim-profiles.md §10 (model/gpu/tp)."""

    status: str
    """How the numbers were obtained (calibrated on measurements, or derived) and how they validate."""

    model: ModelShape
    hardware: Hardware
    engine: EngineDefaults
    step_time_ms: StepTimeCoefficients
    fits: ClosedFormFits
    sustained_prefill_compute_derate: float = Field(gt=0, le=1)
    """Recommended conservative derate (sim-profiles.md §9): run capacity studies at 1.0 and this."""

    frontend_overhead_ms: float = Field(ge=0)
    """HTTP/template/tokenise time outside the engine step; not part of the step model."""

    kv_transfer: KvTransferProfile = Field(default_factory=KvTransferProfile)
    """How fast this instance's KV moves to another (migration); sim-profiles.md §7."""

    notes: dict[str, str] = Field(default_factory=dict)
    """Why each constant has its value."""

    sources: tuple[str, ...] = Field(min_length=1)
    """Where the numbers come from (sim-profiles.md §11)."""


@functools.cache
def available_profiles() -> tuple[str, ...]:
    """Names of the shipped profiles, sorted."""
    root = resources.files("switchyard.workers.sim").joinpath(_PROFILE_DIR)
    return tuple(sorted(p.name.removesuffix(".json") for p in root.iterdir() if p.name.endswith(".json")))


@functools.cache
def load_profile(name: str) -> GpuProfile:
    """Load and validate a shipped profile; ``ConfigError`` names the known ones when it is missing."""
    if name not in available_profiles():
        raise ConfigError(f"unknown simulator profile {name!r}; known: {', '.join(available_profiles())}")
    text = (
        resources.files("switchyard.workers.sim")
        .joinpath(_PROFILE_DIR, f"{name}.json")
        .read_text(encoding="utf-8")
    )
    try:
        data: Any = json.loads(text)
        profile = GpuProfile.model_validate(data)
    except (ValueError, ValidationError) as exc:
        raise ConfigError(f"simulator profile {name!r} is invalid: {exc}") from exc
    if profile.name != name:
        raise ConfigError(f"simulator profile file {name}.json declares name {profile.name!r}")
    return profile


def prefill_pairs(num_new: int, num_cached: int) -> float:
    """Causal (query, key) pairs of a prefill chunk of ``num_new`` tokens over ``num_cached`` in KV.

    Each new token attends to every cached token and to the new tokens up to itself:
    ``q·(k + (q+1)/2)``. Prefix-cache hits enter as ``num_cached``: they skip the linear layers
    but the new tokens still attend over them.
    """
    return num_new * (num_cached + (num_new + 1) / 2)


@dataclass(frozen=True, slots=True)
class StepWork:
    """What one engine step computes: the inputs of the step-time formula."""

    num_tokens: int = 0  # T: prefill-chunk tokens + 1 per decoding sequence
    num_sampled: int = 0  # S: sequences sampling a token (decodes + prefills that complete)
    prefill_pairs: float = 0.0  # P: causal (query, key) pairs of the prefill chunks
    decode_context: int = 0  # C: summed context length of the decoding sequences
    num_seqs: int = 0  # B: sequences in the step


@dataclass(frozen=True, slots=True)
class StepCostModel:
    """The step-time formula with one profile's coefficients (ms), optionally derated.

    ``compute_derate`` < 1 divides the compute coefficients (``c_lin``, ``c_head``,
    ``c_attn_pair``) by it, the conservative H100 variant of sim-profiles.md §9.
    """

    t_fixed: float
    t_weights: float
    c_lin: float
    c_head: float
    c_attn_pair: float
    c_kv: float
    c_seq: float
    tensor_parallel: int = 1
    allreduce: AllReduceCost | None = None

    @classmethod
    def from_profile(cls, profile: GpuProfile, *, compute_derate: float = 1.0) -> StepCostModel:
        """Build the model of ``profile``; ``compute_derate`` in (0, 1] slows compute only."""
        if not 0 < compute_derate <= 1:
            raise ConfigError(f"compute_derate must be in (0, 1], got {compute_derate}")
        c = profile.step_time_ms
        return cls(
            t_fixed=c.t_fixed,
            t_weights=c.t_weights,
            c_lin=c.c_lin / compute_derate,
            c_head=c.c_head / compute_derate,
            c_attn_pair=c.c_attn_pair / compute_derate,
            c_kv=c.c_kv,
            c_seq=c.c_seq,
            tensor_parallel=profile.hardware.tensor_parallel,
            allreduce=c.allreduce,
        )

    def step_time_ms(self, work: StepWork) -> float:
        """Modeled duration of one step in milliseconds; 0 for an empty step."""
        if work.num_seqs == 0:
            return 0.0
        linear = self.c_lin * work.num_tokens + self.c_head * work.num_sampled
        t = (
            self.t_fixed
            + math.hypot(self.t_weights, linear)
            + self.c_attn_pair * work.prefill_pairs
            + self.c_kv * work.decode_context
            + self.c_seq * work.num_seqs
        )
        ar = self.allreduce
        if ar is not None and self.tensor_parallel > 1:
            tp = self.tensor_parallel
            wire_ms = 2 * (tp - 1) / tp * work.num_tokens * ar.bytes_per_token / ar.bus_bw_bytes_per_s * 1e3
            t += ar.calls_per_step * (ar.latency_ms + wire_ms)
        return t

    def step_time_s(self, work: StepWork) -> float:
        """Modeled duration of one step in seconds."""
        return self.step_time_ms(work) / 1e3


@dataclass(frozen=True, slots=True)
class KvTransferCost:
    """Time and bytes of pulling KV blocks from one instance to another (sim-profiles.md §7.3).

    ``transfer_s(n) = setup + n x (descriptors_per_block x post + bytes_per_block_per_rank / bw)``:
    vLLM's NixlConnector posts one descriptor per (layer, K or V, block) on every TP rank, and the
    ranks pull their shards in parallel. ``bytes_per_block`` is the whole instance's (all ranks).
    """

    bytes_per_block: int
    bytes_per_block_per_rank: int
    descriptors_per_block: int
    setup_s: float
    post_s_per_descriptor: float
    bandwidth_bytes_per_s: float
    control_rpc_s: float

    @classmethod
    def from_profile(cls, profile: GpuProfile, *, block_size: int) -> KvTransferCost:
        """The profile's link, with blocks of ``block_size`` tokens of its model's KV."""
        m, t = profile.model, profile.kv_transfer
        tp = profile.hardware.tensor_parallel
        per_block = m.kv_bytes_per_token * block_size
        return cls(
            bytes_per_block=per_block,
            bytes_per_block_per_rank=per_block // tp,
            descriptors_per_block=2 * m.layers,
            setup_s=t.setup_ms / 1e3,
            post_s_per_descriptor=t.post_us_per_descriptor / 1e6,
            bandwidth_bytes_per_s=t.bandwidth_bytes_per_s,
            control_rpc_s=t.control_rpc_ms / 1e3,
        )

    def transfer_s(self, num_blocks: int) -> float:
        """Seconds to pull ``num_blocks`` blocks in one transfer; 0 when there is nothing to pull."""
        if num_blocks <= 0:
            return 0.0
        per_block = (
            self.descriptors_per_block * self.post_s_per_descriptor
            + self.bytes_per_block_per_rank / self.bandwidth_bytes_per_s
        )
        return self.setup_s + num_blocks * per_block
