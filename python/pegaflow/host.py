"""Shared-memory KV tensors for the host (CPU) backend.

With the host backend the server maps the same memory the client computes in, so
"device" memory is shared memory: an anonymous ``memfd`` sealed against shrinking and
growing, which the client hands to the server by descriptor over its Unix socket (the
server never opens a path a client names, and a sealed file cannot be truncated under a
copy). :class:`SharedMemoryRegion` creates such memory and hands out NumPy views of it;
:func:`kv_layer_spec` describes a view as a :class:`~pegaflow.KvLayer` for registration;
:class:`SharedKvCache` does both for a whole model (one memfd, one tensor per layer).
"""

from __future__ import annotations

import contextlib
import fcntl
import mmap
import os
import uuid
from collections.abc import Sequence
from types import TracebackType
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from pegaflow._native import KvLayer

if TYPE_CHECKING:
    from typing_extensions import Self

_ALIGN = 4096
_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL


def sealed_memfd(size: int, name: str) -> int:
    """A new memfd of ``size`` zero bytes, sealed against shrinking, growing and further
    sealing: the descriptor the server accepts as host memory. The caller owns it."""
    fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, size)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, _SEALS)
    except BaseException:
        os.close(fd)
        raise
    return fd


class _Closable:
    """``with`` support for objects with a ``close()``."""

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class SharedMemoryRegion(_Closable):
    """``size`` bytes of sealed shared memory (a memfd named ``name``, as
    ``/memfd:<name>`` in ``/proc/<pid>/maps``), mapped read-write.

    :attr:`fd` is the descriptor registrations hand to the server. :meth:`close` (also on
    ``with`` exit) closes it and drops this mapping; the server keeps its own mapping
    while the memory is registered, so closing here never invalidates a copy.
    """

    def __init__(self, size: int, name: str | None = None) -> None:
        if size <= 0:
            raise ValueError(f"size must be positive, got {size}")
        self.name = name or f"pegaflow-kv-{uuid.uuid4().hex[:12]}"
        self.size = size
        self.fd = sealed_memfd(size, self.name)
        try:
            self._mmap = mmap.mmap(self.fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(self.fd)
            raise
        self._bytes = np.frombuffer(self._mmap, dtype=np.uint8)
        self._closed = False

    @property
    def address(self) -> int:
        """Address of byte 0 in this process."""
        return int(self._bytes.ctypes.data)

    def ndarray(
        self, shape: Sequence[int], dtype: npt.DTypeLike, offset: int = 0
    ) -> npt.NDArray[np.generic]:
        """A C-contiguous view of ``shape`` and ``dtype`` starting at byte ``offset``."""
        dt = np.dtype(dtype)
        nbytes = int(np.prod(shape, dtype=np.int64)) * dt.itemsize
        if offset < 0 or offset + nbytes > self.size:
            raise ValueError(f"{nbytes} bytes at offset {offset} exceed the region ({self.size} B)")
        return self._bytes[offset : offset + nbytes].view(dt).reshape(tuple(shape))

    def close(self) -> None:
        """Closes the descriptor and drops this mapping (the memory itself lives on while
        the server or live views still map it)."""
        if self._closed:
            return
        self._closed = True
        os.close(self.fd)
        # BufferError: views are still alive; the mapping goes away with the last of them.
        with contextlib.suppress(BufferError):
            self._mmap.close()


def kv_layer_spec(
    layer: int,
    region: SharedMemoryRegion,
    array: npt.NDArray[np.generic],
    *,
    block_dim: int,
    kv_dim: int | None = None,
) -> KvLayer:
    """Describes ``array`` (a view into ``region``) as a KV layer for registration.

    ``block_dim`` is the dimension indexing blocks; ``kv_dim`` the size-2 dimension
    separating K and V (None when K and V share one segment per block).
    """
    offset = int(array.ctypes.data) - region.address
    if offset < 0 or offset + array.nbytes > region.size:
        raise ValueError("array is not a view into this shared-memory region")
    itemsize = array.dtype.itemsize
    if any(s % itemsize for s in array.strides):
        raise ValueError(f"strides {array.strides} are not multiples of the item size {itemsize}")
    return KvLayer(
        layer,
        host_fd=region.fd,
        shape=[int(d) for d in array.shape],
        stride=[int(s) // itemsize for s in array.strides],
        element_size=itemsize,
        block_dim=block_dim,
        kv_dim=kv_dim,
        byte_offset=offset,
    )


class SharedKvCache(_Closable):
    """The KV tensors of ``num_layers`` layers, each ``layer_shape``, in one shared file.

    Example (FlashAttention-like ``(2, num_blocks, block_size, heads, head_dim)``)::

        kv = SharedKvCache(32, (2, 1024, 16, 8, 128), np.float16, block_dim=1, kv_dim=0)
        client.register_kv_layers("inst", "ns", 0, 1, kv.layer_specs())
    """

    def __init__(
        self,
        num_layers: int,
        layer_shape: Sequence[int],
        dtype: npt.DTypeLike,
        *,
        block_dim: int,
        kv_dim: int | None = None,
        name: str | None = None,
    ) -> None:
        if num_layers <= 0:
            raise ValueError(f"num_layers must be positive, got {num_layers}")
        dt = np.dtype(dtype)
        layer_bytes = int(np.prod(layer_shape, dtype=np.int64)) * dt.itemsize
        self.layer_stride = -(-layer_bytes // _ALIGN) * _ALIGN
        self.region = SharedMemoryRegion(self.layer_stride * num_layers, name)
        self.block_dim = block_dim
        self.kv_dim = kv_dim
        self.layers: list[npt.NDArray[np.generic]] = [
            self.region.ndarray(layer_shape, dt, i * self.layer_stride) for i in range(num_layers)
        ]

    @property
    def name(self) -> str:
        """Name of the memfd (``/memfd:<name>`` in ``/proc/<pid>/maps``)."""
        return self.region.name

    def layer_specs(self) -> list[KvLayer]:
        """One :class:`~pegaflow.KvLayer` per layer, in order."""
        return [
            kv_layer_spec(i, self.region, a, block_dim=self.block_dim, kv_dim=self.kv_dim)
            for i, a in enumerate(self.layers)
        ]

    def close(self) -> None:
        """Drops the views and closes the memory."""
        self.layers = []
        self.region.close()
