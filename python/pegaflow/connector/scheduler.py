"""Scheduler half of the connector: state only, it moves no bytes.

Per request it remembers the cache keys, the last lookup (hit and lease), and how many
blocks have been handed to the workers for saving. Each step it turns that into a
:class:`~pegaflow.connector.metadata.PegaConnectorMetadata`. Every method runs on vLLM's
scheduler thread; only :meth:`SchedulerSide.lookup` talks to the server, with a short
deadline, and a failing server only ever turns into "no hit".
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from pegaflow.connector import policy
from pegaflow.connector.config import ConnectorConfig
from pegaflow.connector.metadata import LoadJob, PegaConnectorMetadata, SaveJob
from pegaflow.errors import PegaflowError, PegaflowNotFound

logger = logging.getLogger(__name__)

MAX_QUIET_S = 30.0


class QueryClient(Protocol):
    """What the scheduler needs of :class:`pegaflow.EngineClient`."""

    def query(
        self, instance_id: str, block_hashes: Sequence[bytes], lease_ttl_ms: int = 0
    ) -> Any: ...
    def release_lease(self, lease_id: str) -> None: ...


@dataclass
class _Lookup:
    """A memoised lookup: ``hit_blocks`` cached blocks after the first ``local_blocks``,
    pinned by ``lease_id`` until ``trusted_until`` (half the lease's lifetime)."""

    local_blocks: int
    hit_blocks: int
    lease_id: str | None
    trusted_until: float


@dataclass
class _RequestState:
    request: Any
    saved_blocks: int = 0
    """Blocks [0, saved_blocks) were handed to the workers for saving (or are stored)."""
    had_saves: bool = False
    lookup: _Lookup | None = None
    block_keys: list[bytes] = field(default_factory=list)
    hashed_blocks: int = 0
    """How many of ``request.block_hashes`` ``block_keys`` covers."""
    last_hash: bytes = b""
    """``request.block_hashes[hashed_blocks - 1]`` when it was converted."""

    def keys(self, blocks_per_hash_block: int) -> list[bytes]:
        hashes = self.request.block_hashes
        n = self.hashed_blocks
        if len(hashes) < n or (n and hashes[n - 1] != self.last_hash):
            # vLLM rewrote the hash list (a streaming-input session dropped tokens): start
            # over, and count as saved only the blocks that kept their key.
            old = self.block_keys
            self.block_keys = policy.block_keys(hashes, blocks_per_hash_block)
            same = next(
                (i for i, (a, b) in enumerate(zip(old, self.block_keys, strict=False)) if a != b),
                min(len(old), len(self.block_keys)),
            )
            self.saved_blocks = min(self.saved_blocks, same)
            self.hashed_blocks = n = len(hashes)
            self.last_hash = hashes[-1] if hashes else b""
        if len(hashes) != n:
            # vLLM appends hashes as tokens arrive; convert only the new ones.
            start = len(self.block_keys) * blocks_per_hash_block
            self.block_keys.extend(policy.block_keys(hashes[start:], blocks_per_hash_block))
            self.hashed_blocks = len(hashes)
            self.last_hash = hashes[-1] if hashes else b""
        return self.block_keys


class SchedulerSide:
    """Lookups, load decisions and save bookkeeping for one vLLM scheduler."""

    def __init__(
        self,
        config: ConnectorConfig,
        client: QueryClient,
        block_size: int,
        hash_block_size: int,
        block_ids_of: Callable[[str], Sequence[int]] | None = None,
        clock: Callable[[], float] = time.monotonic,
        *,
        loads: bool = True,
        saves: bool = True,
    ) -> None:
        if block_size <= 0 or hash_block_size <= 0 or block_size % hash_block_size:
            raise ValueError(
                f"block size {block_size} is not a multiple of "
                f"the hash block size {hash_block_size}"
            )
        self._config = config
        self._client = client
        self._block_size = block_size
        self._blocks_per_hash_block = block_size // hash_block_size
        self._block_ids_of = block_ids_of
        self._clock = clock
        self._loads = loads
        self._saves = saves
        self._requests: dict[str, _RequestState] = {}
        self._pending_loads: list[LoadJob] = []
        self._quiet_until = 0.0
        self._quiet_s = config.retry_interval_s
        self._warned_unavailable = False

    def bind_block_ids(self, block_ids_of: Callable[[str], Sequence[int]]) -> None:
        """Sets how to read a request's allocated block ids (vLLM's KV cache manager)."""
        self._block_ids_of = block_ids_of

    # ---- lookups -------------------------------------------------------------------

    def on_new_request(self, request: Any) -> None:
        """Called by vLLM when a request arrives."""
        self._requests.setdefault(request.request_id, _RequestState(request))

    def get_num_new_matched_tokens(self, request: Any, num_computed_tokens: int) -> int:
        """Tokens past ``num_computed_tokens`` (a block-aligned local hit) that the cache
        can supply. Memoised per request and local hit, so vLLM may call it again."""
        state = self._requests.setdefault(request.request_id, _RequestState(request))
        if not self._loads:
            return 0
        local_blocks = num_computed_tokens // self._block_size
        keys = state.keys(self._blocks_per_hash_block)
        limit = min(policy.max_loadable_blocks(request.num_tokens, self._block_size), len(keys))
        if local_blocks >= limit:
            self._forget_lookup(state)
            return 0
        lookup = state.lookup
        now = self._clock()
        if lookup is None or lookup.local_blocks != local_blocks or now >= lookup.trusted_until:
            self._forget_lookup(state)
            lookup = self._lookup(keys[local_blocks:limit], local_blocks, now)
            state.lookup = lookup
        if not policy.worth_loading(lookup.hit_blocks, self._config.min_load_blocks):
            return 0
        return lookup.hit_blocks * self._block_size

    def _lookup(self, keys: list[bytes], local_blocks: int, now: float) -> _Lookup:
        # A miss is remembered briefly: a request vLLM cannot place yet is asked about
        # again each step, and the answer rarely changes within a second.
        miss = _Lookup(local_blocks, 0, None, now + self._config.retry_interval_s)
        if now < self._quiet_until:
            return miss
        try:
            result = self._client.query(self._config.instance_id, keys, self._config.lease_ttl_ms)
        except PegaflowNotFound:
            # No worker of this instance is registered (yet, or since a server restart).
            return miss
        except PegaflowError as e:
            # Whatever went wrong on the server's side, the scheduler only sees a miss.
            self._server_failed(e)
            return miss
        self._server_ok()
        if not result.hit_blocks:
            return miss
        # A remembered hit is trusted for half its lease, then looked up again.
        trusted_until = now + result.lease_ttl_ms / 2000
        return _Lookup(local_blocks, int(result.hit_blocks), result.lease_id, trusted_until)

    def _server_failed(self, error: PegaflowError) -> None:
        """Stops asking the server for a while, doubling the pause while it keeps failing."""
        self._quiet_until = self._clock() + self._quiet_s
        self._quiet_s = min(self._quiet_s * 2, MAX_QUIET_S)
        if not self._warned_unavailable:
            self._warned_unavailable = True
            logger.warning(
                "pegaflow-server at %s failed (%s): no cache hits until it answers again",
                self._config.endpoint,
                error,
            )

    def _server_ok(self) -> None:
        self._quiet_s = self._config.retry_interval_s
        if self._warned_unavailable:
            self._warned_unavailable = False
            logger.info("pegaflow-server at %s answers again", self._config.endpoint)

    def _forget_lookup(self, state: _RequestState) -> None:
        lookup, state.lookup = state.lookup, None
        if lookup is not None and lookup.lease_id is not None:
            self._release(lookup.lease_id)

    def _release(self, lease_id: str) -> None:
        if self._clock() < self._quiet_until:
            return  # the server is failing: the lease expires on its own
        try:
            self._client.release_lease(lease_id)
        except PegaflowNotFound:
            pass  # already expired or released
        except PegaflowError as e:
            # The lease expires on its own; nothing is lost.
            self._server_failed(e)

    # ---- allocation and per-step metadata ----------------------------------------------

    def update_state_after_alloc(
        self, request: Any, block_ids: Sequence[int], num_external_tokens: int
    ) -> None:
        """vLLM allocated ``block_ids`` (all of the request's blocks) and will take
        ``num_external_tokens`` from the cache: queue the load."""
        state = self._requests.setdefault(request.request_id, _RequestState(request))
        lookup = state.lookup
        if num_external_tokens <= 0:
            if lookup is not None and lookup.hit_blocks > 0:
                self._forget_lookup(state)  # vLLM chose not to load: free the lease now
            return
        if lookup is None or lookup.lease_id is None:
            raise RuntimeError(
                f"request {request.request_id}: {num_external_tokens} external tokens "
                "without a lookup"
            )
        count = min(num_external_tokens // self._block_size, lookup.hit_blocks)
        start = lookup.local_blocks
        destination = list(block_ids[start : start + count])
        if len(destination) != count:
            raise RuntimeError(
                f"request {request.request_id}: {len(block_ids)} blocks allocated, "
                f"need {start + count}"
            )
        state.lookup = None  # the load consumes the lease
        self._pending_loads.append(LoadJob(request.request_id, lookup.lease_id, destination))

    def build_connector_meta(self, scheduler_output: Any) -> PegaConnectorMetadata:
        """This step's loads and saves; called once per step after scheduling."""
        meta = PegaConnectorMetadata(loads=self._pending_loads)
        self._pending_loads = []
        meta.save = self._collect_saves(scheduler_output)
        preempted = set(getattr(scheduler_output, "preempted_req_ids", None) or ())
        for req_id in preempted:
            state = self._requests.get(req_id)
            if state is not None:
                self._forget_lookup(state)
                # The workers finish (or drop, if not started) its saves before vLLM reuses
                # its blocks, and forget them: its end need not wait for them, and its
                # blocks are offered again once recomputed (the server skips stored ones).
                state.had_saves = False
                state.saved_blocks = 0
        meta.preempted_req_ids = preempted
        return meta

    def _collect_saves(self, scheduler_output: Any) -> SaveJob | None:
        if not self._saves:
            return None
        block_ids: list[int] = []
        hashes: list[bytes] = []
        parents: list[bytes] = []
        req_ids: list[str] = []
        seen: set[bytes] = set()
        drafts = getattr(scheduler_output, "scheduled_spec_decode_tokens", None) or {}
        for req_id, num_scheduled in scheduler_output.num_scheduled_tokens.items():
            state = self._requests.get(req_id)
            if state is None:
                continue
            request = state.request
            keys = state.keys(self._blocks_per_hash_block)
            full = policy.blocks_full_after_step(
                request.num_computed_tokens,
                num_scheduled,
                len(drafts.get(req_id, ())),
                self._block_size,
            )
            full = min(full, len(keys))
            if full <= state.saved_blocks:
                continue
            if self._block_ids_of is None:
                raise RuntimeError("build_connector_meta before the KV cache manager was bound")
            ids = self._block_ids_of(req_id)
            for i in range(state.saved_blocks, min(full, len(ids))):
                if keys[i] not in seen:
                    seen.add(keys[i])
                    block_ids.append(ids[i])
                    hashes.append(keys[i])
                    parents.append(keys[i - 1] if i > 0 else b"")
            state.saved_blocks = full
            state.had_saves = True
            req_ids.append(req_id)
        if not block_ids:
            return None
        return SaveJob(block_ids, hashes, req_ids, parents)

    # ---- request end ----------------------------------------------------------------------

    def request_finished(self, request: Any) -> bool:
        """Whether vLLM must keep the request's blocks until the workers report its
        saves done (``finished_sending``)."""
        state = self._requests.pop(request.request_id, None)
        if state is None:
            return False
        self._forget_lookup(state)
        return state.had_saves

    def shutdown(self) -> None:
        """Releases every lease still held."""
        for state in self._requests.values():
            self._forget_lookup(state)
        self._requests.clear()


__all__ = ["QueryClient", "SchedulerSide"]
