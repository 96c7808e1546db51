"""PegaFlow: a KV-cache storage and transfer engine for LLM inference.

``EngineClient`` talks to a ``pegaflow-server``; ``LoadState`` is the shared-memory
completion flag of a load; ``pegaflow.host`` creates shared-memory KV tensors for the
host (CPU) backend.
"""

from pegaflow._native import (
    EngineClient,
    KvLayer,
    LoadState,
    QueryResult,
    SaveResult,
    __version__,
)
from pegaflow.errors import (
    PegaflowAlreadyExists,
    PegaflowError,
    PegaflowInternalError,
    PegaflowInvalidArgument,
    PegaflowLoadError,
    PegaflowNotFound,
    PegaflowResourceExhausted,
    PegaflowTimeout,
    PegaflowUnavailable,
)
from pegaflow.host import SharedKvCache, SharedMemoryRegion, kv_layer_spec

__all__ = [
    "EngineClient",
    "KvLayer",
    "LoadState",
    "PegaflowAlreadyExists",
    "PegaflowError",
    "PegaflowInternalError",
    "PegaflowInvalidArgument",
    "PegaflowLoadError",
    "PegaflowNotFound",
    "PegaflowResourceExhausted",
    "PegaflowTimeout",
    "PegaflowUnavailable",
    "QueryResult",
    "SaveResult",
    "SharedKvCache",
    "SharedMemoryRegion",
    "__version__",
    "kv_layer_spec",
]
