"""The vLLM versions the connector runs on (0.26 through 0.32), told apart at this one
place by what their connector interface has, never by version number. Three families:

- 0.30 and later bind the KV cache manager to the connector (a request's block ids on
  demand), take failed loads per request (``KVConnectorTransferResults``), hand
  recurrent states over (``kv_connector_block_state``, 0.32) and lay out KV by the layout
  string the connector asks for (``BLHNC``: cross-layer blocks).
- 0.29 lays out KV by the layout string, but neither binds the manager nor takes failed
  loads per request.
- 0.26 to 0.28 do none of that: cross-layer blocks are asked for with
  ``prefer_cross_layer_blocks`` and arrive as one tensor
  (``register_cross_layers_kv_cache``).

Without a bound manager (0.26 to 0.29) the scheduler half mirrors block ids from each
step's output (:mod:`.block_table`); without failed loads per request, hybrid models are
refused (a failed load of one could not be reported).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from vllm.distributed.kv_transfer.kv_connector.v1 import base as _base

_Base = _base.KVConnectorBase_V1

BINDS_KV_CACHE_MANAGER = hasattr(_Base, "bind_kv_cache_manager")
"""vLLM calls ``bind_kv_cache_manager`` (0.30 on): block ids come from the manager."""

CROSS_LAYER_BY_PREFERENCE = hasattr(_Base, "register_cross_layers_kv_cache")
"""Cross-layer blocks are asked for with ``prefer_cross_layer_blocks`` (0.26 to 0.28)."""

TAKES_FAILED_REQUESTS = hasattr(_base, "KVConnectorTransferResults")
"""Failed loads can be reported per request (needed with several KV cache groups)."""


def block_hashes_differ_per_process() -> bool:
    """Whether this vLLM seeds its block hashes at random in every process (0.26 to
    0.28 do unless ``PYTHONHASHSEED`` is set): engines then share no block."""
    from vllm.v1.core import kv_cache_utils

    if hasattr(kv_cache_utils, "resolve_none_hash_seed"):
        return False  # 0.29 on: a fixed seed unless a non-cryptographic hash is chosen
    return os.getenv("PYTHONHASHSEED") is None


try:
    from vllm.v1.metrics.cache_hit_source import CacheHitSource

    HOST_HIT_SOURCE: Any = CacheHitSource.HOST
except ImportError:  # vLLM before hit sources: nothing to label
    HOST_HIT_SOURCE = None

if TAKES_FAILED_REQUESTS:
    TransferResults: Any = _base.KVConnectorTransferResults
else:

    @dataclass
    class _TransferResults:
        """What ``get_transfer_results`` returns where vLLM has no such type."""

        finished_sending: set[str] = field(default_factory=set)
        finished_recving: set[str] = field(default_factory=set)
        failed_recving: set[str] = field(default_factory=set)

    TransferResults = _TransferResults


def cross_layer_hint(vllm_config: Any, num_groups: int) -> str | None:
    """Why vLLM gave per-layer KV tensors where cross-layer blocks were asked for, and
    what to do, or None. vLLM 0.26's V2 model runner (its default for dense models)
    ignores ``prefer_cross_layer_blocks``; its V1 runner honours it for a model with one
    KV cache group, and whole-block copies then run at link speed."""
    if not CROSS_LAYER_BY_PREFERENCE or num_groups != 1:
        return None
    if not getattr(vllm_config, "use_v2_model_runner", False):
        return None
    return (
        "vLLM's V2 model runner keeps one KV tensor per layer, so each block is copied in "
        "one piece per layer; with VLLM_USE_V2_MODEL_RUNNER=0 vLLM lays out whole blocks "
        "(all layers contiguous) and loads run at link speed (docs/benchmarks.md)"
    )


def pipeline_rank() -> int:
    """This worker's pipeline-parallel stage."""
    from vllm.distributed import parallel_state

    rank_of = getattr(parallel_state, "get_pipeline_model_parallel_rank", None)
    if rank_of is not None:
        return int(rank_of())
    return int(parallel_state.get_pp_group().rank_in_group)


__all__ = [
    "BINDS_KV_CACHE_MANAGER",
    "CROSS_LAYER_BY_PREFERENCE",
    "HOST_HIT_SOURCE",
    "TAKES_FAILED_REQUESTS",
    "TransferResults",
    "block_hashes_differ_per_process",
    "cross_layer_hint",
    "pipeline_rank",
]
