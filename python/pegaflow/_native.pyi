"""Type stubs of the PyO3 extension ``pegaflow._native`` (kept in sync by stubtest)."""

from collections.abc import Sequence
from typing import final

__all__ = [
    "EngineClient",
    "KvLayer",
    "LoadState",
    "QueryResult",
    "SaveResult",
    "__version__",
    "run_server",
]

__version__: str

def run_server(argv: list[str]) -> int:
    """Run the server with command-line ``argv`` (program name first); returns the exit code."""

@final
class KvLayer:
    """One KV layer: a strided tensor in a sealed memfd (``host_fd``) or a CUDA IPC allocation."""

    layer: int
    shape: list[int]
    stride: list[int]
    element_size: int
    block_dim: int
    kv_dim: int | None
    byte_offset: int
    host_fd: int | None
    cuda_ipc_handle: bytes | None
    device_uuid: bytes | None
    region_offset: int
    region_size: int
    def __new__(
        cls,
        layer: int,
        *,
        shape: Sequence[int],
        stride: Sequence[int],
        element_size: int,
        block_dim: int,
        kv_dim: int | None = None,
        byte_offset: int = 0,
        host_fd: int | None = None,
        cuda_ipc_handle: bytes | None = None,
        device_uuid: bytes | None = None,
        region_offset: int = 0,
        region_size: int = 0,
    ) -> KvLayer: ...

@final
class SaveResult:
    """What a save did."""

    saved_blocks: int
    sealed_blocks: int
    skipped_blocks: int
    evicted_blocks: int
    rejected_blocks: int

@final
class QueryResult:
    """What a query found."""

    hit_blocks: int
    lease_id: str | None
    lease_ttl_ms: int
    tiers: list[str]  # one per hit block: "ram", "ssd", or "unknown" (a newer server's tier)
    loading: bool

@final
class LoadState:
    """Shared-memory completion flag of one load."""

    def __new__(cls) -> LoadState: ...
    @property
    def error(self) -> str | None: ...
    def status(self) -> str: ...
    def is_done(self) -> bool: ...
    def reset(self) -> None: ...
    def wait(self, timeout_s: float = 30.0) -> None: ...

@final
class EngineClient:
    """Blocking client of one pegaflow-server; every call has a deadline."""

    def __new__(
        cls,
        endpoint: str = "127.0.0.1:50055",
        timeout_s: float = 5.0,
        auth_token_file: str | None = None,
    ) -> EngineClient: ...
    @property
    def endpoint(self) -> str: ...
    def health(self) -> dict[str, str | int]: ...
    def register_kv_layers(
        self,
        instance_id: str,
        namespace: str,
        tp_rank: int,
        tp_size: int,
        layers: Sequence[KvLayer],
        replicated_kv: bool = False,
    ) -> int: ...
    def unregister_instance(self, instance_id: str) -> None: ...
    def save(
        self,
        instance_id: str,
        tp_rank: int,
        block_ids: Sequence[int],
        block_hashes: Sequence[bytes],
        layers: Sequence[int] | None = None,
        parent_hashes: Sequence[bytes] | None = None,
    ) -> SaveResult: ...
    def query(
        self, instance_id: str, block_hashes: Sequence[bytes], lease_ttl_ms: int = 0
    ) -> QueryResult: ...
    def load(
        self,
        instance_id: str,
        tp_rank: int,
        lease_id: str,
        block_ids: Sequence[int],
        load_state: LoadState,
        layers: Sequence[int] | None = None,
        lease_offset: int = 0,
        more_ranges: bool = False,
    ) -> int: ...
    def release_lease(self, lease_id: str) -> None: ...
    def list_instances(self) -> list[dict[str, str | int | bool | list[int] | None]]: ...
    def drop_cache(self) -> dict[str, int]:
        """Admin: drops every cached block that is neither leased nor being copied."""
    def open_session(self, instance_id: str) -> None:
        """Ties the instance's registrations made afterwards to this client's life."""
    def session_alive(self, instance_id: str) -> bool:
        """Whether the session of ``instance_id`` is open (False once the server dropped it)."""
    def close_session(self, instance_id: str) -> None: ...
    def close(self) -> None: ...
