"""A bounded staging buffer through which a KV layout of many small pieces per block
moves whole.

With vLLM's per-layer KV tensors a block is one piece per layer (Llama-3.1-8B: 32 pieces
of 64 KiB); the server copying each piece by DMA is bound by per-copy cost, and a gather
kernel in the server's own CUDA context would time-slice the GPU against the engine. So
the worker gathers, in its own context: a chunk of blocks is copied (one indexing
kernel per layer, all of them replayed as one CUDA graph) into the staging buffer, block
after block with each block's layers back to back — exactly the byte order of a block in
the server's pool — and the server then moves whole staged blocks by large DMAs. Loads
run the other way: the server copies into the staging buffer, the worker scatters.

The server sees only the staging buffer: the worker registers one layer per KV layer,
each a view of the buffer (slot ``s`` of layer ``l`` at byte ``s * block_bytes +
offset_l``), so the pool format — and the namespace — are those of the direct
registration, and engines staging and not staging share blocks.

:class:`StagedTransfers` runs a worker's saves and loads through one buffer: its first
half serves saves, its second half loads, each half split in two so that the gather (or
scatter) of one chunk overlaps the server's copy of the other; two save RPCs (or load
ranges) are in flight, so the server's copies follow each other without a gap. A load
takes its lease in ranges (``EngineClient.load``'s ``lease_offset``/``more_ranges``).
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as futures_wait
from typing import TYPE_CHECKING, Any

from pegaflow._native import EngineClient, KvLayer, LoadState
from pegaflow.errors import PegaflowTimeout

logger = logging.getLogger(__name__)

if TYPE_CHECKING:
    import torch

DEFAULT_STAGING_BYTES = 128 << 20
"""Saves and loads each get two chunks of 32 MiB: one is gathered (or scattered) while
the server copies the other."""
MIN_SLOTS = 4
"""Two chunks per direction, of at least one block."""
TIMINGS = (
    "save_gather_wait_s",
    "save_rpc_wait_s",
    "load_issue_s",
    "load_copy_wait_s",
    "load_scatter_wait_s",
)
"""Where a staged transfer's time goes: waiting for a gather, waiting for a save RPC (the
server's copy included), issuing a load range, waiting for the server's copy of a range, waiting
for a scatter."""


def _copy_width(tensors: Sequence[torch.Tensor]) -> int:
    """The widest element (8, 4, 2 or 1 bytes) that every block of every layer starts
    and ends on: a copy kernel moves one element per thread step, so bytes are slow."""
    for width in (8, 4, 2, 1):
        if all(
            t.data_ptr() % width == 0
            and t.untyped_storage().data_ptr() % width == 0
            and (t[0].numel() * t.element_size()) % width == 0
            and (t.stride(0) * t.element_size()) % width == 0
            for t in tensors
        ):
            return width
    return 1


_WIDE = {8: "int64", 4: "int32", 2: "int16", 1: "uint8"}


def _block_rows(tensor: torch.Tensor, width: int) -> torch.Tensor:
    """A registered layer (blocks first, each block one dense run) as ``[blocks, row]``
    of ``width``-byte elements over the same memory."""
    import torch

    size = tensor.element_size()
    row = int(tensor[0].numel()) * size
    stride = int(tensor.stride(0)) * size
    if stride < row:
        raise ValueError("blocks of a KV layer overlap")
    rows = torch.empty(0, dtype=getattr(torch, _WIDE[width]), device=tensor.device)
    offset = tensor.storage_offset() * size
    rows.set_(
        tensor.untyped_storage(),
        offset // width,
        (tensor.shape[0], row // width),
        (stride // width, 1),
    )
    return rows


class StagingBuffer:
    """Slots of whole blocks (every layer of this rank's part of a block, back to back)
    on the KV cache's device, and the per-layer copies in and out of them."""

    def __init__(self, layers: Sequence[torch.Tensor], capacity_bytes: int) -> None:
        """``layers``: the registered KV layers, blocks first, each block one dense run
        (as :func:`~pegaflow.connector.registration.describe_kv_caches` chose them)."""
        import torch

        if not layers:
            raise ValueError("no KV layers to stage")
        width = _copy_width(layers)
        self._rows = [_block_rows(t, width) for t in layers]
        self.layer_bytes = [int(r.shape[1]) * width for r in self._rows]
        self.block_bytes = sum(self.layer_bytes)
        # A chunk never needs more blocks than the KV cache has.
        self.slots = min(capacity_bytes // self.block_bytes, 4 * int(self._rows[0].shape[0]))
        if self.slots < MIN_SLOTS:
            raise ValueError(
                f"a staging buffer of {capacity_bytes} bytes holds fewer than {MIN_SLOTS} "
                f"blocks of {self.block_bytes} bytes"
            )
        self.device = layers[0].device
        shape = (self.slots, self.block_bytes)
        self.buffer = torch.empty(shape, dtype=torch.uint8, device=self.device)
        if self.device.type == "cpu":
            from pegaflow.cpu import share_storages

            share_storages([self.buffer])  # the host backend maps it by file descriptor
        offsets = [sum(self.layer_bytes[:i]) for i in range(len(self.layer_bytes))]
        # Layer l's part of every slot: a strided [slots, layer_bytes] view (registered)
        # and the same as width-byte elements (copied).
        self._slot_views = [
            self.buffer[:, off : off + size]
            for off, size in zip(offsets, self.layer_bytes, strict=True)
        ]
        wide = self.buffer.view(self._rows[0].dtype)
        self._copy_views = [
            wide[:, off // width : (off + size) // width]
            for off, size in zip(offsets, self.layer_bytes, strict=True)
        ]
        self._graphs: dict[tuple[str, int], _ChunkGraph] = {}

    @property
    def capacity_bytes(self) -> int:
        return self.slots * self.block_bytes

    def layer_specs(self) -> list[KvLayer]:
        """What the worker registers instead of its KV tensors: layer ``l`` is the staging
        buffer's layer-``l`` column (blocks = slots)."""
        specs = []
        for index, view in enumerate(self._slot_views):
            if self.device.type == "cuda":
                from pegaflow.cuda import cuda_layer_spec

                specs.append(cuda_layer_spec(index, view, block_dim=0))
            else:
                from pegaflow.cpu import cpu_layer_spec

                specs.append(cpu_layer_spec(index, view, block_dim=0))
        return specs

    def _pairs(
        self, block_ids: Sequence[int], first_slot: int
    ) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Per layer: (its rows, slots ``first_slot..`` of it, the block ids as an index)."""
        import torch

        end = first_slot + len(block_ids)
        if first_slot < 0 or end > self.slots:
            raise ValueError(f"slots {first_slot}..{end} outside the {self.slots} staging slots")
        if not block_ids:
            return []
        index = torch.tensor(block_ids, dtype=torch.long, device=self.device)
        return [
            (rows, column[first_slot:end], index)
            for rows, column in zip(self._rows, self._copy_views, strict=True)
        ]

    def gather(self, block_ids: Sequence[int], first_slot: int) -> None:
        """Copies KV blocks ``block_ids`` into slots ``first_slot..`` (queued on the
        current stream on a GPU)."""
        graph = self._graphs.get(("gather", first_slot))
        if graph is not None and 0 < len(block_ids) <= graph.count:
            graph.replay(block_ids)
            return
        for rows, slots, index in self._pairs(block_ids, first_slot):
            _gather_rows(rows, index, slots)

    def scatter(self, first_slot: int, block_ids: Sequence[int]) -> None:
        """Copies slots ``first_slot..`` into KV blocks ``block_ids`` (queued on the
        current stream on a GPU)."""
        graph = self._graphs.get(("scatter", first_slot))
        if graph is not None and 0 < len(block_ids) <= graph.count:
            # Padding repeats the last (block, slot) pair: the extra slots first get the
            # last slot's bytes, so the repeated writes all write the same bytes.
            n = len(block_ids)
            if n < graph.count:
                self.buffer[first_slot + n : first_slot + graph.count].copy_(
                    self.buffer[first_slot + n - 1].expand(graph.count - n, -1)
                )
            graph.replay(block_ids)
            return
        for rows, slots, index in self._pairs(block_ids, first_slot):
            rows.index_copy_(0, index, slots)

    def capture(self, kind: str, first_slot: int, count: int, stream: torch.cuda.Stream) -> bool:
        """On a GPU, records the per-layer copies of ``kind`` (``"gather"`` into or
        ``"scatter"`` out of slots ``first_slot`` .. ``first_slot + count``) as one CUDA
        graph, so that moving a chunk of up to ``count`` blocks costs one launch instead
        of one per layer (measured: Python's launches took more than the server's copy
        of a 32 MiB chunk). Returns whether it did; where the copies cannot be captured,
        the per-layer launches stay and a warning says so."""
        if self.device.type != "cuda" or count <= 0 or kind not in ("gather", "scatter"):
            return False
        try:
            graph = _ChunkGraph(self, first_slot, count, stream, scatter=kind == "scatter")
        except RuntimeError as e:
            logger.warning("staging copies run without CUDA graphs: %s", e)
            return False
        self._graphs[(kind, first_slot)] = graph
        return True


def _gather_rows(rows: torch.Tensor, index: torch.Tensor, out: torch.Tensor) -> None:
    """``out[i] = rows[index[i]]``. Advanced indexing, not ``index_select``: with up to 16
    indices the latter's kernel ran 4 times slower on the H200 (374 vs 88 µs for 16 rows of
    64 KiB in 32 layers; equal from 32 rows)."""
    import torch

    torch.ops.aten.index.Tensor_out(rows, [index], out=out)


class _ChunkGraph:
    """One chunk's per-layer copies (gather into, or scatter out of, ``count`` slots) as
    a CUDA graph whose block index is a fixed device tensor, refilled before a replay."""

    def __init__(
        self,
        buffer: StagingBuffer,
        first_slot: int,
        count: int,
        stream: torch.cuda.Stream,
        scatter: bool,
    ) -> None:
        import torch

        self.count = count
        self.scatter = scatter
        self.stream = stream
        self.index = torch.zeros(count, dtype=torch.long, device=buffer.device)
        self._host = torch.zeros(count, dtype=torch.long, pin_memory=True)
        pairs = buffer._pairs([0] * count, first_slot)
        self.graph = torch.cuda.CUDAGraph()
        # Capturing records, it does not run: vLLM's block 0 is not written here.
        with torch.cuda.graph(self.graph, stream=stream, capture_error_mode="thread_local"):
            for rows, slots, _ in pairs:
                if scatter:
                    rows.index_copy_(0, self.index, slots)
                else:
                    _gather_rows(rows, self.index, slots)

    def replay(self, block_ids: Sequence[int]) -> None:
        """Queues the copies of ``block_ids`` on the current stream. The caller reuses
        this graph only after the previous replay finished (its index was read)."""
        import torch

        n = len(block_ids)
        self._host[:n] = torch.as_tensor(block_ids, dtype=torch.long)
        # Gather pads with the first block (into slots nobody reads); scatter with the
        # last pair, whose slot the caller copied into the padding slots.
        self._host[n:] = block_ids[-1] if self.scatter else block_ids[0]
        self.index.copy_(self._host, non_blocking=True)
        self.graph.replay()


class _Marks:
    """Where queued GPU work stands: CUDA events on a side stream; on the CPU the work
    is done when queued."""

    def __init__(self, device: Any) -> None:
        import torch

        self._cuda = device.type == "cuda"
        # Low priority: the engine's own kernels go first.
        self.stream = torch.cuda.Stream(device=device, priority=0) if self._cuda else None

    def run(self, work: Callable[..., None], *args: Any) -> Callable[[], None]:
        """Queues ``work(*args)`` on the side stream; returns a wait for it."""
        if self.stream is None:
            work(*args)
            return lambda: None
        import torch

        with torch.cuda.stream(self.stream):
            work(*args)
            event = torch.cuda.Event()
            event.record(self.stream)
        wait: Callable[[], None] = event.synchronize
        return wait


class StagedTransfers:
    """One worker's saves and loads through its staging buffer (each call blocks until
    its chunks are done; one save and one load may run at once)."""

    def __init__(self, buffer: StagingBuffer, load_warn_s: float) -> None:
        self.buffer = buffer
        self.chunk = buffer.slots // 4
        self._save_slots = (0, self.chunk)
        self._load_slots = (2 * self.chunk, 3 * self.chunk)
        # One stream per direction: a load's scatter never queues behind a save's gather.
        self._save_marks = _Marks(buffer.device)
        self._load_marks = _Marks(buffer.device)
        for kind, slots, marks in (
            ("gather", self._save_slots, self._save_marks),
            ("scatter", self._load_slots, self._load_marks),
        ):
            for first in slots:
                if marks.stream is not None:
                    buffer.capture(kind, first, self.chunk, marks.stream)
        self._senders = ThreadPoolExecutor(2, thread_name_prefix="pegaflow-staged-save")
        self._load_warn_s = load_warn_s
        self._states = [LoadState(), LoadState()]
        self.timings: dict[str, float] = dict.fromkeys(TIMINGS, 0.0)
        """Seconds spent, summed over calls, in each step (see :data:`TIMINGS`)."""

    def _timed(self, key: str, call: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return call(*args, **kwargs)
        finally:
            self.timings[key] += time.perf_counter() - start

    def _chunks(self, n: int) -> list[tuple[int, int]]:
        return [(start, min(start + self.chunk, n)) for start in range(0, n, self.chunk)]

    def save(
        self,
        client: EngineClient,
        instance_id: str,
        rank: int,
        block_ids: Sequence[int],
        hashes: Sequence[bytes],
        parents: Sequence[bytes] | None,
    ) -> int:
        """Gathers and saves ``block_ids`` chunk by chunk. Two save RPCs are in flight, so
        the server starts a chunk's copy as soon as the previous one ends, and a half of the
        buffer is gathered again once the save that read it returned. Returns the blocks
        the server copied."""
        chunks = self._chunks(len(block_ids))
        saved = 0

        def gather(k: int) -> Callable[[], None]:
            start, end = chunks[k]
            first = self._save_slots[k % 2]
            return self._save_marks.run(self.buffer.gather, block_ids[start:end], first)

        def send(k: int) -> Future[Any]:
            start, end = chunks[k]
            first = self._save_slots[k % 2]
            return self._senders.submit(
                client.save,
                instance_id,
                rank,
                list(range(first, first + end - start)),
                list(hashes[start:end]),
                parent_hashes=list(parents[start:end]) if parents else None,
            )

        in_flight: deque[Future[Any]] = deque()
        try:
            ready = gather(0) if chunks else None
            for k in range(len(chunks)):
                assert ready is not None
                self._timed("save_gather_wait_s", ready)
                in_flight.append(send(k))
                if k + 1 < len(chunks):
                    if len(in_flight) == 2:  # chunk k - 1's half is gathered into next
                        result = self._timed("save_rpc_wait_s", in_flight.popleft().result)
                        saved += int(result.saved_blocks)
                    ready = gather(k + 1)
            while in_flight:
                result = self._timed("save_rpc_wait_s", in_flight.popleft().result)
                saved += int(result.saved_blocks)
        finally:
            # On an error, the buffer is reused only once no save reads it any more.
            futures_wait(in_flight)
        return saved

    def close(self) -> None:
        """Stops the threads that send saves (after the saves in flight)."""
        self._senders.shutdown(wait=True)

    def load(
        self,
        client: EngineClient,
        instance_id: str,
        rank: int,
        lease_id: str,
        block_ids: Sequence[int],
    ) -> None:
        """Loads the lease's first ``len(block_ids)`` blocks into ``block_ids`` through
        the staging buffer: the server fills one chunk while the worker scatters the
        other. Raises ``PegaflowError`` if a copy fails or the server goes away."""
        chunks = self._chunks(len(block_ids))
        last = len(chunks) - 1

        def issue(k: int) -> None:
            start, end = chunks[k]
            first = self._load_slots[k % 2]
            state = self._states[k % 2]
            state.reset()
            self._timed(
                "load_issue_s",
                client.load,
                instance_id,
                rank,
                lease_id,
                list(range(first, first + end - start)),
                state,
                lease_offset=start,
                more_ranges=k < last,
            )

        for k in range(min(2, len(chunks))):
            self._issue_or_forget(issue, k)
        for k, (start, end) in enumerate(chunks):
            self._timed("load_copy_wait_s", self._wait, self._states[k % 2], lease_id)
            first = self._load_slots[k % 2]
            done = self._load_marks.run(self.buffer.scatter, first, block_ids[start:end])
            if k + 2 < len(chunks):
                # The server may write this half again only once it is scattered.
                self._timed("load_scatter_wait_s", done)
                self._issue_or_forget(issue, k + 2)
            elif k == last:
                self._timed("load_scatter_wait_s", done)

    def _issue_or_forget(self, issue: Callable[[int], None], k: int) -> None:
        try:
            issue(k)
        except BaseException:
            # A load may still be running into the other half: its flag is never reused.
            self._states = [LoadState(), LoadState()]
            raise

    def _wait(self, state: LoadState, lease_id: str) -> None:
        """Waits for one chunk; a slow live server is waited for (it may still write
        into the staging buffer), a failed copy or a dead server raises."""
        while True:
            try:
                state.wait(self._load_warn_s)
                return
            except PegaflowTimeout:
                logger.warning(
                    "staged load of lease %s still running after %.0f s",
                    lease_id,
                    self._load_warn_s,
                )
            except BaseException:
                self._states = [LoadState(), LoadState()]
                raise


__all__ = ["DEFAULT_STAGING_BYTES", "TIMINGS", "StagedTransfers", "StagingBuffer"]
