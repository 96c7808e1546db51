"""The connector's settings, from vLLM's ``kv_connector_extra_config`` and the environment.

Precedence: extra config, then environment (``PEGAFLOW_ENGINE_ENDPOINT``,
``PEGAFLOW_INSTANCE_ID``, ``PEGAFLOW_AUTH_TOKEN_FILE``), then defaults. Unknown keys and
bad values raise ``ValueError`` naming the key, so a typo never silently falls back to a
default.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

DEFAULT_ENDPOINT = "127.0.0.1:50055"
ENV_ENDPOINT = "PEGAFLOW_ENGINE_ENDPOINT"
ENV_INSTANCE_ID = "PEGAFLOW_INSTANCE_ID"
ENV_AUTH_TOKEN_FILE = "PEGAFLOW_AUTH_TOKEN_FILE"
MAX_LEASE_TTL_MS = 600_000  # the server's limit


@dataclass(frozen=True)
class ConnectorConfig:
    """Connector settings; each field is also a ``kv_connector_extra_config`` key."""

    instance_id: str
    """Server-side instance of this vLLM engine. Default: ``PEGAFLOW_INSTANCE_ID``, else
    vLLM's ``engine_id`` (the same in the scheduler and every worker)."""
    endpoint: str = DEFAULT_ENDPOINT
    """``host:port`` (or ``https://host:port``, ``unix:/path.sock``) of the pegaflow-server.
    Default: ``PEGAFLOW_ENGINE_ENDPOINT`` or 127.0.0.1:50055."""
    auth_token_file: str | None = None
    """File holding the server's auth token (needed when the server was started with
    ``--auth-token-file``). Default: ``PEGAFLOW_AUTH_TOKEN_FILE``, else none."""
    namespace: str | None = None
    """Overrides the namespace derived from the model and KV layout. Default: derived."""
    timeout_s: float = 5.0
    """Deadline of worker calls (register, save, load submission), seconds."""
    query_timeout_s: float = 1.0
    """Deadline of the scheduler's lookups, seconds: a slow server costs at most this
    per scheduling decision, then counts as a miss."""
    load_warn_s: float = 30.0
    """A load still running after this many seconds is logged (again every as many
    seconds). It fails only once the server is gone: a live server may still write."""
    retry_interval_s: float = 1.0
    """How often a worker retries registering while the server is unreachable, and how
    long the scheduler stops asking a server that just failed, seconds."""
    loading_wait_s: float = 2.0
    """How long a request waits for blocks the server is copying up from its SSD (vLLM
    asks again each step meanwhile), seconds; after it they count as a miss."""
    lease_ttl_ms: int = 0
    """How long a lookup's hit stays pinned for the load, milliseconds. 0: server default."""
    min_load_blocks: int = 1
    """Smallest hit (in blocks beyond the local prefix cache) worth a load."""
    load_failure_policy: str = "recompute"
    """vLLM's ``kv_load_failure_policy`` set by the connector: "recompute" (a failed
    load is recomputed: the cache is best effort) or "fail" (the request fails)."""
    kv_cache_layout: str = "BLHNC"
    """KV cache layout to ask vLLM for on CUDA: "BLHNC" puts each block of all layers in
    one contiguous run, copied with one DMA. Ignored on CPU."""
    staging: str = "auto"
    """Move KV through a staging buffer on the KV cache's device: the worker gathers a
    chunk of blocks into it (in its own CUDA context) and the server copies whole blocks
    by large DMAs. "auto": where a block is several pieces on a GPU (per-layer tensors);
    "on": always (also on the CPU); "off": never (the server copies each piece). In vLLM
    on the H200 "auto" loads 32K tokens of per-layer KV in 107-110 ms against 131-132
    direct, and a matmul beside its gathers ran no slower (docs/benchmarks.md)."""
    staging_bytes: int = 512 << 20
    """Size of the staging buffer, bytes (device memory beside vLLM's KV cache, taken
    from what ``gpu_memory_utilization`` leaves free): a quarter is one chunk. Measured
    in vLLM on the H200: 32 MiB chunks loaded 32K tokens in 115 ms, 128 MiB in 84 ms."""

    def __post_init__(self) -> None:
        if not self.instance_id:
            raise ValueError("instance_id must not be empty")
        if not self.endpoint:
            raise ValueError("endpoint must not be empty")
        for name in (
            "timeout_s",
            "query_timeout_s",
            "load_warn_s",
            "retry_interval_s",
            "loading_wait_s",
        ):
            value = getattr(self, name)
            if not value > 0:
                raise ValueError(f"{name} must be > 0, got {value!r}")
        if not 0 <= self.lease_ttl_ms <= MAX_LEASE_TTL_MS:
            raise ValueError(
                f"lease_ttl_ms must be in 0..={MAX_LEASE_TTL_MS}, got {self.lease_ttl_ms}"
            )
        if self.min_load_blocks < 1:
            raise ValueError(f"min_load_blocks must be >= 1, got {self.min_load_blocks}")
        if not self.kv_cache_layout:
            raise ValueError("kv_cache_layout must not be empty")
        if self.staging not in ("auto", "on", "off"):
            raise ValueError(f"staging must be 'auto', 'on' or 'off', got {self.staging!r}")
        if self.staging_bytes <= 0:
            raise ValueError(f"staging_bytes must be > 0, got {self.staging_bytes}")
        if self.load_failure_policy not in ("recompute", "fail"):
            raise ValueError(
                "load_failure_policy must be 'recompute' or 'fail', "
                f"got {self.load_failure_policy!r}"
            )

    @classmethod
    def from_sources(
        cls,
        extra: Mapping[str, Any] | None,
        env: Mapping[str, str] | None = None,
        engine_id: str | None = None,
    ) -> ConnectorConfig:
        """Builds the config from vLLM's extra config, the environment and the engine id."""
        env = os.environ if env is None else env
        extra = dict(extra or {})
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(extra) - set(known))
        if unknown:
            raise ValueError(f"unknown PegaKVConnector option(s) {unknown}; known: {sorted(known)}")
        values: dict[str, Any] = {}
        for name, raw in extra.items():
            values[name] = _convert(name, raw, known[name].type)
        values.setdefault("endpoint", env.get(ENV_ENDPOINT) or DEFAULT_ENDPOINT)
        values.setdefault("auth_token_file", env.get(ENV_AUTH_TOKEN_FILE) or None)
        instance_id = values.get("instance_id") or env.get(ENV_INSTANCE_ID) or engine_id
        if not instance_id:
            raise ValueError(
                f"no instance id: set {ENV_INSTANCE_ID} or vLLM's kv_transfer_config.engine_id"
            )
        values["instance_id"] = str(instance_id)
        return cls(**values)


def _convert(name: str, raw: Any, annotation: object) -> Any:
    """Converts one extra-config value (JSON or CLI strings) to the field's type."""
    kind = str(annotation)
    try:
        if kind == "float":
            if isinstance(raw, bool):
                raise TypeError
            return float(raw)
        if kind == "int":
            if isinstance(raw, bool) or (isinstance(raw, float) and not raw.is_integer()):
                raise TypeError
            return int(raw)
        if raw is None and "None" in kind:
            return None
        if not isinstance(raw, str):
            raise TypeError
        return raw
    except (TypeError, ValueError):
        raise ValueError(f"{name}: expected {kind}, got {raw!r}") from None


__all__ = ["DEFAULT_ENDPOINT", "ENV_ENDPOINT", "ENV_INSTANCE_ID", "ConnectorConfig"]
