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

This module holds the buffer, the gather and the scatter; the worker sequences chunks
(``EngineClient.load``'s ``lease_offset``/``more_ranges`` take a lease in ranges).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from pegaflow._native import KvLayer

if TYPE_CHECKING:
    import torch

DEFAULT_STAGING_BYTES = 64 << 20
"""Two halves of 32 MiB: a chunk is gathered into one while the other is copied."""


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
        if self.slots < 2:
            raise ValueError(
                f"a staging buffer of {capacity_bytes} bytes holds fewer than 2 blocks of "
                f"{self.block_bytes} bytes"
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

    def _check(self, block_ids: Sequence[int], first_slot: int) -> None:
        if first_slot < 0 or first_slot + len(block_ids) > self.slots:
            raise ValueError(
                f"slots {first_slot}..{first_slot + len(block_ids)} outside the "
                f"{self.slots} staging slots"
            )

    def gather(self, block_ids: Sequence[int], first_slot: int) -> None:
        """Copies KV blocks ``block_ids`` into slots ``first_slot..`` (queued on the
        current stream on a GPU)."""
        import torch

        self._check(block_ids, first_slot)
        if not block_ids:
            return
        index = torch.tensor(block_ids, dtype=torch.long, device=self.device)
        end = first_slot + len(block_ids)
        for rows, column in zip(self._rows, self._slot_views, strict=True):
            torch.index_select(rows, 0, index, out=column[first_slot:end])

    def scatter(self, first_slot: int, block_ids: Sequence[int]) -> None:
        """Copies slots ``first_slot..`` into KV blocks ``block_ids`` (queued on the
        current stream on a GPU)."""
        import torch

        self._check(block_ids, first_slot)
        if not block_ids:
            return
        index = torch.tensor(block_ids, dtype=torch.long, device=self.device)
        end = first_slot + len(block_ids)
        for rows, column in zip(self._rows, self._slot_views, strict=True):
            rows.index_copy_(0, index, column[first_slot:end])


__all__ = ["DEFAULT_STAGING_BYTES", "StagingBuffer"]
