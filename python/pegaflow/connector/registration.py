"""vLLM's KV cache tensors → the server's layer descriptions.

vLLM (0.32+) hands the connector one ``[num_blocks, heads, block_size, content]`` view
per attention layer, all views of one allocation (layer after layer, or block after
block with the cross-layer layout). Each block of a layer is one contiguous run, so a
layer registers with ``block_dim=0`` and no separate K/V dimension. CPU tensors are
moved into a sealed memfd in place, all of them together (:mod:`pegaflow.cpu`); CUDA
tensors are shared by IPC handle (:mod:`pegaflow.cuda`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from pegaflow._native import KvLayer
from pegaflow.connector import policy

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class KvRegistration:
    """What a worker registers: one spec per distinct layer tensor, in model order."""

    layer_names: list[str]
    layers: list[KvLayer]
    device_type: str
    layout_factors: list[dict[str, object]]
    """The distinct block layouts of the layers (what makes their bytes differ)."""
    tensors: list[torch.Tensor] = field(default_factory=list)
    """The registered views, one per layer (blocks first, each block one dense run)."""


def _manager_block_view(name: str, tensor: torch.Tensor, num_blocks: int) -> torch.Tensor:
    """The layer viewed with vLLM's (manager) blocks as dimension 0.

    Attention kernels may split a block into ``ratio`` smaller kernel blocks; those are
    consecutive, so grouping them back is a view.
    """
    if tensor.dim() < 1 or tensor.shape[0] == 0:
        raise ValueError(f"{name}: KV tensor of shape {tuple(tensor.shape)} has no blocks")
    rows = int(tensor.shape[0])
    if rows == num_blocks:
        return tensor
    if rows % num_blocks:
        raise ValueError(
            f"{name}: first dimension {rows} is not a multiple of the {num_blocks} KV blocks"
        )
    return tensor.unflatten(0, (num_blocks, rows // num_blocks))


def _dense_blocks(tensor: torch.Tensor) -> torch.Tensor:
    """The layer as ``[blocks, elements]`` when each block is one contiguous run whose
    dimensions are stored in another order than their shape's (vLLM's cross-layer
    tensors are permuted views of the physical buffer): the server copies block bytes
    and needs no interior order. Other tensors are returned as they are."""
    if tensor.dim() < 3:
        return tensor
    interior = sorted(zip(tensor.stride()[1:], tensor.shape[1:], strict=True))
    expected = 1
    for stride, size in interior:
        if size > 1 and stride != expected:
            return tensor  # gaps or overlaps inside a block: not one run
        expected *= size
    if expected != tensor.stride(0) or tensor.is_contiguous():
        return tensor
    return tensor.as_strided((tensor.shape[0], expected), (expected, 1))


def _block_bytes(tensor: torch.Tensor) -> int:
    return int(tensor[0].numel()) * int(tensor.element_size())


def describe_kv_caches(
    kv_caches: Mapping[str, torch.Tensor],
    num_blocks: int,
    held: Sequence[torch.Tensor] = (),
) -> KvRegistration:
    """Describes (and, for CPU tensors, shares) vLLM's per-layer KV views.

    Layers that reuse another layer's cache (KV sharing) are registered once.
    """
    if not kv_caches:
        raise ValueError("no KV cache tensors to register")
    if num_blocks <= 0:
        raise ValueError(f"num_blocks must be positive, got {num_blocks}")
    devices = {t.device.type for t in kv_caches.values()}
    if len(devices) != 1:
        raise ValueError(f"KV caches on several device types: {sorted(devices)}")
    device_type = devices.pop()
    if device_type not in ("cpu", "cuda"):
        raise ValueError(f"KV caches on {device_type!r}: only CPU and CUDA are supported")

    if device_type == "cpu":
        from pegaflow.cpu import share_storages

        # Every view of an allocation moves with it, before any is described: the
        # connector's views and the tensors the layers hold (others on the CPU are
        # someone else's memory and stay).
        cpu_held = [t for t in held if t.device.type == "cpu"]
        share_storages([*kv_caches.values(), *cpu_held])

    # One registered layer per distinct block memory. Views of one buffer (layers that
    # share a cache, and under vLLM's hybrid manager the same-position layers of every
    # group, each viewing the page its own way) are registered once, through the view
    # that spans the most of each block.
    chosen: dict[tuple[int, int], tuple[str, torch.Tensor]] = {}
    factors: list[dict[str, object]] = []
    for name in policy.layer_order(kv_caches):
        tensor = _manager_block_view(name, kv_caches[name], num_blocks)
        identity = (tensor.data_ptr(), tensor.stride(0) * tensor.element_size())
        earlier = chosen.get(identity)
        if earlier is None or _block_bytes(earlier[1]) < _block_bytes(tensor):
            chosen[identity] = (earlier[0] if earlier else name, tensor)
        # Bytes of a block depend on the interior shape, element type and the order of
        # its dimensions in memory, not on where the block sits.
        interior = tensor.stride()[1:]
        factor: dict[str, object] = {
            "shape": list(tensor.shape[1:]),
            "dtype": str(tensor.dtype),
            "order": sorted(range(len(interior)), key=lambda d: -interior[d]),
        }
        if factor not in factors:  # the kinds of layer, not their count
            factors.append(factor)

    names: list[str] = []
    layers: list[KvLayer] = []
    tensors: list[torch.Tensor] = []
    for name, view in chosen.values():
        index = len(layers)
        tensor = _dense_blocks(view)
        tensors.append(tensor)
        if device_type == "cuda":
            from pegaflow.cuda import cuda_layer_spec

            layers.append(cuda_layer_spec(index, tensor, block_dim=0))
        else:
            from pegaflow.cpu import cpu_layer_spec

            layers.append(cpu_layer_spec(index, tensor, block_dim=0))
        names.append(name)
    return KvRegistration(names, layers, device_type, factors, tensors)


__all__ = ["KvRegistration", "describe_kv_caches"]
