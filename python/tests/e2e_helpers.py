"""Helpers shared by the end-to-end tests: KV caches, hashes, byte-exact checks, loads."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from pegaflow import EngineClient, LoadState, SharedKvCache

# Llama-like layer: (K/V, num_blocks, block_size, kv_heads, head_dim), float16.
# One K or V segment of one block is 16 * 2 * 32 * 2 B = 2 KiB; one block of one rank
# over 32 layers is 32 * 2 * 2 KiB = 128 KiB.
LLAMA_LAYERS = 32
LLAMA_BLOCK_SIZE = 16
LLAMA_KV_HEADS = 2
LLAMA_HEAD_DIM = 32
LLAMA_SEGMENT_BYTES = LLAMA_BLOCK_SIZE * LLAMA_KV_HEADS * LLAMA_HEAD_DIM * 2
LLAMA_BLOCK_BYTES = LLAMA_LAYERS * 2 * LLAMA_SEGMENT_BYTES

U8Array = npt.NDArray[np.uint8]


def make_kv_cache(
    *,
    num_layers: int = LLAMA_LAYERS,
    num_blocks: int = 1024,
    block_size: int = LLAMA_BLOCK_SIZE,
    kv_heads: int = LLAMA_KV_HEADS,
    head_dim: int = LLAMA_HEAD_DIM,
    seed: int | None = 0,
) -> SharedKvCache:
    """A FlashAttention-like SharedKvCache ``(2, num_blocks, block_size, heads, head_dim)``
    float16 per layer (block_dim=1, kv_dim=0), filled with random bytes from ``seed``
    (left zero when ``seed`` is None)."""
    kv = SharedKvCache(
        num_layers,
        (2, num_blocks, block_size, kv_heads, head_dim),
        np.float16,
        block_dim=1,
        kv_dim=0,
    )
    if seed is not None:
        rng = np.random.default_rng(seed)
        for layer in kv.layers:
            flat = layer.view(np.uint8).reshape(-1)
            flat[...] = rng.integers(0, 256, size=flat.size, dtype=np.uint8)
    return kv


def block_bytes(kv: SharedKvCache) -> int:
    """Bytes one block of ``kv`` takes over all layers (K and V)."""
    return sum(int(layer[:, 0].nbytes) for layer in kv.layers)


@dataclass
class FakeRequest:
    """What the connector's scheduler half reads of a vLLM request."""

    request_id: str
    num_tokens: int
    block_hashes: list[bytes]
    num_computed_tokens: int = 0


def random_hashes(n: int, rng: np.random.Generator | None = None) -> list[bytes]:
    """``n`` distinct random 32-byte block hashes."""
    if rng is None:
        return [os.urandom(32) for _ in range(n)]
    return [rng.bytes(32) for _ in range(n)]


def layer_u8(kv: SharedKvCache, layer: int) -> U8Array:
    """Layer ``layer`` of ``kv`` as raw bytes (float16 NaNs must not spoil comparisons)."""
    view: U8Array = kv.layers[layer].view(np.uint8)
    return view


def snapshot(kv: SharedKvCache, block_ids: Sequence[int]) -> list[U8Array]:
    """Copies of every layer's K and V bytes of ``block_ids`` (in that order)."""
    ids = np.asarray(block_ids, dtype=np.int64)
    return [layer_u8(kv, i)[:, ids].copy() for i in range(len(kv.layers))]


def zero_blocks(kv: SharedKvCache, block_ids: Sequence[int]) -> None:
    """Zeroes K and V of ``block_ids`` in every layer."""
    ids = np.asarray(block_ids, dtype=np.int64)
    for i in range(len(kv.layers)):
        layer_u8(kv, i)[:, ids] = 0


def assert_blocks_equal(
    kv: SharedKvCache,
    block_ids: Sequence[int],
    expected: Sequence[U8Array],
    what: str = "",
) -> None:
    """Every layer's K and V bytes of ``block_ids`` equal ``expected`` (a snapshot)."""
    ids = np.asarray(block_ids, dtype=np.int64)
    assert len(expected) == len(kv.layers)
    for i, want in enumerate(expected):
        got = layer_u8(kv, i)[:, ids]
        if not np.array_equal(got, want):
            bad = [
                int(ids[b])
                for b in range(len(ids))
                if not np.array_equal(got[:, b], want[:, b])  # per destination block
            ]
            raise AssertionError(
                f"{what}: layer {i}: {len(bad)} of {len(ids)} blocks differ, first {bad[:8]}"
            )


def load_blocks(
    client: EngineClient,
    instance_id: str,
    tp_rank: int,
    lease_id: str,
    block_ids: Sequence[int],
    layers: Sequence[int] | None = None,
    timeout_s: float = 20.0,
) -> LoadState:
    """Loads the first ``len(block_ids)`` leased blocks into ``block_ids`` and waits."""
    state = LoadState()
    queued = client.load(instance_id, tp_rank, lease_id, list(block_ids), state, layers)
    assert queued == len(block_ids)
    state.wait(timeout_s)
    assert state.status() == "done"
    assert state.is_done()
    assert state.error is None
    return state


def wait_until(
    predicate: Callable[[], bool], timeout_s: float = 10.0, interval_s: float = 0.05
) -> bool:
    """Polls ``predicate`` until it holds or ``timeout_s`` passes; returns the last value."""
    deadline = time.monotonic() + timeout_s
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval_s)
