"""PegaFlow: a KV-cache storage and transfer engine for LLM inference.

``EngineClient`` talks to a ``pegaflow-server``; ``LoadState`` is the shared-memory
completion flag of a load; ``pegaflow.host`` creates shared-memory KV tensors (sealed
memfds, handed to the server by descriptor) for the host (CPU) backend.
"""

from typing import TYPE_CHECKING, Any

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
    PegaflowPermissionDenied,
    PegaflowResourceExhausted,
    PegaflowTimeout,
    PegaflowUnavailable,
)

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
    "PegaflowPermissionDenied",
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

# The host helpers need NumPy; import them on first use so that ``import pegaflow`` (and
# the ``pegaflow-server`` console script) never loads NumPy and its BLAS threads.
_HOST_EXPORTS = frozenset({"SharedKvCache", "SharedMemoryRegion", "kv_layer_spec"})

if TYPE_CHECKING:
    from pegaflow.host import SharedKvCache, SharedMemoryRegion, kv_layer_spec


def __getattr__(name: str) -> Any:
    if name in _HOST_EXPORTS:
        from pegaflow import host

        return getattr(host, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
