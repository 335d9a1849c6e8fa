"""Configuration as data: one pydantic model per component, shared by the CLI, the operator and the CRDs.

A component receives its own section (``EngineConfig``, ``RouterConfig``, ...), never the
root. Field docstrings say the unit and why the default is what it is; they become the CRD
schema descriptions.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

from switchyard.errors import ConfigError

__all__ = [
    "DEFAULT_TTFT_SLO_MS",
    "MAX_INTERNAL_TOKEN_CHARS",
    "MAX_POOL_INSTANCES",
    "MIN_INTERNAL_TOKEN_CHARS",
    "TTFT_SLO_PARAM",
    "EngineConfig",
    "GatewayConfig",
    "InternalToken",
    "KvTransferConfig",
    "MigrationConfig",
    "PoolConfig",
    "PoolRole",
    "RebalancerConfig",
    "RouterConfig",
    "ServeConfig",
    "SimConfig",
    "StrictModel",
    "check_internal_token",
    "check_ttft_slo",
    "read_api_key_file",
    "read_secret_file",
]


def read_secret_file(path: Path, what: str) -> str:
    """The text of ``path``, a file holding ``what`` (a mounted Kubernetes Secret, say).

    Why files: a secret given as a flag is visible to every user of the machine (``ps``,
    ``/proc/PID/cmdline``); a file is readable by its owner only. The one reader of such files
    (the internal token's, the API keys'), so that every secret file reads and fails alike:
    ASCII only (both travel as header values), and a ``ConfigError`` that names the file and
    what it should hold, never its content (a wrong file may hold another secret).
    """
    try:
        return path.expanduser().read_text(encoding="ascii")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not ASCII"
        raise ConfigError(f"cannot read the {what} file {path}: {reason}") from exc


def read_api_key_file(path: Path) -> tuple[SecretStr, ...]:
    """The gateway's API keys in ``path``: one per line, surrounding whitespace and blank lines dropped.

    Several lines let one Secret hold the old and the new key while clients move over. A file
    with no key is an error, not "no auth": an empty Secret must not open the gateway.
    """
    lines = read_secret_file(path, "API key").splitlines()
    keys = tuple(SecretStr(line.strip()) for line in lines if line.strip())
    if not keys:
        raise ConfigError(f"the API key file {path} holds no key (one a line); no key would turn auth off")
    return keys


MIN_INTERNAL_TOKEN_CHARS = 16
"""Shortest internal token accepted: 16 characters of even a small alphabet are beyond guessing
over the network; generated tokens have 43 (256 random bits)."""

MAX_INTERNAL_TOKEN_CHARS = 4096
"""Longest internal token accepted, well inside gRPC's 8 KiB default metadata limit."""


def check_internal_token(value: str) -> str:
    """``value`` if it can be the internal token, else ``ValueError`` saying why (never quoting it).

    Printable ASCII without spaces, because it travels as a gRPC metadata value after
    ``Bearer ``; at least :data:`MIN_INTERNAL_TOKEN_CHARS` long so a guess cannot work.
    """
    if not MIN_INTERNAL_TOKEN_CHARS <= len(value) <= MAX_INTERNAL_TOKEN_CHARS:
        raise ValueError(
            f"the internal token must be {MIN_INTERNAL_TOKEN_CHARS} to {MAX_INTERNAL_TOKEN_CHARS} "
            f"characters, got {len(value)}"
        )
    if not all("!" <= c <= "~" for c in value):
        raise ValueError("the internal token must be printable ASCII without spaces (a gRPC metadata value)")
    return value


InternalToken = Annotated[
    SecretStr, AfterValidator(lambda v: SecretStr(check_internal_token(v.get_secret_value())))
]
"""The deployment's internal gRPC token (``api.auth``): a ``SecretStr``, so reprs and logs show stars."""


class StrictModel(BaseModel):
    """Base for every config model: unknown keys are errors, field docstrings are descriptions."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, frozen=True)


class SimConfig(StrictModel):
    """Parameters of the simulated engine (a performance model, not inference)."""

    profile: str = "llama3.1-8b-h100"
    """Name of the GPU cost profile (``switchyard/workers/sim/profiles``); each cites its sources."""

    time_mode: Literal["real", "virtual"] = "real"
    """``real`` sleeps for each simulated step; ``virtual`` advances an injected clock (benchmarks)."""

    num_kv_blocks: int | None = Field(default=None, ge=1)
    """KV blocks of the simulated instance; None takes the profile's capacity."""

    max_num_seqs: int | None = Field(default=None, ge=1)
    """Most requests in one batch; None takes the profile's vLLM default for its GPU."""

    max_num_batched_tokens: int | None = Field(default=None, ge=1)
    """Token budget of one step, prefill chunks included; None takes the profile's vLLM default."""

    vocab_size: int = Field(default=32000, ge=2)
    """Range of the token IDs the simulator emits (deterministic per request and engine seed)."""

    compute_derate: float = Field(default=1.0, gt=0, le=1)
    """Divides the profile's compute rates; 1.0 is the calibration, the profile's
    ``sustained_prefill_compute_derate`` (0.7 on H100) the conservative variant to compare with."""


class KvTransferConfig(StrictModel):
    """KV transfer between instances (live migration, P/D) through vLLM's NIXL connector."""

    side_channel_host: str = "127.0.0.1"
    """Address peers use for the NIXL handshake with this instance; loopback for one machine."""

    side_channel_port: int = Field(default=0, ge=0, le=65535)
    """NIXL handshake port of this instance; 0 picks a free one (one per instance)."""

    control_port: int = Field(default=0, ge=0, le=65535)
    """Loopback port of the connector's control channel in the engine core; 0 picks a free one."""

    lease_s: int = Field(default=30, ge=1)
    """Seconds a source holds blocks a destination has not pulled yet (NIXL's default lease)."""

    keep_cpu_affinity: bool = True
    """Undo NIXL's pinning of the CPU worker to one core per NUMA node, which makes decode
    ~10x slower on small machines (research §5.3); only for the CPU build."""

    ucx_tls: str = "tcp,self,sm"
    """UCX transports on the CPU build (``UCX_TLS``); DRAM over TCP and shared memory."""


class EngineConfig(StrictModel):
    """How each engine instance is built."""

    kind: Literal["vllm", "sim"] = "vllm"
    """``vllm`` runs real inference; ``sim`` runs the simulator (for scale tests and benchmarks)."""

    model: Path | None = None
    """A local Hugging Face model directory. None builds the tiny random-weight smoke-test model."""

    served_model_name: str | None = None
    """Name clients use in ``model``; defaults to the directory name (or ``switchyard-tiny``)."""

    dtype: str = "auto"
    """Weights dtype for vLLM; ``auto`` keeps the checkpoint's (the CPU build runs float32/bfloat16)."""

    block_size: int = Field(default=32, ge=1)
    """Tokens per KV block. The CPU attention backend needs a multiple of 32."""

    max_model_len: int | None = Field(default=None, ge=16)
    """Context length; None takes the model's own."""

    max_num_seqs: int = Field(default=16, ge=1)
    """Most requests in one batch per instance."""

    enable_prefix_caching: bool = True
    """Reuse KV of shared prefixes; cache-affinity routing depends on it."""

    prefix_caching_hash_algo: Literal["sha256", "sha256_cbor"] = "sha256"
    """Block-hash function; routers reproduce it, so it must be a deterministic one."""

    enforce_eager: bool = True
    """Skip torch.compile: start-up drops from ~35 s to ~12 s on CPU."""

    seed: int = 0
    """Engine seed, so greedy and seeded runs repeat. The simulator's emitted token IDs depend
    on it too (with the request id): same seed, same tokens; another seed, other tokens."""

    cpu_kvcache_space_gib: int = Field(default=1, ge=1)
    """KV cache memory per instance on the CPU build (``VLLM_CPU_KVCACHE_SPACE``)."""

    cpu_threads: int | None = Field(default=None, ge=1, le=1024)
    """OpenMP threads of this engine, not pinned to cores (``OMP_NUM_THREADS``, and
    ``VLLM_CPU_OMP_THREADS_BIND=nobind`` on the CPU build), set only for this engine's
    processes. None keeps vLLM's default, one thread pinned to every core of a NUMA node,
    which suits one engine per machine or pod. Set it when several engines share a machine's
    cores. Not chosen automatically: with NIXL migration (``kv_transfer``) under concurrent
    load on the 2-core CI machine, one unpinned thread per engine let a pre-copy stall past
    its 10 s step timeout in 2 of 24 runs (the request then stays on its source; cause not
    found), which was not seen at vLLM's default."""

    extra_args: dict[str, Any] = Field(default_factory=dict)
    """Further ``AsyncEngineArgs`` fields, passed through unchanged."""

    sim: SimConfig = Field(default_factory=SimConfig)
    """Simulator settings, used when ``kind`` is ``sim``."""

    kv_transfer: KvTransferConfig | None = None
    """KV transfer through the migration connector (NIXL), which live migration, drain by
    migration and the rebalancer need; None leaves it out (vLLM then starts without NIXL, and
    a move falls back to recomputing the request on the destination)."""

    @field_validator("block_size")
    @classmethod
    def _block_size_is_power_of_two_multiple(cls, v: int) -> int:
        if v & (v - 1):
            raise ValueError(f"block_size must be a power of two, got {v}")
        return v


class MigrationConfig(StrictModel):
    """How the migration coordinator moves a running request (Llumnix-style multi-stage)."""

    max_stages: int = Field(default=3, ge=0, le=8)
    """Pre-copy stages at most (Llumnix's default 3); 0 is stop-and-copy."""

    last_stage_max_blocks: int = Field(default=2, ge=0)
    """Stop pre-copying once fewer new full blocks than this accrued since the last stage; the
    final (downtime) stage then pulls at most about this many. 1-2 fits NIXL's per-pull cost."""

    admission_margin_blocks: int = Field(default=16, ge=0)
    """Free KV blocks the destination must keep beyond the request's own, so a migration never
    pushes it into preemption."""

    max_concurrent_per_instance: int = Field(default=1, ge=1)
    """Migrations an instance takes part in at once, as source or destination (Llumnix: 1)."""

    step_timeout_s: float = Field(default=10.0, gt=0)
    """Deadline of each step in seconds (snapshot, pull, suspend, first token on the destination)."""


class RebalancerConfig(StrictModel):
    """The router's hotspot rebalancer (DualMap §4 over Llumnix migration); off by default."""

    enabled: bool = False
    """Run the periodic rebalancer. Off by default: migration needs KV-transfer-enabled engines."""

    period_s: float = Field(default=1.0, gt=0, le=60)
    """Seconds between two plans; each plan's moves are applied before the next one starts."""

    max_moves_per_period: int = Field(default=2, ge=0, le=64)
    """Migrations started per period at most, fleet-wide (a rate limit: each costs a pause)."""

    imbalance_ratio: float = Field(default=1.5, ge=1.0)
    """An instance is overloaded when its queue length is at least this times the fleet mean."""

    min_load_gap: int = Field(default=2, ge=1)
    """...and at least this many requests above the mean, so a tiny fleet load never triggers."""

    max_waiting: int = Field(default=4, ge=1)
    """An instance with this many requests waiting for prefill is overloaded whatever the mean:
    its queue is what breaks the TTFT SLO first."""

    request_cooldown_s: float = Field(default=10.0, ge=0)
    """A request moved (or tried) is not picked again for this long, so nothing ping-pongs."""


TTFT_SLO_PARAM = "ttft_slo_ms"
DEFAULT_TTFT_SLO_MS = 2000.0
"""The TTFT objective when none is given: the router's, a DualMap policy built on its own, and an
LLMService's ``slo.ttftMs`` (2 s: interactive chat with long prompts)."""
"""The policy parameter that carries the router's TTFT SLO (``RouterConfig.ttft_slo_ms``)."""


def check_ttft_slo(policy_params: Mapping[str, Any], ttft_slo_ms: float) -> None:
    """Raise ``ValueError`` if ``policy_params`` set a TTFT SLO other than the router's.

    Why: the SLO is one setting of the service, which the autoscaler scales for too; a policy
    that switches at another value would quietly steer by a second objective.
    """
    given = policy_params.get(TTFT_SLO_PARAM)
    if given is not None and given != ttft_slo_ms:
        raise ValueError(
            f"policy_params sets {TTFT_SLO_PARAM}={given!r} ms, but the router's TTFT SLO "
            f"(router.ttft_slo_ms, an LLMService's slo.ttftMs) is {ttft_slo_ms:g} ms; "
            "a policy steers by the service's one SLO, so set only the router's"
        )


class RouterConfig(StrictModel):
    """The router core: which policy decides, and how it learns instance load."""

    policy: str = "dualmap"
    """Registered policy name (``dualmap``, ``least_load``, ``prefix_tree``, ...). ``dualmap`` by
    default: on the routing benchmark's workload family (``bench/results/family/``, 8 instances)
    it had the highest capacity of all policies on every prefix-heavy workload but multi-turn
    sessions, where ``prefix_tree`` leads by less than one rate step (README, Performance)."""

    policy_params: dict[str, Any] = Field(default_factory=dict)
    """Parameters of the chosen policy, validated by the policy's own model."""

    ttft_slo_ms: float = Field(default=DEFAULT_TTFT_SLO_MS, gt=0, le=600_000)
    """Time-to-first-token objective in milliseconds, given to every policy that steers by one
    (a ``ttft_slo_ms`` parameter: ``dualmap``'s SLO switch); ``policy_params`` may only repeat
    it. 2 s, the default of an LLMService's ``slo.ttftMs``, so that the router switches at the
    objective the autoscaler scales for."""

    load_report_interval_s: float = Field(default=0.05, gt=0, le=10)
    """How often instances push load reports (50 ms keeps routing fresh at little cost)."""

    grpc_host: str = "127.0.0.1"
    """Address the router's gRPC service binds to. Loopback by default, and never the gateway's
    address implicitly: it is an internal port (it routes requests and lists instances for any
    holder of the internal token), so exposing it is a separate decision; on Kubernetes the
    router pod binds its own pod IP."""

    grpc_port: int = Field(default=0, ge=0, le=65535)
    """Port of the router's gRPC service; 0 picks a free one."""

    max_failover_attempts: int = Field(default=3, ge=0, le=16)
    """How often one request may move to another instance after its instance died."""

    first_token_timeout_s: float = Field(default=600.0, gt=0)
    """Give up on a request whose instance produced nothing for this long."""

    decision_log_size: int = Field(default=256, ge=0)
    """Recent routing decisions kept for the debug view."""

    rebalancer: RebalancerConfig = Field(default_factory=RebalancerConfig)
    """Hotspot rebalancing by live migration (off by default)."""

    migration: MigrationConfig = Field(default_factory=MigrationConfig)
    """How the router moves a running request (``migrate``, drains, the rebalancer)."""

    @model_validator(mode="after")
    def _one_ttft_slo(self) -> RouterConfig:
        check_ttft_slo(self.policy_params, self.ttft_slo_ms)
        return self


class GatewayConfig(StrictModel):
    """The OpenAI-compatible HTTP front door."""

    host: str = "127.0.0.1"
    """Listen address; loopback by default so nothing is exposed by accident."""

    port: int = Field(default=8000, ge=0, le=65535)
    """Listen port; 0 picks a free one (tests)."""

    api_keys: tuple[SecretStr, ...] = ()
    """Accepted bearer keys; empty disables auth (local use). Never logged. ``serve`` takes them
    from one place: this field, or (overriding it) ``--api-key-file``/``SWITCHYARD_API_KEY_FILE``,
    ``SWITCHYARD_API_KEY`` or ``--api-key`` (which ``ps`` shows)."""

    max_body_bytes: int = Field(default=4 * 1024 * 1024, ge=1024)
    """Largest request body accepted (413 above it, and the connection closed once the client
    has read it); 4 MiB fits any prompt the context allows."""

    max_header_bytes: int = Field(default=16 * 1024, ge=1024)
    """Largest request header block (request line, names and values) accepted; above it a 431
    and the connection is closed. The HTTP parser has no limit of its own, and grows a long
    header by copying it, so without one a client holds as much memory as it sends."""

    header_timeout_s: float = Field(default=10.0, gt=0)
    """Longest time a request's headers may take to arrive, from their first byte (for a new
    connection, from its opening); then a 408 and a close. Without it a client sending headers
    a byte at a time (slowloris) holds its connection forever."""

    body_timeout_s: float = Field(default=60.0, gt=0)
    """Longest time a request's body may take to arrive after its headers; then a 408 and a
    close. 60 s lets a 4 MiB body through a 1 Mbit/s link."""

    max_stop_strings: int = Field(default=16, ge=0)
    """Most stop strings per request."""

    max_chat_messages: int = Field(default=4096, ge=1)
    """Most messages in one chat completion request (400 above it). Why a cap: parsing and
    templating cost per message, and a 4 MiB body holds 110,000 small ones (0.3-0.9 s of CPU).
    Each message is a few tokens of template markup even when empty, so 4,096 is already
    16,000+ tokens of markup alone."""

    gc_young_threshold: int = Field(default=10_000, ge=0)
    """Allocations between two young-generation garbage collections in the gateway process
    (Python's default is 700; 0 keeps it). Why raised: at 1,000 open streams the default made
    ~12 collections a second, and their pauses stall every stream; 10,000 lowered the added
    P99 of the router-overhead benchmark's held scenario from a median of 2.6 to 1.4 ms
    (6 interleaved rounds each, lower in 5 of 6 pairs, equal in the sixth)."""


PoolRole = Literal["prefill", "decode", "unified"]
"""What a pool's instances do: one phase of disaggregated serving, or both (``unified``)."""

MAX_POOL_INSTANCES = 1024
"""Most instances one pool may have. One bound for ``PoolConfig``, ``ServeConfig.instances``
and the ServingPool CRD (``replicas`` and its autoscaling bounds), so that every pool the API
server admits renders into a ``serve.json`` that validates. 1024 is the CRD's bound since
v1alpha1: lowering it would invalidate stored objects, and nothing here needs a smaller one."""


class PoolConfig(StrictModel):
    """One pool of engine instances that a supervisor keeps alive (a ServingPool, on Kubernetes).

    The one description of a pool: the supervisor's ``PoolSpec`` extends it with what the
    serving process decides at start-up, and a ServingPool renders into one
    (``ServingPoolSpec.pool_config``)."""

    name: str = Field(default="pool", pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", max_length=40)
    """Pool name: prefixes instance ids and Ray actor names (a DNS label, as Kubernetes names are)."""

    role: PoolRole = "unified"
    """What the pool's instances do; routers see it in membership."""

    instances: int = Field(default=2, ge=0, le=MAX_POOL_INSTANCES)
    """Instances to keep alive."""

    engine: EngineConfig | None = None
    """Engine settings for this pool; None takes the service-wide ``engine``."""

    ray_resource: str | None = None
    """Custom Ray resource each instance takes one unit of, so instances land on this pool's
    nodes (worker pods advertise ``pool-<name>``); None places them anywhere."""

    instance_resource: str | None = Field(default=None, pattern=r"\{index\}")
    """Template of a Ray resource only instance ``index`` takes (``"<pool>-worker-{index}"``:
    each worker pod advertises its own name), so instance ``<pool>-<i>`` always runs on pod
    ordinal ``i`` and scale-in removes the instances of the pods a StatefulSet removes."""


class ServeConfig(StrictModel):
    """Everything ``switchyard serve`` starts on one machine."""

    instances: int = Field(default=2, ge=1, le=MAX_POOL_INSTANCES)
    """Engine instances to start (the one pool's, when ``pools`` is empty)."""

    engine: EngineConfig = Field(default_factory=EngineConfig)
    router: RouterConfig = Field(default_factory=RouterConfig)
    gateway: GatewayConfig = Field(default_factory=GatewayConfig)

    ray_address: str | None = None
    """Join this Ray cluster; None starts a local one."""

    ray_num_cpus: int | None = Field(default=None, ge=1)
    """CPUs the local Ray cluster advertises; None lets Ray count them."""

    restart_backoff_s: float = Field(default=1.0, ge=0)
    """Wait before restarting a dead instance, so a crash loop does not spin."""

    instance_start_timeout_s: float = Field(default=600.0, gt=0)
    """Longest an instance may take to start; past it the start fails and nothing is left
    running, instead of waiting on an engine that will never come up."""

    pools: tuple[PoolConfig, ...] = ()
    """Pools to run; empty means one pool named ``pool`` of ``instances`` instances."""

    shutdown_grace_s: float = Field(default=5.0, ge=0, le=3600)
    """Seconds open requests may run on after SIGTERM or SIGINT before they end (an SSE error
    event, or a 503); then the router and the engines stop and Ray shuts down. Long enough for
    a typical reply to finish, short enough that the whole stop, roughly this plus the engines'
    own shutdown, fits in what the process manager waits before SIGKILL (Kubernetes'
    ``terminationGracePeriodSeconds``, 30 s by default; systemd's ``TimeoutStopSec``, 90 s)."""

    internal_token: InternalToken | None = None
    """Bearer token that every internal gRPC service (the router's, each worker's) requires and
    the router sends. None: the token of the pools already running on the joined Ray cluster,
    else a fresh random one, so a local run is secured with no setup; give one (here, in
    ``internal_token_file`` or ``SWITCHYARD_INTERNAL_TOKEN``, never a flag, which ``ps`` shows)
    for clients of the router's gRPC service, or to share it between router replicas. 16 to 4096
    printable ASCII characters; never logged."""

    internal_token_file: Path | None = None
    """File holding the internal token (a mounted Secret), read once at start-up; for when the
    token must not sit in this config or the environment."""

    def effective_pools(self) -> tuple[PoolConfig, ...]:
        """The pools to start, with each pool's engine settings resolved."""
        pools = self.pools or (PoolConfig(name="pool", instances=self.instances),)
        return tuple(
            p if p.engine is not None else p.model_copy(update={"engine": self.engine}) for p in pools
        )

    @model_validator(mode="after")
    def _check(self) -> ServeConfig:
        if self.internal_token is not None and self.internal_token_file is not None:
            raise ValueError("give internal_token or internal_token_file, not both")
        if self.engine.kind == "sim" and self.engine.model is not None:
            raise ValueError("engine.model is only used by the vllm engine; drop it with engine.kind=sim")
        names = [p.name for p in self.pools]
        if len(set(names)) != len(names):
            raise ValueError(f"pool names must be unique, got {names}")
        if self.router.rebalancer.enabled:
            bare = [
                p.name
                for p in self.effective_pools()
                if p.engine and p.engine.kind == "vllm" and not p.engine.kv_transfer
            ]
            if bare:
                raise ValueError(
                    "router.rebalancer.enabled needs live migration, but the vllm engines of pools "
                    f"{bare} have no engine.kv_transfer (add it, or pass --migration)"
                )
        return self
