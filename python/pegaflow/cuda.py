"""Registering CUDA KV tensors with the server (CUDA backend).

The server opens the client's GPU memory through a CUDA IPC handle: the raw 64-byte
``cudaIpcMemHandle_t`` of the tensor's allocation, the byte offset of its storage inside
that allocation, and the GPU's UUID (so the server finds the right device whatever
``CUDA_VISIBLE_DEVICES`` says). No pickle and no torch in the server.

vLLM layouts (``block_dim`` / ``kv_dim``):

- FlashAttention NHD, one tensor per layer ``(2, num_blocks, block_size, heads, dim)``:
  ``block_dim=1, kv_dim=0``
- blocks first ``(num_blocks, 2, block_size, heads, dim)``: ``block_dim=0, kv_dim=1``
- cross-layer single tensor ``(num_blocks, layers, 2, ...)``: pass ``kv[:, i]`` for layer
  ``i`` with ``block_dim=0, kv_dim=1`` (strides carry the interleaving).
"""

from __future__ import annotations

import uuid
from typing import TYPE_CHECKING

from pegaflow._native import KvLayer

if TYPE_CHECKING:
    import torch

# torch's _share_cuda_() handle: version byte, type byte, then the 64-byte IPC handle.
_HANDLE_BYTES = 66
_TYPE_IPC = b"c"


def device_uuid(device: torch.device | int) -> bytes:
    """The 16-byte UUID of a CUDA device, as the driver reports it."""
    import torch

    raw = torch.cuda.get_device_properties(device).uuid
    data = getattr(raw, "bytes", None)
    if isinstance(data, bytes) and len(data) == 16:
        return data
    return uuid.UUID(str(raw)).bytes


def cuda_layer_spec(
    layer: int, tensor: torch.Tensor, *, block_dim: int, kv_dim: int | None = None
) -> KvLayer:
    """Describes a CUDA KV tensor (or a strided view of one) for registration."""
    if not tensor.is_cuda:
        raise ValueError(f"layer {layer}: tensor is on {tensor.device}, not a CUDA device")
    storage = tensor.untyped_storage()
    fields = storage._share_cuda_()
    handle, storage_size, storage_offset = bytes(fields[1]), int(fields[2]), int(fields[3])
    if len(handle) != _HANDLE_BYTES or handle[1:2] != _TYPE_IPC:
        raise ValueError(
            f"layer {layer}: this allocation cannot be shared by CUDA IPC "
            "(PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True is not supported)"
        )
    return KvLayer(
        layer,
        shape=list(tensor.shape),
        stride=list(tensor.stride()),
        element_size=tensor.element_size(),
        block_dim=block_dim,
        kv_dim=kv_dim,
        byte_offset=tensor.storage_offset() * tensor.element_size(),
        cuda_ipc_handle=handle[2:],
        device_uuid=device_uuid(tensor.device),
        region_offset=storage_offset,
        region_size=storage_size,
    )


def cuda_layer_specs(
    tensors: list[torch.Tensor], *, block_dim: int, kv_dim: int | None = None
) -> list[KvLayer]:
    """One spec per layer tensor, in order."""
    return [
        cuda_layer_spec(i, t, block_dim=block_dim, kv_dim=kv_dim) for i, t in enumerate(tensors)
    ]
