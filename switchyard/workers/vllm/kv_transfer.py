"""The vLLM side of live migration: engine arguments for the connector, and the per-step operations.

Why separate from ``engine.py``: the adapter's job is requests in, deltas out; migration
adds a second conversation with the engine (the connector's control channel) and a handful
of vLLM request shapes (shadow pulls, admissions with ``kv_transfer_params``). Keeping them
here leaves the adapter readable and puts every assumption about NIXL's ticket format and the
control protocol next to each other.

The steps (research ``vllm-migration.md`` §6.2), each a method of :class:`KvMigrationOps`:

* source ``snapshot``: the request's full blocks and a NIXL ticket for them, taken while it
  keeps decoding (full blocks are immutable in vLLM V1);
* destination ``shadow_pull``: a 1-token request over the snapshot tokens carrying the ticket,
  so NIXL pulls the blocks and the destination's prefix cache keeps them; output discarded;
* source ``suspend``: ``mark`` then ``AsyncLLM.abort`` then ``collect``: the connector holds
  the blocks and reports the authoritative output tokens;
* destination admission: ``prompt + outputs`` with the final ticket; NIXL pulls only what the
  prefix cache lacks (the tail), capped at the source's computed tokens;
* source ``release``: give back held blocks nobody will pull.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

from vllm import SamplingParams
from vllm.config import KVTransferConfig
from vllm.inputs.engine import tokens_input
from vllm.platforms import current_platform
from vllm.sampling_params import RequestOutputKind
from vllm.v1.engine.async_llm import AsyncLLM

from switchyard.config import KvTransferConfig
from switchyard.messages import FinishReason, KvSnapshot, SamplingOptions, SuspendedRequest
from switchyard.workers.vllm.kv_connector import REQUEST_ID_ARG
from switchyard.workers.vllm.kv_control import ConnectorControl, free_port

__all__ = ["KvEndpoint", "KvMigrationOps", "kv_bytes_per_block", "kv_transfer_engine_config"]

CONNECTOR_MODULE = "switchyard.workers.vllm.kv_connector"
CONNECTOR_CLASS = "MigrationConnector"


@dataclass(frozen=True, slots=True)
class KvEndpoint:
    """Where one engine's connector listens: NIXL handshake and our control channel."""

    side_channel_host: str
    side_channel_port: int
    control_port: int


def kv_transfer_engine_config(cfg: KvTransferConfig) -> tuple[KVTransferConfig, KvEndpoint]:
    """vLLM's ``kv_transfer_config`` for our connector, with ports resolved (0 picks free ones).

    ``kv_both`` because every instance both sends (as a migration source) and receives; NIXL
    logs a deprecation for it (research §7.3). A failed pull is recomputed, never fatal.
    """
    endpoint = KvEndpoint(
        side_channel_host=cfg.side_channel_host,
        side_channel_port=cfg.side_channel_port or free_port(cfg.side_channel_host),
        control_port=cfg.control_port or free_port(),
    )
    config = KVTransferConfig(
        kv_connector=CONNECTOR_CLASS,
        kv_connector_module_path=CONNECTOR_MODULE,
        kv_role="kv_both",
        kv_buffer_device="cpu" if current_platform.is_cpu() else "cuda",
        kv_load_failure_policy="recompute",
        kv_connector_extra_config={
            "kv_lease_duration": cfg.lease_s,
            "switchyard_side_channel_host": endpoint.side_channel_host,
            "switchyard_side_channel_port": endpoint.side_channel_port,
            "switchyard_control_port": endpoint.control_port,
            "switchyard_keep_cpu_affinity": cfg.keep_cpu_affinity,
        },
    )
    return config, endpoint


def kv_bytes_per_block(vllm_config: Any) -> int:
    """Bytes one KV block holds on this engine (keys and values of every layer).

    Why: migration moves whole blocks, so this turns blocks moved into bytes on the wire (the
    ``switchyard_migration_bytes`` metric, the migration benchmark). Read from the resolved
    engine config, so the attention layout the engine really runs decides it.
    """
    import torch

    model, parallel, cache = vllm_config.model_config, vllm_config.parallel_config, vllm_config.cache_config
    dtype = (
        model.dtype if cache.cache_dtype == "auto" else getattr(torch, str(cache.cache_dtype), model.dtype)
    )
    elem = torch.empty((), dtype=dtype).element_size()
    per_token = 2 * model.get_num_layers(parallel) * model.get_num_kv_heads(parallel) * model.get_head_size()
    return int(per_token * elem * cache.block_size)


class KvMigrationOps:
    """Migration steps against one ``AsyncLLM`` whose connector is ``MigrationConnector``."""

    def __init__(
        self, llm: AsyncLLM, endpoint: KvEndpoint, *, instance_id: str, timeout_s: float = 10.0
    ) -> None:
        self._llm = llm
        self._instance_id = instance_id
        self.endpoint = endpoint
        self.control = ConnectorControl(endpoint.control_port, timeout_s=timeout_s)
        self._shadow_ids = itertools.count(1)

    async def snapshot(
        self, request_id: str, *, after_tokens: int = 0, min_new_blocks: int = 1
    ) -> KvSnapshot:
        """The running request's full blocks as a pull ticket (see ``Engine.snapshot``)."""
        res = await self.control.call(
            "snapshot", request_id=request_id, after_tokens=after_tokens, min_new_blocks=min_new_blocks
        )
        return KvSnapshot(
            request_id=request_id,
            instance_id=self._instance_id,
            token_ids=tuple(res["token_ids"]),
            kv_transfer_params=res["kv_transfer_params"],
        )

    async def shadow_pull(self, snap: KvSnapshot) -> int:
        """Pull a snapshot's blocks into this engine's prefix cache; return the tokens it now holds.

        A 1-token request over the snapshot tokens with the ticket: NIXL reads the blocks this
        engine lacks and the scheduler caches them; the generated token is discarded.
        """
        if not snap.token_ids:
            return 0
        rid = f"{snap.request_id}#shadow{next(self._shadow_ids)}"
        params = SamplingParams(
            max_tokens=1,
            temperature=0.0,
            detokenize=False,
            output_kind=RequestOutputKind.FINAL_ONLY,
            extra_args={REQUEST_ID_ARG: rid, "kv_transfer_params": dict(snap.kv_transfer_params)},
        )
        cached = 0
        async for out in self._llm.generate(tokens_input(list(snap.token_ids)), params, rid):
            cached = out.num_cached_tokens or 0
        return cached

    async def suspend(
        self, request_id: str, *, prompt: list[int], prior_outputs: tuple[int, ...], sampling: SamplingOptions
    ) -> SuspendedRequest:
        """Stop the request, keep its blocks for a pull, and return its authoritative state.

        ``prompt``/``sampling`` are the request as its client sent it and ``prior_outputs`` the
        outputs an earlier migration moved into this engine's prompt; they are prepended to
        the outputs the engine reports, so a request can move again.
        """
        await self.control.call("mark", request_id=request_id)
        try:
            await self._llm.abort(request_id)
        except Exception:
            await self.control.call("unmark", request_id=request_id)
            raise
        res = await self.control.call("collect", request_id=request_id, timeout_s=self.control.timeout_s)
        reason = res.get("finish_reason")
        return SuspendedRequest(
            request_id=request_id,
            instance_id=self._instance_id,
            prompt_token_ids=tuple(prompt),
            output_token_ids=(*prior_outputs, *res["output_token_ids"]),
            sampling=sampling,
            kv_transfer_params=res["kv_transfer_params"],
            finish_reason=FinishReason(reason) if reason else None,
        )

    async def release(self, request_id: str) -> bool:
        """Free blocks held for a pull that will not come; False when none were held."""
        res = await self.control.call("free", request_id=request_id)
        return bool(res.get("released"))

    async def list_requests(self) -> list[dict[str, Any]]:
        """Running requests as the connector sees them (ids, computed tokens, blocks)."""
        res = await self.control.call("list")
        reqs: list[dict[str, Any]] = res["requests"]
        return reqs

    async def ping(self) -> None:
        await self.control.call("ping")
