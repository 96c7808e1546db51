"""``PegaKVConnector``: vLLM's v1 KV connector interface, delegated by role.

vLLM creates one instance in the scheduler (role SCHEDULER) and one in every worker
(role WORKER). This class only picks the half and forwards each call in one line; the
scheduler half keeps state (:mod:`.scheduler`), the worker half moves bytes through the
server (:mod:`.worker`). Loads are asynchronous: a hit request waits in
``WAITING_FOR_REMOTE_KVS`` until its blocks are in place.

The connector declares ``SupportsHMA``, so vLLM keeps its hybrid KV cache manager on:
sliding-window, recurrent and MLA models each get their own KV cache groups, and every
block-id list below is one list per group (:mod:`.groups`).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import TYPE_CHECKING, Any

from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
    SupportsHMA,
)

from pegaflow._native import EngineClient
from pegaflow.connector import compat
from pegaflow.connector.block_table import BlockTable
from pegaflow.connector.config import ConnectorConfig
from pegaflow.connector.groups import UnsupportedModel, cache_groups, groups_factor
from pegaflow.connector.metadata import PegaConnectorMetadata
from pegaflow.connector.scheduler import SchedulerSide
from pegaflow.connector.worker import WorkerSide

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)


def _config_of(vllm_config: Any) -> ConnectorConfig:
    transfer = vllm_config.kv_transfer_config
    config = ConnectorConfig.from_sources(
        transfer.kv_connector_extra_config, engine_id=transfer.engine_id
    )
    parallel = vllm_config.parallel_config
    if parallel.data_parallel_size > 1:
        # Each data-parallel rank is a separate engine with its own workers.
        instance_id = f"{config.instance_id}-dp{parallel.data_parallel_rank}"
        config = dataclasses.replace(config, instance_id=instance_id)
    return config


def _unsupported_reason(vllm_config: Any, kv_cache_config: Any) -> str | None:
    """Why this model cannot use the connector (then vLLM serves without it), or None."""
    if not vllm_config.cache_config.enable_prefix_caching:
        device = getattr(getattr(vllm_config, "device_config", None), "device_type", None)
        if device == "cpu" and getattr(vllm_config.model_config, "use_mla", False):
            return (
                "prefix caching is disabled: vLLM's CPU build turns it off for MLA models "
                "unless the CPU has AMX (the cache is keyed by vLLM's block hashes)"
            )
        return "prefix caching is disabled (the cache is keyed by vLLM's block hashes)"
    if kv_cache_config is None:
        return "vLLM passed no KV cache config"
    try:
        groups, _ = cache_groups(kv_cache_config)
    except UnsupportedModel as e:
        return str(e)
    if len(groups) > 1 and not compat.TAKES_FAILED_REQUESTS:
        return (
            f"{len(groups)} KV cache groups (a hybrid model) need vLLM 0.30 or later: this "
            "vLLM cannot take a failed load of such a model back"
        )
    return None


class PegaKVConnector(KVConnectorBase_V1, SupportsHMA):  # type: ignore[misc]
    """PegaFlow's vLLM connector: a shared prefix cache in a ``pegaflow-server``."""

    if compat.HOST_HIT_SOURCE is not None:
        _cache_hit_source = compat.HOST_HIT_SOURCE

    def __init__(self, vllm_config: Any, role: Any, kv_cache_config: Any = None) -> None:
        super().__init__(vllm_config, role, kv_cache_config)
        self._config = _config_of(vllm_config)
        self._scheduler: SchedulerSide | None = None
        self._worker: WorkerSide | None = None
        self._hybrid = False
        self._block_table: BlockTable | None = None
        reason = _unsupported_reason(vllm_config, kv_cache_config)
        if reason is not None:
            # Loudly, at startup: an engine that silently never hits is worse.
            raise UnsupportedModel(
                f"PegaKVConnector cannot serve this engine: {reason}. "
                "Fix that, or start vLLM without the connector (no kv_transfer_config)."
            )
        groups, block_size = cache_groups(kv_cache_config)
        self._hybrid = len(groups) > 1
        self._num_groups = len(groups)
        if role == KVConnectorRole.SCHEDULER:
            if compat.block_hashes_differ_per_process():
                logger.warning(
                    "PYTHONHASHSEED is not set: this vLLM seeds its block hashes at random "
                    "in every engine, so cached blocks are shared only within this engine. "
                    "Set PYTHONHASHSEED to one value for every engine to share them."
                )
            # The cache is best effort: a failed load is recomputed unless asked otherwise.
            vllm_config.kv_transfer_config.kv_load_failure_policy = self._config.load_failure_policy
            hash_block_size = getattr(kv_cache_config, "hash_block_size", None) or block_size
            client = EngineClient(
                self._config.endpoint,
                self._config.query_timeout_s,
                self._config.auth_token_file,
            )
            transfer = vllm_config.kv_transfer_config
            self._scheduler = SchedulerSide(
                self._config,
                client,
                block_size,
                hash_block_size,
                loads=transfer.is_kv_consumer,
                saves=transfer.is_kv_producer,
                groups=groups,
            )
            if not compat.BINDS_KV_CACHE_MANAGER:
                self._block_table = BlockTable()
                self._scheduler.bind_block_ids(self._block_table)
        else:
            from vllm.distributed.parallel_state import get_tensor_model_parallel_rank

            parallel = vllm_config.parallel_config
            tp, pp = parallel.tensor_parallel_size, parallel.pipeline_parallel_size
            rank = compat.pipeline_rank() * tp + get_tensor_model_parallel_rank()
            model = vllm_config.model_config
            # MLA's latent KV is the same on every TP rank: stored once, and engines of any
            # TP size share it. Pipeline stages hold different layers: each (stage, TP
            # rank) is a rank of the instance, its part of a block its stage's layers.
            replicated = bool(getattr(model, "use_mla", False)) and pp == 1
            factors: dict[str, object] = {
                "model": model.model,
                "revision": model.revision,
                "dtype": str(model.dtype),
                "kv_cache_dtype": vllm_config.cache_config.cache_dtype,
                "block_size": block_size,
                "pp": pp,
            }
            if replicated:
                factors["mla"] = True
            else:
                factors["tp"] = tp
            if pp > 1:
                # Every stage must name the same namespace, but sees only its own layers.
                factors["kv_cache_layout"] = self._config.kv_cache_layout
            if len(groups) > 1:
                factors["groups"] = groups_factor(kv_cache_config, groups, layers=pp == 1)
            self._worker = WorkerSide(
                self._config,
                rank,
                tp * pp,
                factors,
                replicated_kv=replicated,
                layouts_in_namespace=pp == 1,
            )

    @property
    def requires_kv_delivery(self) -> bool:
        # A dropped save is a later cache miss, never lost output.
        return False

    @classmethod
    def get_required_kvcache_layout(cls, vllm_config: Any) -> str | None:
        """On CUDA, vLLM's cross-layer layout: a block of all layers is one contiguous
        run, which the server copies with one DMA and no kernel. (vLLM 0.26 to 0.28 know only
        per-layer layouts here: they are asked through ``prefer_cross_layer_blocks``.)"""
        from vllm.platforms import current_platform

        if not current_platform.is_cuda_alike() or compat.CROSS_LAYER_BY_PREFERENCE:
            return None
        return _config_of(vllm_config).kv_cache_layout

    @property
    def prefer_cross_layer_blocks(self) -> bool:
        """vLLM 0.26: cross-layer blocks (one tensor, a block of all layers contiguous),
        where vLLM can (one KV cache group of attention layers, on CUDA)."""
        return self._worker is not None

    # ---- worker role ------------------------------------------------------------------

    def _meta(self) -> PegaConnectorMetadata:
        meta = self._get_connector_metadata()
        assert isinstance(meta, PegaConnectorMetadata)
        return meta

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        first = next(iter(kv_caches.values()), None)
        hint = compat.cross_layer_hint(self._vllm_config, self._num_groups)
        if hint is not None and first is not None and first.is_cuda:
            logger.info("%s", hint)
        if self._worker is not None:
            held = _layer_held_caches(self._vllm_config)
            self._worker.register_kv_caches(kv_caches, self._kv_cache_config.num_blocks, held)

    def register_cross_layers_kv_cache(self, kv_cache: torch.Tensor, attn_backend: Any) -> None:
        """vLLM 0.26's cross-layer blocks: one tensor whose first dimension is the block
        (or, for backends without a stride order, the layer); registered as it is."""
        if self._worker is None:
            return
        num_blocks = self._kv_cache_config.num_blocks
        if kv_cache.shape[0] % num_blocks and kv_cache.dim() > 1:
            # [layers, blocks, ...]: each layer's view is one registered layer.
            caches = {f"layers.{i}": kv_cache[i] for i in range(kv_cache.shape[0])}
        else:
            caches = {"cross_layers": kv_cache}
        self._worker.register_kv_caches(caches, num_blocks, _layer_held_caches(self._vllm_config))

    def handle_preemptions(self, kv_connector_metadata: KVConnectorMetadata) -> None:
        if self._worker is not None and isinstance(kv_connector_metadata, PegaConnectorMetadata):
            self._worker.handle_preemptions(kv_connector_metadata)

    def start_load_kv(self, forward_context: Any, **kwargs: Any) -> None:
        if self._worker is not None:
            self._worker.start_load_kv(self._meta())

    def wait_for_layer_load(self, layer_name: str) -> None:
        return  # loads are asynchronous: a request runs only once its load is done

    def save_kv_layer(
        self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: Any, **kwargs: Any
    ) -> None:
        return  # blocks are saved whole, after the step (wait_for_save)

    def wait_for_save(self) -> None:
        if self._worker is not None:
            self._worker.wait_for_save(self._meta())

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        results = self.get_transfer_results(finished_req_ids)
        return results.finished_sending or None, results.finished_recving or None

    def get_transfer_results(self, finished_req_ids: set[str]) -> Any:
        if self._worker is None:
            return compat.TransferResults()
        sending, recving = self._worker.get_finished(finished_req_ids)
        failed = self._worker.take_failed_requests()
        # A hybrid model's block ids repeat across groups: vLLM takes failed loads per
        # request (recomputed whole); otherwise per block (recomputed from the first).
        return compat.TransferResults(sending, recving, failed if self._hybrid else set())

    def get_block_ids_with_load_errors(self) -> set[int]:
        if self._worker is None:
            return set()
        failed = self._worker.take_load_errors()
        return set() if self._hybrid else failed

    def shutdown(self) -> None:
        if self._worker is not None:
            self._worker.shutdown()
        if self._scheduler is not None:
            self._scheduler.shutdown()

    # ---- scheduler role ---------------------------------------------------------------

    def bind_kv_cache_manager(self, kv_cache_manager: Any) -> None:
        super().bind_kv_cache_manager(kv_cache_manager)
        if self._scheduler is not None:
            self._scheduler.bind_block_ids(kv_cache_manager.get_block_ids)

    def on_new_request(self, request: Any) -> None:
        if self._scheduler is not None:
            self._scheduler.on_new_request(request)

    def get_num_new_matched_tokens(
        self, request: Any, num_computed_tokens: int
    ) -> tuple[int | None, bool]:
        if self._scheduler is None:
            return 0, False
        tokens = self._scheduler.get_num_new_matched_tokens(request, num_computed_tokens)
        if tokens is None:
            return None, False  # not known yet: vLLM asks again on a later step
        return tokens, tokens > 0

    def update_state_after_alloc(self, request: Any, blocks: Any, num_external_tokens: int) -> None:
        if self._scheduler is None:
            return
        block_ids = blocks.get_block_ids() if num_external_tokens > 0 else ()
        self._scheduler.update_state_after_alloc(request, block_ids, num_external_tokens)

    def build_connector_meta(self, scheduler_output: Any) -> KVConnectorMetadata:
        if self._scheduler is None:
            return PegaConnectorMetadata()
        if self._block_table is not None:
            self._block_table.update(scheduler_output)
        return self._scheduler.build_connector_meta(scheduler_output)

    def request_finished(
        self, request: Any, block_ids: list[int]
    ) -> tuple[bool, dict[str, Any] | None]:
        if self._scheduler is None:
            return False, None
        if self._block_table is not None:
            self._block_table.forget(request.request_id)
        return self._scheduler.request_finished(request), None

    def request_finished_all_groups(
        self, request: Any, block_ids: tuple[list[int], ...]
    ) -> tuple[bool, dict[str, Any] | None]:
        # True keeps every group's blocks until the workers report the saves done.
        return self.request_finished(request, [])


__all__ = ["PegaKVConnector"]


def _layer_held_caches(vllm_config: Any) -> list[torch.Tensor]:
    """The KV tensors vLLM's attention layers hold themselves. For some backends (MLA on
    CPU) they are other tensor objects than the views the connector is given, over the
    same memory: moving that memory into shared memory must repoint them too."""
    import torch

    context = getattr(vllm_config.compilation_config, "static_forward_context", {}) or {}
    held: list[torch.Tensor] = []
    for layer in context.values():
        cache = getattr(layer, "kv_cache", None)
        caches = [cache] if isinstance(cache, torch.Tensor) else list(cache or [])
        held.extend(t for t in caches if isinstance(t, torch.Tensor) and t.numel() > 0)
    return held
