"""Scheduler half of the connector: state only, it moves no bytes.

Per request it remembers the cache keys, the last lookup (hit and lease), and how many
blocks have been handed to the workers for saving. Each step it turns that into a
:class:`~pegaflow.connector.metadata.PegaConnectorMetadata`.

A hybrid model (vLLM's hybrid KV cache manager) has several KV cache groups, each with
its own block ids: every group's block at a position is a separate cache entry
(:func:`~pegaflow.connector.policy.group_key`); a hit is the longest prefix every group
can serve (:func:`~pegaflow.connector.policy.hit_plan`), and recurrent groups save only
the boundary states vLLM hands over. Every method runs on vLLM's
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
from pegaflow.connector.policy import FULL_GROUP, CacheGroup, GroupKind
from pegaflow.errors import PegaflowError, PegaflowNotFound

logger = logging.getLogger(__name__)

MAX_QUIET_S = 30.0
MAX_LOOKUP_ROUNDS = 4
"""Queries one hybrid lookup may take: each miss lowers the candidate hit point."""

BlockIds = Sequence[Sequence[int]]
"""A request's block ids, one list per KV cache group (vLLM's ``get_block_ids()``)."""


class QueryClient(Protocol):
    """What the scheduler needs of :class:`pegaflow.EngineClient`."""

    def query(
        self, instance_id: str, block_hashes: Sequence[bytes], lease_ttl_ms: int = 0
    ) -> Any: ...
    def release_lease(self, lease_id: str) -> None: ...


@dataclass
class _Lookup:
    """A memoised lookup: ``hit_blocks`` cached blocks after the first ``local_blocks``,
    pinned by ``lease_id`` until ``trusted_until`` (half the lease's lifetime). The lease
    holds the (group, position) blocks of ``plan``, in that order."""

    local_blocks: int
    hit_blocks: int
    lease_id: str | None
    trusted_until: float
    plan: list[tuple[int, int]] = field(default_factory=list)
    """Empty for a model of one full-attention group: its plan is positions
    ``local_blocks .. local_blocks + hit_blocks`` of group 0, never built as pairs."""
    loading: bool = False
    """The server is copying the first block up from its SSD: ask again shortly."""


@dataclass
class _RequestState:
    request: Any
    saved_blocks: int = 0
    """Blocks [0, saved_blocks) were handed to the workers for saving (or are stored)."""
    had_saves: bool = False
    lookup: _Lookup | None = None
    loading_since: float | None = None
    """When the server first answered "loading" for this request."""
    block_keys: list[bytes] = field(default_factory=list)
    hashed_blocks: int = 0
    """How many of ``request.block_hashes`` ``block_keys`` covers."""
    last_hash: bytes = b""
    """``request.block_hashes[hashed_blocks - 1]`` when it was converted."""
    derived: dict[int, list[bytes]] = field(default_factory=dict)
    """Per KV cache group of a hybrid model, the group's keys of ``block_keys``."""

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
            self.derived.clear()
            self.hashed_blocks = n = len(hashes)
            self.last_hash = hashes[-1] if hashes else b""
        if len(hashes) != n:
            # vLLM appends hashes as tokens arrive; convert only the new ones.
            start = len(self.block_keys) * blocks_per_hash_block
            self.block_keys.extend(policy.block_keys(hashes[start:], blocks_per_hash_block))
            self.hashed_blocks = len(hashes)
            self.last_hash = hashes[-1] if hashes else b""
        return self.block_keys

    def group_keys(self, group: int, num_groups: int, blocks_per_hash_block: int) -> list[bytes]:
        """Cache keys of this request's blocks in KV cache group ``group``."""
        keys = self.keys(blocks_per_hash_block)
        if num_groups == 1:
            return keys
        derived = self.derived.setdefault(group, [])
        derived.extend(policy.group_key(k, group, num_groups) for k in keys[len(derived) :])
        return derived


class SchedulerSide:
    """Lookups, load decisions and save bookkeeping for one vLLM scheduler."""

    def __init__(
        self,
        config: ConnectorConfig,
        client: QueryClient,
        block_size: int,
        hash_block_size: int,
        block_ids_of: Callable[[str], BlockIds] | None = None,
        clock: Callable[[], float] = time.monotonic,
        *,
        loads: bool = True,
        saves: bool = True,
        groups: Sequence[CacheGroup] = (FULL_GROUP,),
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
        if not groups:
            raise ValueError("a model has at least one KV cache group")
        self._groups = list(groups)
        # One full-attention group (dense models): a hit is a run of positions, looked up
        # and loaded without building (group, position) pairs — a 32K-token prompt has
        # 2,048 blocks, handled while vLLM schedules.
        self._dense = len(self._groups) == 1 and self._groups[0].kind is GroupKind.FULL
        self._requests: dict[str, _RequestState] = {}
        self._pending_loads: list[LoadJob] = []
        self._quiet_until = 0.0
        self._quiet_s = config.retry_interval_s
        self._warned_unavailable = False

    @property
    def hybrid(self) -> bool:
        """Whether the model has several KV cache groups."""
        return len(self._groups) > 1

    def _keys(self, state: _RequestState, group: int) -> list[bytes]:
        return state.group_keys(group, len(self._groups), self._blocks_per_hash_block)

    def _plan_keys(self, state: _RequestState, plan: list[tuple[int, int]]) -> list[bytes]:
        """The cache keys of ``plan``'s blocks (each group's key list read once)."""
        keys = {g: self._keys(state, g) for g in {g for g, _ in plan}}
        return [keys[g][p] for g, p in plan]

    def bind_block_ids(self, block_ids_of: Callable[[str], BlockIds]) -> None:
        """Sets how to read a request's allocated block ids, one list per KV cache group
        (vLLM's KV cache manager)."""
        self._block_ids_of = block_ids_of

    # ---- lookups -------------------------------------------------------------------

    def on_new_request(self, request: Any) -> None:
        """Called by vLLM when a request arrives."""
        self._requests.setdefault(request.request_id, _RequestState(request))

    def get_num_new_matched_tokens(self, request: Any, num_computed_tokens: int) -> int | None:
        """Tokens past ``num_computed_tokens`` (a block-aligned local hit) that the cache
        can supply. Memoised per request and local hit, so vLLM may call it again.
        ``None``: the server is copying the prefix up from its SSD; vLLM skips the request
        for this step and asks again (up to ``loading_wait_s``, then it is a miss)."""
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
            lookup = self._lookup(state, local_blocks, limit, now)
            state.lookup = lookup
        if lookup.loading:
            since = state.loading_since = state.loading_since or now
            if now - since < self._config.loading_wait_s:
                return None
            # Waited long enough: a miss, remembered like one.
            state.lookup = _Lookup(local_blocks, 0, None, now + self._config.retry_interval_s)
            return 0
        state.loading_since = None
        if not policy.worth_loading(lookup.hit_blocks, self._config.min_load_blocks):
            return 0
        return lookup.hit_blocks * self._block_size

    def _lookup(self, state: _RequestState, local_blocks: int, limit: int, now: float) -> _Lookup:
        """The longest hit up to block ``limit`` that every group can serve: asks for the
        blocks a hit there needs; a miss at some block lowers the hit point to it."""
        # A miss is remembered briefly: a request vLLM cannot place yet is asked about
        # again each step, and the answer rarely changes within a second.
        miss = _Lookup(local_blocks, 0, None, now + self._config.retry_interval_s)
        if self._dense:
            return self._dense_lookup(state, local_blocks, limit, now, miss)
        only_full = all(g.kind is GroupKind.FULL for g in self._groups)
        end = limit
        for _ in range(MAX_LOOKUP_ROUNDS):
            if now < self._quiet_until or end <= local_blocks:
                return miss
            plan = policy.hit_plan(self._groups, local_blocks, end)
            result = self._query(self._plan_keys(state, plan))
            if result is None:
                return miss
            hit = int(result.hit_blocks)
            if not hit and result.loading:
                # Not remembered (trusted until now): the next call asks again.
                return _Lookup(local_blocks, 0, None, now, loading=True)
            lease_id = result.lease_id if hit else None
            if hit and only_full and hit % len(self._groups) == 0:
                # Full attention only: the hit prefix is a hit by itself.
                end = local_blocks + hit // len(self._groups)
                return self._hit(local_blocks, end, lease_id, plan[:hit], result, now)
            if hit == len(plan):
                return self._hit(local_blocks, end, lease_id, plan, result, now)
            if lease_id:
                self._release(lease_id)
            end = plan[hit][1]  # no hit reaches past the first missing block
            if not policy.worth_loading(end - local_blocks, self._config.min_load_blocks):
                return miss
        return miss

    def _dense_lookup(
        self, state: _RequestState, local_blocks: int, limit: int, now: float, miss: _Lookup
    ) -> _Lookup:
        if now < self._quiet_until:
            return miss
        result = self._query(state.keys(self._blocks_per_hash_block)[local_blocks:limit])
        if result is None:
            return miss
        hit = int(result.hit_blocks)
        if not hit:
            # "Loading" is not remembered (trusted until now): the next call asks again.
            return _Lookup(local_blocks, 0, None, now, loading=True) if result.loading else miss
        return self._hit(local_blocks, local_blocks + hit, result.lease_id, [], result, now)

    def _hit(
        self,
        local_blocks: int,
        end: int,
        lease_id: str | None,
        plan: list[tuple[int, int]],
        result: Any,
        now: float,
    ) -> _Lookup:
        # A remembered hit is trusted for half its lease, then looked up again.
        trusted_until = now + result.lease_ttl_ms / 2000
        return _Lookup(local_blocks, end - local_blocks, lease_id, trusted_until, plan)

    def _query(self, keys: list[bytes]) -> Any:
        """The server's answer for ``keys``, or None when it cannot be asked."""
        try:
            result = self._client.query(self._config.instance_id, keys, self._config.lease_ttl_ms)
        except PegaflowNotFound:
            # No worker of this instance is registered (yet, or since a server restart).
            return None
        except PegaflowError as e:
            # Whatever went wrong on the server's side, the scheduler only sees a miss.
            self._server_failed(e)
            return None
        self._server_ok()
        return result

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
        self, request: Any, block_ids: BlockIds, num_external_tokens: int
    ) -> None:
        """vLLM allocated ``block_ids`` (all of the request's blocks, one list per group)
        and will take ``num_external_tokens`` from the cache: queue the load."""
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
        state.lookup = None  # the load consumes (or replaces) the lease
        start = lookup.local_blocks
        end = start + min(num_external_tokens // self._block_size, lookup.hit_blocks)
        lease_id: str | None = lookup.lease_id
        if self._dense:
            destination = self._dense_destination(request.request_id, block_ids, start, end)
        else:
            plan = self._allocated_plan(request.request_id, block_ids, start, end)
            if plan != lookup.plan[: len(plan)]:
                # vLLM kept other blocks of a windowed or recurrent group than the lookup
                # planned (a load takes a prefix of its lease, no more): lease exactly the
                # blocks it kept.
                self._release(lookup.lease_id)
                lease_id = self._lease_exactly(state, plan)
            destination = [block_ids[g][p] for g, p in plan]
        if lease_id is None:
            logger.warning(
                "request %s: the cached blocks vLLM allocated for are gone; it recomputes them",
                request.request_id,
            )
            lease_id = ""  # the workers report these blocks as failed loads
        elif state.saved_blocks >= start:
            # The loaded blocks are stored already: offering them back would only make the
            # server look them up to skip them, and vLLM hold them until it has.
            state.saved_blocks = max(state.saved_blocks, end)
        self._pending_loads.append(LoadJob(request.request_id, lease_id, destination))

    def _dense_destination(
        self, req_id: str, block_ids: BlockIds, start: int, end: int
    ) -> list[int]:
        """The blocks vLLM allocated for positions [start, end) of a one-group model."""
        if len(block_ids) != 1:
            raise RuntimeError(
                f"request {req_id}: {len(block_ids)} block-id groups, the model has 1"
            )
        destination = list(block_ids[0][start:end])
        if len(destination) != end - start or 0 in destination:
            raise RuntimeError(
                f"request {req_id}: no block allocated for some of positions {start}..{end}"
            )
        return destination

    def _allocated_plan(
        self, req_id: str, block_ids: BlockIds, start: int, end: int
    ) -> list[tuple[int, int]]:
        """The (group, position) blocks of a hit [start, end) that vLLM allocated, in
        :func:`~pegaflow.connector.policy.hit_plan` order: every position of a full
        group, the non-null blocks of the others (vLLM's null block 0 stands for a block
        out of a window or an interior recurrent state)."""
        if len(block_ids) != len(self._groups):
            raise RuntimeError(
                f"request {req_id}: {len(block_ids)} block-id groups, "
                f"the model has {len(self._groups)}"
            )

        def allocated(g: int, p: int) -> bool:
            return p < len(block_ids[g]) and block_ids[g][p] != 0

        plan = policy.hit_plan(self._groups, start, end, kept=allocated)
        missing = [(g, p) for g, p in plan if p >= len(block_ids[g]) or block_ids[g][p] == 0]
        if missing:
            raise RuntimeError(f"request {req_id}: no block allocated for {missing[:4]}")
        return plan

    def _lease_exactly(self, state: _RequestState, plan: list[tuple[int, int]]) -> str | None:
        """A lease on exactly ``plan``'s blocks, or None if one of them is not cached."""
        if not plan:
            return None
        result = self._query(self._plan_keys(state, plan))
        if result is None or int(result.hit_blocks) != len(plan):
            if result is not None and result.hit_blocks:
                self._release(result.lease_id)
            return None
        return str(result.lease_id)

    def build_connector_meta(self, scheduler_output: Any) -> PegaConnectorMetadata:
        """This step's loads and saves; called once per step after scheduling."""
        meta = PegaConnectorMetadata(loads=self._pending_loads)
        self._pending_loads = []
        meta.save = self._collect_saves(scheduler_output)
        if self.hybrid:
            meta.fence_block_ids = _allocated_this_step(scheduler_output)
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
        job = _SaveBuilder()
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
            block_ids = self._block_ids_of(req_id)
            for g, group in enumerate(self._groups):
                if group.kind is GroupKind.STATE:
                    continue  # only the boundary states vLLM hands over are whole
                ids, group_keys = block_ids[g], self._keys(state, g)
                windowed = group.kind is GroupKind.SLIDING
                for i in range(state.saved_blocks, min(full, len(ids))):
                    if windowed and ids[i] == 0:
                        continue  # vLLM's null block: out of the window already
                    job.add(ids[i], group_keys[i], group_keys[i - 1] if i > 0 else b"")
            state.saved_blocks = full
            state.had_saves = True
            job.req_ids.append(req_id)
        self._collect_boundary_states(scheduler_output, job)
        return job.build()

    def _collect_boundary_states(self, scheduler_output: Any, job: _SaveBuilder) -> None:
        """Recurrent states at block boundaries, which vLLM hands over in the step that
        writes them (``boundary_state_offloads``: ``{req: [(group, block, tokens)]}``).
        The block holds that state only until its request moves on, so the save is
        queued with this step's and the workers fence the block against reuse."""
        block_state = getattr(scheduler_output, "kv_connector_block_state", None)
        offloads = getattr(block_state, "boundary_state_offloads", None) or {}
        for req_id, entries in offloads.items():
            state = self._requests.get(req_id)
            if state is None:
                continue
            added = False
            for g, block_id, tokens in entries:
                if not 0 <= g < len(self._groups) or self._groups[g].kind is not GroupKind.STATE:
                    continue
                position = tokens // self._block_size - 1
                group_keys = self._keys(state, g)
                if (
                    block_id == 0
                    or tokens % self._block_size
                    or not 0 <= position < len(group_keys)
                ):
                    continue
                added = job.add(block_id, group_keys[position], b"") or added
            if added:
                state.had_saves = True
                if req_id not in job.req_ids:
                    job.req_ids.append(req_id)

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


class _SaveBuilder:
    """One step's save job, each key once."""

    def __init__(self) -> None:
        self.block_ids: list[int] = []
        self.hashes: list[bytes] = []
        self.parents: list[bytes] = []
        self.req_ids: list[str] = []
        self._seen: set[bytes] = set()

    def add(self, block_id: int, key: bytes, parent: bytes) -> bool:
        if key in self._seen:
            return False
        self._seen.add(key)
        self.block_ids.append(block_id)
        self.hashes.append(key)
        self.parents.append(parent)
        return True

    def build(self) -> SaveJob | None:
        if not self.block_ids:
            return None
        return SaveJob(self.block_ids, self.hashes, self.req_ids, self.parents)


def _allocated_this_step(scheduler_output: Any) -> set[int]:
    """Blocks vLLM hands out (or overwrites) in this step: a save still reading one of
    them must finish before the step runs. A hybrid model frees blocks mid-request
    (out of a window, superseded recurrent states), so they can be reused at once."""
    fenced: set[int] = set()
    for new in getattr(scheduler_output, "scheduled_new_reqs", None) or ():
        for ids in new.block_ids or ():
            fenced.update(ids)
    cached = getattr(scheduler_output, "scheduled_cached_reqs", None)
    for groups in getattr(cached, "new_block_ids", None) or ():
        for ids in groups or ():
            fenced.update(ids)
    for copy in getattr(scheduler_output, "kv_cache_block_copies", None) or ():
        fenced.add(int(copy.dst_block_id))
    fenced.update(getattr(scheduler_output, "new_block_ids_to_zero", None) or ())
    fenced.discard(0)
    return fenced


__all__ = ["QueryClient", "SchedulerSide"]
