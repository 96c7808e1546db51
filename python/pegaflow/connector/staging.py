"""A bounded staging buffer through which a KV layout of many small pieces per block
moves whole.

With vLLM's per-layer KV tensors a block is one piece per layer (Llama-3.1-8B: 32 pieces
of 64 KiB); the server copying each piece by DMA is bound by per-copy cost, and a gather
kernel in the server's own CUDA context would time-slice the GPU against the engine. So
the worker gathers, in its own context: a chunk of blocks is copied (``index_select``,
one launch per layer) into the staging buffer, block after block with each block's
layers back to back — exactly the byte order of a block in the server's pool — and the
server then moves whole staged blocks by large DMAs. Loads run the other way: the server
copies into the staging buffer, the worker scatters (``index_copy_``).

The server sees only the staging buffer: the worker registers one layer per KV layer,
each a view of the buffer (slot ``s`` of layer ``l`` at byte ``s * block_bytes +
offset_l``), so the pool format — and the namespace — are those of the direct
registration, and engines staging and not staging share blocks.

:class:`StagedTransfers` runs a worker's saves and loads through one buffer: its first
half serves saves, its second half loads, each half split in two so that the gather (or
scatter) of one chunk overlaps the server's copy of the other. A load takes its lease in
ranges (``EngineClient.load``'s ``lease_offset``/``more_ranges``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
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


def _block_rows(tensor: torch.Tensor) -> torch.Tensor:
    """A registered layer (blocks first, each block one dense run) as ``[blocks, bytes]``
    of uint8 over the same memory."""
    import torch

    size = tensor.element_size()
    row = int(tensor[0].numel()) * size
    stride = int(tensor.stride(0)) * size
    if stride < row:
        raise ValueError("blocks of a KV layer overlap")
    rows = torch.empty(0, dtype=torch.uint8, device=tensor.device)
    offset = tensor.storage_offset() * size
    rows.set_(tensor.untyped_storage(), offset, (tensor.shape[0], row), (stride, 1))
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
        self._rows = [_block_rows(t) for t in layers]
        self.layer_bytes = [int(r.shape[1]) for r in self._rows]
        self.block_bytes = sum(self.layer_bytes)
        self.slots = capacity_bytes // self.block_bytes
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
        # Layer l's part of every slot: a strided [slots, layer_bytes] view.
        self._slot_views = [
            self.buffer[:, off : off + size]
            for off, size in zip(offsets, self.layer_bytes, strict=True)
        ]

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
            for rows, column in zip(self._rows, self._slot_views, strict=True)
        ]

    def gather(self, block_ids: Sequence[int], first_slot: int) -> None:
        """Copies KV blocks ``block_ids`` into slots ``first_slot..`` (queued on the
        current stream on a GPU)."""
        import torch

        for rows, slots, index in self._pairs(block_ids, first_slot):
            torch.index_select(rows, 0, index, out=slots)

    def scatter(self, first_slot: int, block_ids: Sequence[int]) -> None:
        """Copies slots ``first_slot..`` into KV blocks ``block_ids`` (queued on the
        current stream on a GPU)."""
        for rows, slots, index in self._pairs(block_ids, first_slot):
            rows.index_copy_(0, index, slots)


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
        self._load_warn_s = load_warn_s
        self._states = [LoadState(), LoadState()]

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
        """Gathers and saves ``block_ids`` chunk by chunk; the gather of the next chunk
        runs while the server copies this one. Returns the blocks the server copied."""
        chunks = self._chunks(len(block_ids))
        saved = 0

        def gather(k: int) -> Callable[[], None]:
            start, end = chunks[k]
            first = self._save_slots[k % 2]
            return self._save_marks.run(self.buffer.gather, block_ids[start:end], first)

        ready = gather(0) if chunks else None
        for k, (start, end) in enumerate(chunks):
            assert ready is not None
            ready()
            # The other half is free: the save that read it has returned.
            ready = gather(k + 1) if k + 1 < len(chunks) else None
            first = self._save_slots[k % 2]
            result = client.save(
                instance_id,
                rank,
                list(range(first, first + end - start)),
                list(hashes[start:end]),
                parent_hashes=list(parents[start:end]) if parents else None,
            )
            saved += int(result.saved_blocks)
        return saved

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
            client.load(
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
            self._wait(self._states[k % 2], lease_id)
            first = self._load_slots[k % 2]
            done = self._load_marks.run(self.buffer.scatter, first, block_ids[start:end])
            if k + 2 < len(chunks):
                done()  # the server may write this half again only once it is scattered
                self._issue_or_forget(issue, k + 2)
            elif k == last:
                done()

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


__all__ = ["DEFAULT_STAGING_BYTES", "StagedTransfers", "StagingBuffer"]
