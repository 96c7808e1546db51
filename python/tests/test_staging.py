"""The staging buffer against a real server (host backend): blocks gathered from
per-layer KV tensors are stored in the pool exactly as a direct registration stores
them, and loaded back in ranges of one lease, scattered into other blocks."""

from __future__ import annotations

from typing import Any

import pytest
from conftest import ServerHandle, require_module
from e2e_helpers import random_hashes

from pegaflow import EngineClient, LoadState

torch = require_module("torch")

NUM_BLOCKS = 40
LAYERS = 3
HEADS, BLOCK, CONTENT = 2, 4, 8


def per_layer_caches() -> dict[str, Any]:
    """vLLM-like per-layer ``[blocks, heads, block, content]`` views of one allocation
    (a block of a layer is one run; its layers are far apart)."""
    from pegaflow.connector.registration import describe_kv_caches

    layer_elems = NUM_BLOCKS * HEADS * BLOCK * CONTENT
    raw = torch.randn(layer_elems * LAYERS)
    caches = {
        f"model.layers.{i}.self_attn.attn": raw[i * layer_elems : (i + 1) * layer_elems].view(
            NUM_BLOCKS, HEADS, BLOCK, CONTENT
        )
        for i in range(LAYERS)
    }
    return {"caches": caches, "registration": describe_kv_caches(caches, NUM_BLOCKS)}


def blocks_of(caches: dict[str, Any], ids: list[int]) -> list[Any]:
    return [t[ids].clone() for t in caches.values()]


def load_range(
    client: EngineClient, instance: str, lease: str, slots: list[int], offset: int, more: bool
) -> None:
    state = LoadState()
    client.load(instance, 0, lease, slots, state, lease_offset=offset, more_ranges=more)
    state.wait(20.0)
    assert state.status() == "done"


def test_staged_blocks_are_stored_as_direct_ones_and_load_back_in_ranges(
    server: ServerHandle, client: EngineClient, instance_id: str
) -> None:
    from pegaflow.connector.staging import StagingBuffer

    kv = per_layer_caches()
    caches, registration = kv["caches"], kv["registration"]
    block_bytes = LAYERS * HEADS * BLOCK * CONTENT * 4
    staging = StagingBuffer(registration.tensors, capacity_bytes=4 * block_bytes + 100)
    assert (staging.slots, staging.block_bytes) == (4, block_bytes)
    staged, direct = f"{instance_id}-staged", f"{instance_id}-direct"
    registered = client.register_kv_layers(staged, "ns", 0, 1, staging.layer_specs())
    assert registered == staging.block_bytes
    client.register_kv_layers(direct, "ns", 0, 1, registration.layers)

    # Save 10 scattered blocks through 4 slots: 3 chunks.
    source = [31, 2, 17, 5, 9, 38, 0, 22, 13, 27]
    hashes = random_hashes(len(source))
    originals = blocks_of(caches, source)
    for start in range(0, len(source), staging.slots):
        chunk = source[start : start + staging.slots]
        staging.gather(chunk, 0)
        saved = client.save(staged, 0, list(range(len(chunk))), hashes[start : start + len(chunk)])
        assert saved.saved_blocks == len(chunk)

    # The direct registration reads them as its own: the pool format is the same.
    lease = client.query(direct, hashes).lease_id
    assert lease is not None
    load_range(client, direct, lease, list(range(30, 40)), 0, False)
    for got, want in zip(blocks_of(caches, list(range(30, 40))), originals, strict=True):
        assert torch.equal(got, want)

    # Back through the staging buffer, in ranges of one lease, into other blocks.
    for t in caches.values():
        t[10:20].zero_()
    lease = client.query(staged, hashes).lease_id
    assert lease is not None
    dest = list(range(19, 9, -1))
    for start in range(0, len(dest), staging.slots):
        chunk = dest[start : start + staging.slots]
        last = start + len(chunk) == len(dest)
        load_range(client, staged, lease, list(range(len(chunk))), start, not last)
        staging.scatter(0, chunk)
    for got, want in zip(blocks_of(caches, dest), originals, strict=True):
        assert torch.equal(got, want)
    assert server.metric("pegaflow_leases") == 0


def test_staging_checks_its_bounds() -> None:
    from pegaflow.connector.staging import StagingBuffer

    registration = per_layer_caches()["registration"]
    block_bytes = LAYERS * HEADS * BLOCK * CONTENT * 4
    with pytest.raises(ValueError, match="fewer than 4 blocks"):
        StagingBuffer(registration.tensors, capacity_bytes=3 * block_bytes)
    staging = StagingBuffer(registration.tensors, capacity_bytes=5 * block_bytes)
    with pytest.raises(ValueError, match="outside the 5 staging slots"):
        staging.gather([1, 2], 4)
    with pytest.raises(ValueError, match="outside the 5 staging slots"):
        staging.scatter(-1, [1])
    with pytest.raises(ValueError, match="no KV layers"):
        StagingBuffer([], capacity_bytes=block_bytes)
