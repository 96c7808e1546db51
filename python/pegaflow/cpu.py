"""Registering CPU torch KV tensors with the server (host backend).

The host backend copies between the server's pool and a ``/dev/shm`` file the client
computes in. vLLM on CPU allocates its KV cache as ordinary process memory, so
:func:`share_storage` moves a tensor's storage into shared memory *in place*: torch
copies the bytes into a new ``/dev/shm`` file and repoints the storage, so every
existing tensor and view of it (vLLM's per-layer views, the attention layers' bound
caches) keeps working on the same objects, now backed by memory the server can map.
"""

from __future__ import annotations

import mmap
import os
import secrets
from typing import TYPE_CHECKING

from pegaflow._native import KvLayer
from pegaflow.host import SHM_DIR

if TYPE_CHECKING:
    import torch

# torch keeps a small header (a reference count) in front of the data of its
# shared-memory files; the data offset is measured, never assumed.
_MAX_HEADER = 4096
_MARKER_BYTES = 16


def share_storage(tensor: torch.Tensor) -> tuple[str, int]:
    """Moves ``tensor``'s storage into a ``/dev/shm`` file in place (idempotent).

    Returns the file name (without directory) and the byte offset of the storage's first
    byte inside that file. The file lives until the last tensor using it is freed.
    """
    if tensor.device.type != "cpu":
        raise ValueError(f"tensor is on {tensor.device}, not the CPU")
    storage = tensor.untyped_storage()
    if storage.nbytes() == 0:
        raise ValueError("tensor has an empty storage")
    # The "file_system" sharing strategy names the file; the default "file_descriptor"
    # strategy unlinks it at once, so the server could not open it by name.
    fields = storage._share_filename_cpu_()
    name = bytes(fields[1]).decode().lstrip("/")
    path = os.path.join(SHM_DIR, name)
    if os.sep in name or not os.path.exists(path):
        raise RuntimeError(f"torch placed the shared storage outside {SHM_DIR}: {name!r}")
    offset = os.stat(path).st_size - storage.nbytes()
    if not 0 <= offset <= _MAX_HEADER:
        raise RuntimeError(
            f"{path}: {os.stat(path).st_size} B for a storage of {storage.nbytes()} B"
        )
    _check_data_offset(storage, path, offset)
    return name, offset


def _check_data_offset(storage: torch.UntypedStorage, path: str, offset: int) -> None:
    """Writes a random marker through the tensor and reads it back through the file, so
    a change in torch's file format fails here instead of corrupting blocks later."""
    import torch

    n = min(_MARKER_BYTES, storage.nbytes())
    view = torch.empty(0, dtype=torch.uint8).set_(storage, 0, (n,))
    saved = bytes(view.tolist())
    marker = secrets.token_bytes(n)
    view.copy_(torch.frombuffer(bytearray(marker), dtype=torch.uint8))
    try:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
            seen = m[offset : offset + n]
    finally:
        view.copy_(torch.frombuffer(bytearray(saved), dtype=torch.uint8))
    if seen != marker:
        raise RuntimeError(f"{path}: storage bytes not found at offset {offset}")


def cpu_layer_spec(
    layer: int, tensor: torch.Tensor, *, block_dim: int, kv_dim: int | None = None
) -> KvLayer:
    """Shares ``tensor``'s storage (see :func:`share_storage`) and describes the tensor
    as a KV layer for registration."""
    name, data_offset = share_storage(tensor)
    return KvLayer(
        layer,
        shm_name=name,
        shape=list(tensor.shape),
        stride=list(tensor.stride()),
        element_size=tensor.element_size(),
        block_dim=block_dim,
        kv_dim=kv_dim,
        byte_offset=data_offset + tensor.storage_offset() * tensor.element_size(),
    )


__all__ = ["cpu_layer_spec", "share_storage"]
