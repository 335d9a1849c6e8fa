"""``MigrationConnector``: vLLM's ``NixlConnector`` plus what live migration needs from inside the engine.

Why a subclass and not a data plane of our own: NIXL already moves KV blocks between engines
(pull-based, one-sided READs that skip blocks the destination's prefix cache holds), and every
serving stack that does P/D on vLLM uses it. What stock vLLM V1 lacks for *live* migration is
access to a running request (research ``vllm-migration.md`` §3.3), so this subclass, loaded
with ``kv_connector_module_path="switchyard.workers.vllm.kv_connector"``, adds five things:

1. **A control channel** in the engine-core process: a loopback ZMQ ROUTER socket served by a
   daemon thread (protocol in ``kv_control.py``). Anything that must be consistent with the
   scheduler (``snapshot``) is queued to the scheduler thread and answered from
   ``build_connector_meta``, which vLLM calls once per step in that thread.
2. **Abort -> hold** for a *marked* request: when the scheduler finishes a marked request as
   aborted, ``request_finished_all_groups`` runs NIXL's producer path as if the request had
   been length-capped, so its blocks stay allocated and NIXL's ``kv_transfer_params`` come
   back; the authoritative ``output_token_ids`` are recorded for ``collect``.
3. **The block-boundary cap**: a destination asks NIXL for every prompt token, but the source
   only holds KV for ``remote_num_tokens`` (its computed tokens, one fewer than prompt +
   outputs). Without capping ``get_num_new_matched_tokens`` at ``remote_num_tokens -
   num_computed_tokens``, a request whose length is 1 (mod block_size) trips an assertion in
   NIXL's worker that kills the destination engine (research §5.4).
4. **Snapshot ids registered as sends** on the source (``_reqs_in_batch`` + ``_reqs_need_send``),
   so the destination's read notification is recognised instead of logged as "unrecognized
   request" and counted as a failed notification; the resulting ``finished_sending`` reports
   are filtered out before the scheduler sees them (it would assert on an unknown id). A
   suspended request is registered the same way, so its blocks are freed as soon as the
   destination has read them rather than at lease expiry (research §5.6, §7.5).
5. **CPU affinity restored** in the worker process: NIXL's worker pins itself to the last core
   of each NUMA node (``os.sched_setaffinity`` in ``nixl/base_worker.py``), which on a 2-core
   machine makes decode ~10x slower. The worker's affinity from before NIXL's ``__init__`` is
   put back (``kv_connector_extra_config["switchyard_keep_cpu_affinity"]``, default on).

Written against vLLM 0.32.0; ``tests/integration/test_kv_connector_contract.py`` fails loudly
when an internal used here (NIXL scheduler attributes, ``Request`` fields) changes.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import zmq
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole
from vllm.distributed.kv_transfer.kv_connector.v1.nixl import NixlConnector
from vllm.v1.request import Request, RequestStatus

from switchyard.workers.vllm.kv_control import decode, encode

__all__ = ["REQUEST_ID_ARG", "MigrationConnector"]

logger = logging.getLogger(__name__)

REQUEST_ID_ARG = "switchyard_request_id"
"""``SamplingParams.extra_args`` key carrying our request id into the engine core, where vLLM
has replaced it with ``<id>-<random suffix>``."""

_FINISH = {RequestStatus.FINISHED_STOPPED: "stop", RequestStatus.FINISHED_LENGTH_CAPPED: "length"}
_POLL_IDLE_MS = 500  # control thread wake-up when nothing is pending (checks for shutdown)
_POLL_BUSY_MS = 1  # ... while a snapshot or collect waits for the scheduler thread


def external_id(request: Request) -> str:
    """Our request id for a vLLM ``Request`` (the adapter puts it in ``extra_args``)."""
    extra = request.sampling_params.extra_args if request.sampling_params else None
    if extra and REQUEST_ID_ARG in extra:
        return str(extra[REQUEST_ID_ARG])
    return str(request.request_id).rsplit("-", 1)[0]


@dataclass(slots=True)
class _Pending:
    """A control request waiting for the scheduler thread (snapshot) or a suspend (collect)."""

    identity: bytes
    cmd: str
    request_id: str
    deadline: float
    after_tokens: int = 0  # snapshot: tokens the destination already holds
    min_new_blocks: int = 1  # snapshot: fewer new full blocks than this -> size only, no ticket
    result: dict[str, Any] | None = None


@dataclass(slots=True)
class _SchedulerState:
    """What the scheduler-side connector tracks; touched by the scheduler and control threads.

    Cross-thread access is limited to single dict/set operations and whole-object swaps,
    which the GIL makes atomic.
    """

    live: dict[str, Request] = field(default_factory=dict)  # our id -> running vLLM request
    marked: set[str] = field(default_factory=set)  # our ids whose next abort suspends
    suspended: dict[str, dict[str, Any]] = field(default_factory=dict)  # our id -> collect result
    held: dict[str, str] = field(default_factory=dict)  # our id -> vLLM id, blocks held for a pull
    to_release: set[str] = field(default_factory=set)  # vLLM ids to release at the next step
    ignored_sends: set[str] = field(default_factory=set)  # snapshot/released ids NIXL will report
    snapshots: queue.SimpleQueue[_Pending] = field(default_factory=queue.SimpleQueue)
    snapshot_seq: int = 0
    # Replies whose send registration rides in the next step's metadata (``unsent``) or in the
    # last one (``sent``). A reply is published only once the step after its registration is
    # being scheduled: by then the worker has processed the registration (sync scheduling),
    # so the destination's read notice cannot arrive first and be dropped as unrecognized,
    # which would leave a suspended request's blocks held until the lease expires.
    unsent: list[tuple[_Pending | str, dict[str, Any]]] = field(default_factory=list)
    sent: list[tuple[_Pending | str, dict[str, Any]]] = field(default_factory=list)


class MigrationConnector(NixlConnector):  # type: ignore[misc]
    """NIXL pull connector with a control channel, abort->hold, and the boundary cap."""

    def __init__(self, vllm_config: Any, role: KVConnectorRole, kv_cache_config: Any) -> None:
        extra = vllm_config.kv_transfer_config.kv_connector_extra_config
        affinity = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
        super().__init__(vllm_config, role, kv_cache_config)
        self._block_size = int(vllm_config.cache_config.block_size)
        if role == KVConnectorRole.WORKER:
            keep = extra.get("switchyard_keep_cpu_affinity", True)
            if keep and affinity is not None and os.sched_getaffinity(0) != affinity:
                os.sched_setaffinity(0, affinity)
                logger.info("restored the worker's CPU affinity %s after NIXL pinned it", sorted(affinity))
            return
        cs = self.connector_scheduler
        assert cs is not None
        # Per-instance handshake address from our config instead of process-wide env vars, so
        # several engines can start from one process; set before the listener thread starts.
        if "switchyard_side_channel_port" in extra:
            cs.side_channel_host = str(extra.get("switchyard_side_channel_host", cs.side_channel_host))
            cs.side_channel_port = int(extra["switchyard_side_channel_port"])
        self._lease_s = float(extra.get("kv_lease_duration", 30))
        self._state = _SchedulerState()
        self._stop = threading.Event()
        port = extra.get("switchyard_control_port")
        if port:
            ready = threading.Event()
            threading.Thread(
                target=self._serve_control, args=(int(port), ready), name="switchyard-kv-control", daemon=True
            ).start()
            ready.wait(5)

    # -- scheduler hooks (scheduler thread) ---------------------------------------------------

    def on_new_request(self, request: Request) -> None:
        self._state.live[external_id(request)] = request
        super().on_new_request(request)

    def get_num_new_matched_tokens(
        self, request: Request, num_computed_tokens: int
    ) -> tuple[int | None, bool]:
        count, is_async = super().get_num_new_matched_tokens(request, num_computed_tokens)
        params = request.kv_transfer_params or {}
        cap = params.get("remote_num_tokens")
        if count and params.get("do_remote_prefill") and cap:
            # The source holds KV for `remote_num_tokens` only (research §5.4).
            count = max(0, min(count, int(cap) - num_computed_tokens))
            if count == 0:
                return 0, False
        return count, is_async

    def build_connector_meta(self, scheduler_output: Any) -> Any:
        st = self._state
        publish, st.sent, st.unsent = st.sent, st.unsent, []
        while not st.snapshots.empty():
            pending = st.snapshots.get_nowait()
            result = self._snapshot(pending.request_id, pending.after_tokens, pending.min_new_blocks)
            if result.get("kv_transfer_params"):
                st.sent.append((pending, result))  # registered in this step's metadata
            else:
                pending.result = result
        for target, result in publish:
            if isinstance(target, str):
                st.suspended[target] = result
            else:
                target.result = result
        return super().build_connector_meta(scheduler_output)

    def update_connector_output(self, connector_output: Any) -> None:
        st = self._state
        sent = connector_output.finished_sending
        if sent:
            for rid in sent & st.ignored_sends:  # snapshot reads, or holds we already released
                sent.discard(rid)
                st.ignored_sends.discard(rid)
            for ext in [e for e, rid in st.held.items() if rid in sent]:
                del st.held[ext]
        if st.to_release:
            release, st.to_release = st.to_release, set()
            # The worker still tracks these until a read notice or lease expiry reports them.
            st.ignored_sends |= release
            connector_output.finished_sending = (connector_output.finished_sending or set()) | release
        super().update_connector_output(connector_output)

    def request_finished_all_groups(
        self, request: Request, block_ids: tuple[list[int], ...]
    ) -> tuple[bool, dict[str, Any] | None]:
        st = self._state
        ext = external_id(request)
        if st.live.get(ext) is request:
            del st.live[ext]
        if ext not in st.marked:
            return super().request_finished_all_groups(request, block_ids)  # type: ignore[no-any-return]
        st.marked.discard(ext)
        outputs = list(request.output_token_ids)
        if request.status != RequestStatus.FINISHED_ABORTED:
            # It finished on its own before the abort arrived: nothing to hold or move.
            reason = _FINISH.get(request.status, "stop")
            st.suspended[ext] = {
                "output_token_ids": outputs,
                "kv_transfer_params": {},
                "finish_reason": reason,
            }
            return super().request_finished_all_groups(request, block_ids)  # type: ignore[no-any-return]
        # Abort -> hold: NIXL's producer path keeps the blocks and returns pull params.
        request.kv_transfer_params = {"do_remote_decode": True}
        request.status = RequestStatus.FINISHED_LENGTH_CAPPED
        try:
            delay, params = super().request_finished_all_groups(request, block_ids)
        finally:
            request.status = RequestStatus.FINISHED_ABORTED
        if delay:
            st.held[ext] = request.request_id
            # Registered like a P/D prefill, so the worker recognises the destination's read.
            self._nixl_scheduler()._reqs_in_batch.add(request.request_id)
        result = {
            "output_token_ids": outputs,
            "kv_transfer_params": params if delay and params else {},
            "finish_reason": None,
        }
        if delay:
            st.unsent.append((ext, result))  # published once the worker knows the hold
        else:
            st.suspended[ext] = result
        return delay, params

    def _snapshot(self, ext: str, after_tokens: int, min_new_blocks: int) -> dict[str, Any]:
        """Full blocks of a running request as pull params (scheduler thread only).

        With fewer than ``min_new_blocks`` full blocks beyond ``after_tokens`` only the tokens
        come back: no ticket is issued, so no send is registered that nobody will read.
        """
        req = self._state.live.get(ext)
        if req is None or req.is_finished():
            return {"error": f"request {ext!r} is not running here"}
        # KV is written for computed tokens minus those of a step still in flight.
        n_full = (req.num_computed_tokens - req.num_in_flight_tokens) // self._block_size
        n_tokens = n_full * self._block_size
        if n_full <= 0 or (n_tokens - after_tokens) // self._block_size < max(min_new_blocks, 1):
            return {"token_ids": list(req.all_token_ids[:n_tokens]), "kv_transfer_params": {}}
        manager = self._kv_cache_manager
        assert manager is not None
        cs = self._nixl_scheduler()
        blocks = tuple(list(g[:n_full]) for g in manager.get_block_ids(req.request_id))
        st = self._state
        st.snapshot_seq += 1
        snap_id = f"{req.request_id}#snap{st.snapshot_seq}"
        # Register the snapshot id as a send so the destination's read notice is recognised.
        cs._reqs_in_batch.add(snap_id)
        cs._reqs_need_send[snap_id] = time.perf_counter() + self._lease_s
        st.ignored_sends.add(snap_id)
        return {
            "token_ids": list(req.all_token_ids[:n_tokens]),
            "kv_transfer_params": self._params(cs, blocks, snap_id, n_tokens),
        }

    def _params(
        self, cs: Any, blocks: tuple[list[int], ...], remote_id: str, n_tokens: int
    ) -> dict[str, Any]:
        """NIXL's pull ticket, field for field what its ``request_finished`` returns."""
        pc = self._vllm_config.parallel_config
        return {
            "do_remote_prefill": True,
            "do_remote_decode": False,
            "remote_block_ids": [list(g) for g in cs.get_exchange_clipped_blocks(blocks)],
            "remote_engine_id": self.engine_id,
            "remote_request_id": remote_id,
            "remote_host": cs.side_channel_host,
            "remote_port": cs.side_channel_port,
            "tp_size": cs.transfer_tp_size,
            "dcp_size": pc.decode_context_parallel_size,
            "pp_size": pc.pipeline_parallel_size,
            "remote_num_tokens": n_tokens,
            "remote_blocks_expiry_time": None,
            "transfer_mode": "pull",
        }

    def _nixl_scheduler(self) -> Any:
        cs = self.connector_scheduler
        assert cs is not None
        return cs

    def shutdown(self) -> None:
        if self.connector_scheduler is not None:
            self._stop.set()
        super().shutdown()

    # -- control channel (its own thread) -----------------------------------------------------

    def _serve_control(self, port: int, ready: threading.Event) -> None:
        sock: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.bind(f"tcp://127.0.0.1:{port}")
        ready.set()
        waiting: list[_Pending] = []
        try:
            while not self._stop.is_set():
                if sock.poll(_POLL_BUSY_MS if waiting else _POLL_IDLE_MS):
                    identity, _, payload = sock.recv_multipart()
                    try:
                        reply = self._command(identity, decode(payload), waiting)
                    except Exception as exc:  # a bad command must not kill the channel
                        logger.exception("KV control command failed")
                        reply = {"error": f"{type(exc).__name__}: {exc}"}
                    if reply is not None:
                        sock.send_multipart([identity, b"", encode(reply)])
                waiting = self._answer_ready(sock, waiting)
        finally:
            sock.close()

    def _command(
        self, identity: bytes, msg: dict[str, Any], waiting: list[_Pending]
    ) -> dict[str, Any] | None:
        """Answer at once, or park the request in ``waiting`` (then return None)."""
        st, cmd, rid = self._state, msg.get("cmd"), str(msg.get("request_id", ""))
        if cmd == "ping":
            return {}
        if cmd == "list":
            reqs = [
                {
                    "request_id": ext,
                    "num_computed_tokens": r.num_computed_tokens,
                    "num_blocks": -(-r.num_computed_tokens // self._block_size),
                    "num_output_tokens": r.num_output_tokens,
                }
                for ext, r in list(st.live.items())
            ]
            return {"requests": reqs}
        if cmd == "mark":
            if rid not in st.live:
                return {"error": f"request {rid!r} is not running here"}
            st.suspended.pop(rid, None)
            st.marked.add(rid)
            return {}
        if cmd == "unmark":
            st.marked.discard(rid)
            return {}
        if cmd == "free":
            internal = st.held.pop(rid, None)
            st.suspended.pop(rid, None)
            if internal is not None:
                st.to_release.add(internal)
            return {"released": internal is not None}
        timeout = float(msg.get("timeout_s", 10.0))
        if cmd == "snapshot":
            pending = _Pending(
                identity,
                cmd,
                rid,
                time.monotonic() + timeout,
                after_tokens=int(msg.get("after_tokens", 0)),
                min_new_blocks=int(msg.get("min_new_blocks", 1)),
            )
            st.snapshots.put(pending)
            waiting.append(pending)
            return None
        if cmd == "collect":
            waiting.append(_Pending(identity, cmd, rid, time.monotonic() + timeout))
            return None
        return {"error": f"unknown command {cmd!r}"}

    def _answer_ready(self, sock: Any, waiting: list[_Pending]) -> list[_Pending]:
        still: list[_Pending] = []
        now = time.monotonic()
        for p in waiting:
            result = p.result if p.cmd == "snapshot" else self._state.suspended.pop(p.request_id, None)
            if result is None and now >= p.deadline:
                result = {"error": f"{p.cmd} of {p.request_id!r} timed out"}
            if result is None:
                still.append(p)
            else:
                sock.send_multipart([p.identity, b"", encode(result)])
        return still
