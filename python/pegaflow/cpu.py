"""Registering CPU torch KV tensors with the server (host backend).

The host backend copies between the server's pool and memory the client computes in,
which the server only accepts as a sealed memfd handed over by descriptor. vLLM on CPU
allocates its KV cache as ordinary process memory, so :func:`share_storages` moves the
tensors' storage into such a memfd *in place*: it copies the bytes into a new memfd-backed
storage and repoints each tensor given (``Tensor.set_``), so the same tensor objects
(vLLM's per-layer views, which its attention layers hold) keep working, now backed by
memory the server can map.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import TYPE_CHECKING

from pegaflow._native import KvLayer
from pegaflow.host import sealed_memfd

if TYPE_CHECKING:
    import torch

# Memfds backing moved storages, by the storage's data address, with the storage itself:
# kept alive as long as the process (a KV cache lives that long too), so an address is
# never reused by other memory while it names a memfd here.
_MEMFDS: dict[int, tuple[int, torch.UntypedStorage]] = {}


def share_storages(tensors: Iterable[torch.Tensor]) -> None:
    """Moves the storages of ``tensors`` into sealed memfds, in place (idempotent).

    Tensors that share a storage keep sharing it. Every tensor that uses a moved storage
    must be passed: one left out keeps the old memory.
    """
    import torch

    groups: dict[int, list[torch.Tensor]] = {}
    for tensor in tensors:
        if tensor.device.type != "cpu":
            raise ValueError(f"tensor is on {tensor.device}, not the CPU")
        storage = tensor.untyped_storage()
        if storage.nbytes() == 0:
            raise ValueError("tensor has an empty storage")
        if storage.data_ptr() not in _MEMFDS:
            groups.setdefault(storage.data_ptr(), []).append(tensor)
    for group in groups.values():
        old = group[0].untyped_storage()
        nbytes = old.nbytes()
        fd = sealed_memfd(nbytes, "pegaflow-cpu-kv")
        try:
            new = torch.UntypedStorage.from_file(f"/proc/self/fd/{fd}", shared=True, nbytes=nbytes)
            new.copy_(old)
            # vLLM allocates KV caches as inference tensors, which only change in this mode.
            with torch.inference_mode():
                for tensor in group:
                    tensor.set_(new, tensor.storage_offset(), tensor.shape, tensor.stride())
        except BaseException:
            os.close(fd)
            raise
        _MEMFDS[new.data_ptr()] = (fd, new)


def share_storage(tensor: torch.Tensor) -> tuple[int, int]:
    """Moves ``tensor``'s storage into a sealed memfd in place (see
    :func:`share_storages`); returns the memfd and the byte offset of the storage in it."""
    share_storages([tensor])
    return _MEMFDS[tensor.untyped_storage().data_ptr()][0], 0


def cpu_layer_spec(
    layer: int, tensor: torch.Tensor, *, block_dim: int, kv_dim: int | None = None
) -> KvLayer:
    """Shares ``tensor``'s storage (see :func:`share_storage`) and describes the tensor
    as a KV layer for registration."""
    fd, data_offset = share_storage(tensor)
    return KvLayer(
        layer,
        host_fd=fd,
        shape=list(tensor.shape),
        stride=list(tensor.stride()),
        element_size=tensor.element_size(),
        block_dim=block_dim,
        kv_dim=kv_dim,
        byte_offset=data_offset + tensor.storage_offset() * tensor.element_size(),
    )


__all__ = ["cpu_layer_spec", "share_storage", "share_storages"]
