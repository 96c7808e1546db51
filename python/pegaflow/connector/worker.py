"""Worker half of the connector: registers, submits saves and loads, polls completion.

It decides nothing: the scheduler's metadata says what to load and save. Every method
runs on vLLM's model-runner thread and returns quickly:

- saves go to one background thread (FIFO), after the step's KV writes are complete (a
  CUDA event on GPU; CPU steps are synchronous). A request with saves is reported in
  ``finished_sending`` once they are done, so vLLM keeps its blocks until then.
- loads are submitted to the server, which copies and then flips a shared-memory flag
  (:class:`pegaflow.LoadState`) that :meth:`WorkerSide.get_finished` polls. A load that
  fails, or whose server went away (its session ended), is reported through
  :meth:`WorkerSide.take_load_errors`: vLLM then recomputes those blocks. A slow load of
  a live server is waited for (never failed early: the server could still write).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pegaflow._native import EngineClient, LoadState
from pegaflow.connector import policy
from pegaflow.connector.config import ConnectorConfig
from pegaflow.connector.link import RankIdentity, ServerLink
from pegaflow.connector.metadata import LoadJob, PegaConnectorMetadata, SaveJob
from pegaflow.connector.registration import KvRegistration, describe_kv_caches
from pegaflow.connector.staging import StagedTransfers, StagingBuffer
from pegaflow.errors import PegaflowError, PegaflowNotFound

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

_LOAD_STATE_POOL = 64


@dataclass
class _InflightLoad:
    job: LoadJob
    state: LoadState | None
    """The server's completion flag (a direct load)."""
    deadline: float
    issued: float
    staged: Future[None] | None = None
    """The loader thread's run of a staged load."""

    def status(self) -> tuple[str, str | None]:
        """("done" | "failed" | "pending", the error of a failed load)."""
        if self.staged is not None:
            if not self.staged.done():
                return "pending", None
            error = self.staged.exception()
            return ("failed", str(error)) if error else ("done", None)
        assert self.state is not None
        status = self.state.status()
        return status, self.state.error if status == "failed" else None


@dataclass
class WorkerCounters:
    """What this worker did, for logs and tests."""

    loads_ok: int = 0
    loads_failed: int = 0
    saves_submitted: int = 0
    saves_failed: int = 0
    blocks_saved: int = 0
    blocks_loaded: int = 0
    load_wait_s: float = 0.0
    """Summed over finished loads: from the load call until a poll saw it done (the
    copy plus the wait for vLLM's next poll), for benchmarks that split TTFT."""


class WorkerSide:
    """One vLLM worker's (one TP rank's) side of the connector."""

    def __init__(
        self,
        config: ConnectorConfig,
        rank: int,
        world_size: int,
        namespace_factors: Mapping[str, object],
        clock: Callable[[], float] = time.monotonic,
        replicated_kv: bool = False,
        layouts_in_namespace: bool = True,
    ) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        self.config = config
        self._rank = rank
        self._world_size = world_size
        self._namespace_factors = dict(namespace_factors)
        self._replicated_kv = replicated_kv
        self._layouts_in_namespace = layouts_in_namespace
        self._clock = clock
        self.link: ServerLink | None = None
        self.registration: KvRegistration | None = None
        self.kv_caches: dict[str, torch.Tensor] = {}
        """vLLM's per-layer KV views, by layer name (what was registered)."""
        self.counters = WorkerCounters()
        self._cuda = False
        self._saver = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pegaflow-save")
        self._loader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pegaflow-load")
        self.staging: StagedTransfers | None = None
        """Set when blocks move through a staging buffer (config ``staging``)."""
        self._saves: dict[str, list[Future[None]]] = {}
        self._reading: list[tuple[Future[None], frozenset[int]]] = []
        """Saves not known to be done, with the blocks they read (for fences)."""
        self._finishing: set[str] = set()
        self._loads: dict[str, _InflightLoad] = {}
        self._free_states: list[LoadState] = []
        self._recv_done: set[str] = set()
        self._failed_blocks: set[int] = set()
        self._failed_reqs: set[str] = set()

    # ---- registration -----------------------------------------------------------------

    @property
    def namespace(self) -> str | None:
        return None if self.link is None else self.link.identity.namespace

    def register_kv_caches(
        self,
        kv_caches: Mapping[str, torch.Tensor],
        num_blocks: int,
        held: Sequence[torch.Tensor] = (),
    ) -> None:
        """Describes (CPU: moves into shared memory in place, with ``held``, the tensors
        vLLM's layers hold over the same memory) and registers vLLM's KV tensors; if the
        server is not there yet, keeps trying in the background."""
        registration = describe_kv_caches(kv_caches, num_blocks, held)
        self.kv_caches = dict(kv_caches)
        server_layers = registration.layers
        staging = self._make_staging(registration)
        if staging is not None:
            # The server sees only the staging buffer, laid out as the pool's blocks: the
            # namespace and the stored bytes stay those of the KV tensors.
            self.staging = staging
            server_layers = staging.buffer.layer_specs()
        factors = {**self._namespace_factors, "device": registration.device_type}
        if self._layouts_in_namespace:
            # Pipeline stages hold different layers, yet share one namespace: there the
            # factors name the model and layout instead of each stage's shapes.
            factors["layers"] = registration.layout_factors
        namespace = self.config.namespace or policy.namespace(factors)
        self.registration = registration
        self._cuda = registration.device_type == "cuda"
        identity = RankIdentity(
            self.config.instance_id, namespace, self._rank, self._world_size, self._replicated_kv
        )
        client = EngineClient(
            self.config.endpoint, self.config.timeout_s, self.config.auth_token_file
        )
        self.link = ServerLink(client, identity, server_layers, self.config.retry_interval_s)
        self.link.start()

    def _make_staging(self, registration: KvRegistration) -> StagedTransfers | None:
        """The staging buffer and its transfers, where config ``staging`` asks for them;
        ``None`` (blocks copied directly, with a warning) if it cannot be made."""
        mode = self.config.staging
        if mode == "auto":
            wanted = registration.device_type == "cuda" and len(registration.layers) > 1
        else:
            wanted = mode == "on"
        if not wanted:
            return None
        try:
            buffer = StagingBuffer(registration.tensors, self.config.staging_bytes)
        except (RuntimeError, ValueError) as e:  # out of device memory, too small
            logger.warning("no staging buffer, blocks are copied directly: %s", e)
            return None
        staging = StagedTransfers(buffer, self.config.load_warn_s)
        logger.info(
            "staging %d-layer blocks through %d MiB (%d blocks a chunk)",
            len(registration.layers),
            buffer.capacity_bytes >> 20,
            staging.chunk,
        )
        return staging

    # ---- saves --------------------------------------------------------------------------

    def wait_for_save(self, meta: PegaConnectorMetadata) -> None:
        """Submits this step's save (after the forward pass wrote the KV)."""
        job = meta.save
        if job is None:
            return
        link = self.link
        if link is None or not link.registered:
            # Nothing to save into; the requests still get reported as done.
            for req_id in job.req_ids:
                self._saves.setdefault(req_id, [])
            return
        ready = self._record_kv_written()
        future = self._saver.submit(self._save, link, job, ready)
        self._reading.append((future, frozenset(job.block_ids)))
        self.counters.saves_submitted += 1
        for req_id in job.req_ids:
            self._saves.setdefault(req_id, []).append(future)

    def _record_kv_written(self) -> Callable[[], None] | None:
        """A wait for the KV writes queued so far (CUDA); None on CPU, where the forward
        pass has finished writing when vLLM calls ``wait_for_save``."""
        if not self._cuda:
            return None
        import torch

        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream())
        wait: Callable[[], None] = event.synchronize
        return wait

    def _save(self, link: ServerLink, job: SaveJob, ready: Callable[[], None] | None) -> None:
        if ready is not None:
            ready()
        if not link.registered:
            return  # the server went away while this save waited: skip, do not stall
        ident = link.identity
        try:
            if self.staging is not None:
                saved = self.staging.save(
                    link.client,
                    ident.instance_id,
                    ident.rank,
                    job.block_ids,
                    job.block_hashes,
                    job.parent_hashes,
                )
            else:
                result = link.client.save(
                    ident.instance_id,
                    ident.rank,
                    job.block_ids,
                    job.block_hashes,
                    parent_hashes=job.parent_hashes or None,
                )
                saved = int(result.saved_blocks)
        except PegaflowNotFound as e:
            # The server no longer knows this instance (it restarted): register again.
            self.counters.saves_failed += 1
            logger.info("save skipped, server forgot this worker: %s", e)
            link.mark_lost()
        except PegaflowError as e:
            # Best effort: a lost save is a later cache miss, never a wrong answer.
            self.counters.saves_failed += 1
            logger.warning("save of %d blocks failed: %s", len(job.block_ids), e)
        else:
            self.counters.blocks_saved += saved

    def handle_preemptions(self, meta: PegaConnectorMetadata) -> None:
        """Before vLLM hands the blocks of preempted requests to others: drops their saves
        not yet started and waits for the one running (bounded by the call deadline), so
        no save ever reads a reused block. Their saves are then forgotten, as the
        scheduler forgets them."""
        for req_id in meta.preempted_req_ids:
            futures = self._saves.pop(req_id, [])
            self._finishing.discard(req_id)
            running = [f for f in futures if not f.cancel()]
            if running:
                wait_futures(running)
        self._fence(meta.fence_block_ids)

    def _fence(self, block_ids: set[int]) -> None:
        """Waits for the saves that read any of ``block_ids`` (handed to others, or
        overwritten, in the step about to run)."""
        if block_ids:
            reading = [f for f, ids in self._reading if not ids.isdisjoint(block_ids)]
            if reading:
                wait_futures(reading)

    # ---- loads --------------------------------------------------------------------------

    def start_load_kv(self, meta: PegaConnectorMetadata) -> None:
        """Submits this step's loads; completion is polled in :meth:`get_finished`."""
        for job in meta.loads:
            self._start_load(job)

    def _start_load(self, job: LoadJob) -> None:
        if not job.lease_id:
            self._fail_load(job, "its cached blocks were evicted before the load")
            return
        link = self.link
        if link is None or not link.registered:
            self._fail_load(job, "not registered with the server")
            return
        ident = link.identity
        if self.staging is not None:
            issued = self._clock()
            run = self._loader.submit(
                self.staging.load,
                link.client,
                ident.instance_id,
                ident.rank,
                job.lease_id,
                job.block_ids,
            )
            deadline = issued + self.config.load_warn_s
            self._loads[job.req_id] = _InflightLoad(job, None, deadline, issued, staged=run)
            return
        state = self._free_states.pop() if self._free_states else LoadState()
        issued = self._clock()
        try:
            link.client.load(ident.instance_id, ident.rank, job.lease_id, job.block_ids, state)
        except PegaflowError as e:
            self._recycle(state)
            self._fail_load(job, str(e))
            return
        deadline = self._clock() + self.config.load_warn_s
        self._loads[job.req_id] = _InflightLoad(job, state, deadline, issued)

    def _fail_load(self, job: LoadJob, reason: str) -> None:
        logger.warning(
            "load of %d blocks for request %s failed (%s); vLLM recomputes them",
            len(job.block_ids),
            job.req_id,
            reason,
        )
        self.counters.loads_failed += 1
        self._failed_blocks.update(job.block_ids)
        self._failed_reqs.add(job.req_id)
        self._recv_done.add(job.req_id)

    def _recycle(self, state: LoadState) -> None:
        if len(self._free_states) < _LOAD_STATE_POOL:
            state.reset()
            self._free_states.append(state)

    def _poll_loads(self) -> None:
        if not self._loads:
            return
        now = self._clock()
        link = self.link
        server_gone = link is None or not link.client.session_alive(link.identity.instance_id)
        for req_id, load in list(self._loads.items()):
            status, error = load.status()
            if status == "done":
                del self._loads[req_id]
                self.counters.loads_ok += 1
                self.counters.blocks_loaded += len(load.job.block_ids)
                self.counters.load_wait_s += now - load.issued
                self._recv_done.add(req_id)
                if load.state is not None:
                    self._recycle(load.state)
            elif status == "failed":
                del self._loads[req_id]
                self._fail_load(load.job, error or "copy failed")
                if load.state is not None:
                    self._recycle(load.state)
            elif load.staged is not None:
                # The loader thread sees a dead server itself (its flags' sessions): the
                # staged load fails then; until then it may still be scattering.
                continue
            elif server_gone:
                # Never reuse this flag: a server that comes back never writes it, but
                # the old one might have been about to.
                del self._loads[req_id]
                self._fail_load(load.job, "the server went away")
            elif now >= load.deadline:
                # A live server may still be copying into these blocks: failing the load
                # now would let vLLM reuse them under a late write. Keep waiting.
                load.deadline = now + self.config.load_warn_s
                logger.warning(
                    "load for request %s still running after %.0f s",
                    req_id,
                    self.config.load_warn_s,
                )

    # ---- per-step results -------------------------------------------------------------

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str], set[str]]:
        """(requests whose saves are all done, requests whose load finished or failed).

        A request is reported as sending-done only after vLLM said it finished, and only
        if it had saves (exactly those for which the scheduler kept its blocks).
        """
        self._finishing.update(r for r in finished_req_ids if r in self._saves)
        sending: set[str] = set()
        for req_id in list(self._finishing):
            if all(f.done() for f in self._saves[req_id]):
                self._finishing.discard(req_id)
                del self._saves[req_id]
                sending.add(req_id)
        self._reading = [(f, ids) for f, ids in self._reading if not f.done()]  # fences
        # Prune finished futures of running requests so long generations stay small.
        for req_id, futures in self._saves.items():
            if req_id not in self._finishing and len(futures) > 8:
                futures[:] = [f for f in futures if not f.done()]
        self._poll_loads()
        recving, self._recv_done = self._recv_done, set()
        return sending, recving

    def take_load_errors(self) -> set[int]:
        """Block ids whose load failed since the last call."""
        failed, self._failed_blocks = self._failed_blocks, set()
        return failed

    def take_failed_requests(self) -> set[str]:
        """Requests whose load failed since the last call (they are also in the
        loads-finished set of :meth:`get_finished`)."""
        failed, self._failed_reqs = self._failed_reqs, set()
        return failed

    def drain(self, timeout_s: float) -> bool:
        """Waits until every submitted save is done; False if some are still running
        after ``timeout_s`` seconds."""
        pending = [f for futures in self._saves.values() for f in futures if not f.done()]
        _, not_done = wait_futures(pending, timeout=timeout_s)
        return not not_done

    def shutdown(self) -> None:
        """Finishes queued saves, then closes the session (the server drops this rank)."""
        self._saver.shutdown(wait=True)
        self._loader.shutdown(wait=True)
        if self.staging is not None:
            self.staging.close()
        if self.link is not None:
            self.link.close()

    def stats(self) -> dict[str, Any]:
        """Counters, registration state and the registered layout, for logs and tests."""
        registration = self.registration
        return {
            **vars(self.counters),
            "registered": bool(self.link and self.link.registered),
            "registrations": 0 if self.link is None else self.link.registrations,
            "kv_tensors": 0 if registration is None else len(registration.layers),
            "cross_layer": bool(registration and registration.layer_names == ["cross_layers"]),
            "staged": self.staging is not None,
        }


__all__ = ["WorkerCounters", "WorkerSide"]
