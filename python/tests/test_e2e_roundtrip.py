"""Save → query → load round trips through a real server, checked byte for byte."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import KvFactory, ServerHandle
from e2e_helpers import (
    LLAMA_BLOCK_BYTES,
    LLAMA_LAYERS,
    assert_blocks_equal,
    block_bytes,
    load_blocks,
    random_hashes,
    snapshot,
    zero_blocks,
)

from pegaflow import EngineClient, LoadState, PegaflowInvalidArgument

NUM_SAVED = 256


def test_single_rank_roundtrip(
    server: ServerHandle, client: EngineClient, kv_cache: KvFactory, instance_id: str
) -> None:
    kv = kv_cache(num_blocks=1024, seed=1)
    assert block_bytes(kv) == LLAMA_BLOCK_BYTES == 128 * 1024
    registered = client.register_kv_layers(instance_id, "llama", 0, 1, kv.layer_specs())
    assert registered == LLAMA_BLOCK_BYTES

    rng = np.random.default_rng(11)
    hashes = random_hashes(NUM_SAVED, rng)
    src_ids = list(range(NUM_SAVED))
    originals = snapshot(kv, src_ids)

    result = client.save(instance_id, 0, src_ids, hashes)
    assert (result.saved_blocks, result.sealed_blocks) == (NUM_SAVED, NUM_SAVED)
    assert (result.skipped_blocks, result.evicted_blocks) == (0, 0)
    metrics = server.metrics()
    assert metrics["pegaflow_cache_blocks"] == NUM_SAVED
    assert metrics["pegaflow_cache_sealed_blocks"] == NUM_SAVED
    assert metrics["pegaflow_saved_blocks_total"] == NUM_SAVED
    assert metrics["pegaflow_pool_used_bytes"] >= NUM_SAVED * LLAMA_BLOCK_BYTES

    # Misses and prefix hits.
    unknown = random_hashes(1, rng)[0]
    miss = client.query(instance_id, [unknown, *hashes])
    assert (miss.hit_blocks, miss.lease_id, miss.tiers) == (0, None, [])
    prefix = client.query(instance_id, [*hashes[:100], unknown, *hashes[100:]])
    assert prefix.hit_blocks == 100
    assert prefix.tiers == ["ram"] * 100
    assert prefix.lease_id is not None
    client.release_lease(prefix.lease_id)
    assert client.query(instance_id, []).hit_blocks == 0

    # Full hit, loaded into other block ids in order.
    full = client.query(instance_id, hashes)
    assert full.hit_blocks == NUM_SAVED
    assert full.lease_id is not None
    dest = list(range(600, 600 + NUM_SAVED))
    zero_blocks(kv, dest)
    untouched_ids = list(range(NUM_SAVED, 600)) + list(range(600 + NUM_SAVED, 1024))
    untouched = snapshot(kv, untouched_ids)
    load_blocks(client, instance_id, 0, full.lease_id, dest)
    assert_blocks_equal(kv, dest, originals, "load into 600..855")
    assert_blocks_equal(kv, src_ids, originals, "source blocks after load")
    assert_blocks_equal(kv, untouched_ids, untouched, "blocks outside the destination")

    # A shuffled destination: leased block i lands in perm[i].
    perm = [int(i) for i in rng.permutation(np.arange(300, 1024))[:NUM_SAVED]]
    again = client.query(instance_id, hashes)
    assert again.hit_blocks == NUM_SAVED and again.lease_id is not None
    zero_blocks(kv, perm)
    load_blocks(client, instance_id, 0, again.lease_id, perm)
    assert_blocks_equal(kv, perm, originals, "load into a shuffled permutation")

    # Only the first len(dest) leased blocks: hashes[0:10] into 1000..1009.
    part = client.query(instance_id, hashes)
    assert part.lease_id is not None
    few = list(range(1000, 1010))
    zero_blocks(kv, few)
    load_blocks(client, instance_id, 0, part.lease_id, few)
    assert_blocks_equal(kv, few, [o[:, :10] for o in originals], "partial load")

    metrics = server.metrics()
    assert metrics["pegaflow_loaded_blocks_total"] == 2 * NUM_SAVED + 10
    assert metrics['pegaflow_transfer_failures_total{direction="load",backend="host"}'] == 0
    assert metrics["pegaflow_leases"] == 0, "a single-rank load releases its lease"


def test_a_lease_loads_in_ranges(
    server: ServerHandle, client: EngineClient, kv_cache: KvFactory, instance_id: str
) -> None:
    """A rank may load its lease in forward ranges (a bounded staging buffer does); the
    lease stays for the ranges still to come and goes with the last."""
    kv = kv_cache(num_blocks=64, seed=4)
    client.register_kv_layers(instance_id, "ranges", 0, 1, kv.layer_specs())
    hashes = random_hashes(12)
    originals = snapshot(kv, list(range(12)))
    client.save(instance_id, 0, list(range(12)), hashes)
    lease = client.query(instance_id, hashes).lease_id
    assert lease is not None

    def load_range(dest: list[int], offset: int, more: bool) -> None:
        state = LoadState()
        queued = client.load(
            instance_id, 0, lease, dest, state, lease_offset=offset, more_ranges=more
        )
        assert queued == len(dest)
        state.wait(20.0)
        assert state.status() == "done"

    dest = list(range(40, 52))
    zero_blocks(kv, dest)
    load_range(dest[:5], 0, True)
    assert server.metric("pegaflow_leases") == 1, "more ranges to come: the lease stays"
    with pytest.raises(PegaflowInvalidArgument, match="ranges go forward"):
        client.load(instance_id, 0, lease, [60], LoadState(), lease_offset=4, more_ranges=True)
    with pytest.raises(PegaflowInvalidArgument, match="outside a lease of 12 blocks"):
        client.load(instance_id, 0, lease, [60, 61], LoadState(), lease_offset=11)
    load_range(dest[5:], 5, False)
    assert_blocks_equal(kv, dest, originals, "two ranges of one lease")
    assert server.metric("pegaflow_leases") == 0, "the last range released the lease"


def test_read_your_writes(client: EngineClient, kv_cache: KvFactory, instance_id: str) -> None:
    kv = kv_cache(num_blocks=64, seed=2)
    client.register_kv_layers(instance_id, "ryw", 0, 1, kv.layer_specs())
    hashes = random_hashes(40)
    for i, h in enumerate(hashes):
        client.save(instance_id, 0, [i], [h])
        q = client.query(instance_id, hashes[: i + 1])
        assert q.hit_blocks == i + 1, f"block {i} not visible right after its save"
        assert q.lease_id is not None
        client.release_lease(q.lease_id)


def test_resave_is_skipped(
    server: ServerHandle, client: EngineClient, kv_cache: KvFactory, instance_id: str
) -> None:
    kv = kv_cache(num_blocks=64, seed=3)
    client.register_kv_layers(instance_id, "skip", 0, 1, kv.layer_specs())
    hashes = random_hashes(16)
    first = client.save(instance_id, 0, list(range(16)), hashes)
    assert (first.saved_blocks, first.sealed_blocks, first.skipped_blocks) == (16, 16, 0)
    # Same hashes again (even from other block ids): nothing is copied.
    again = client.save(instance_id, 0, list(range(20, 36)), hashes)
    assert (again.saved_blocks, again.sealed_blocks, again.skipped_blocks) == (0, 0, 16)
    # A mix of stored and new blocks.
    mixed = client.save(instance_id, 0, list(range(40, 48)), hashes[:4] + random_hashes(4))
    assert (mixed.saved_blocks, mixed.sealed_blocks, mixed.skipped_blocks) == (4, 4, 4)
    metrics = server.metrics()
    assert metrics["pegaflow_cache_blocks"] == 20
    assert metrics["pegaflow_saved_blocks_total"] == 20
    # The stored bytes are still the first save's.
    originals = snapshot(kv, list(range(16)))
    q = client.query(instance_id, hashes)
    assert q.hit_blocks == 16 and q.lease_id is not None
    dest = list(range(48, 64))
    zero_blocks(kv, dest)
    load_blocks(client, instance_id, 0, q.lease_id, dest)
    assert_blocks_equal(kv, dest, originals, "re-saved blocks keep the first bytes")


def test_partial_layers_do_not_seal(
    server: ServerHandle, client: EngineClient, kv_cache: KvFactory, instance_id: str
) -> None:
    kv = kv_cache(num_blocks=64, seed=4)
    client.register_kv_layers(instance_id, "layers", 0, 1, kv.layer_specs())
    hashes = random_hashes(8)
    ids = list(range(8))
    originals = snapshot(kv, ids)
    first_half = list(range(LLAMA_LAYERS // 2))
    second_half = list(range(LLAMA_LAYERS // 2, LLAMA_LAYERS))

    r1 = client.save(instance_id, 0, ids, hashes, layers=first_half)
    assert (r1.saved_blocks, r1.sealed_blocks) == (8, 0)
    assert client.query(instance_id, hashes).hit_blocks == 0
    assert server.metric("pegaflow_cache_sealed_blocks") == 0
    assert server.metric("pegaflow_cache_blocks") == 8

    # The same layers again: nothing to do, still not sealed.
    r2 = client.save(instance_id, 0, ids, hashes, layers=first_half)
    assert (r2.saved_blocks, r2.sealed_blocks, r2.skipped_blocks) == (0, 0, 8)
    assert client.query(instance_id, hashes).hit_blocks == 0

    r3 = client.save(instance_id, 0, ids, hashes, layers=second_half)
    assert (r3.saved_blocks, r3.sealed_blocks) == (8, 8)
    q = client.query(instance_id, hashes)
    assert q.hit_blocks == 8 and q.lease_id is not None
    assert server.metric("pegaflow_cache_sealed_blocks") == 8

    dest = list(range(32, 40))
    zero_blocks(kv, dest)
    load_blocks(client, instance_id, 0, q.lease_id, dest)
    assert_blocks_equal(kv, dest, originals, "block saved in two layer halves")


def test_tensor_parallel_two_ranks(
    server: ServerHandle, client: EngineClient, kv_cache: KvFactory, instance_id: str
) -> None:
    ranks = [kv_cache(num_blocks=512, seed=100), kv_cache(num_blocks=512, seed=200)]
    for rank, kv in enumerate(ranks):
        client.register_kv_layers(instance_id, "tp2", rank, 2, kv.layer_specs())
    (info,) = [i for i in client.list_instances() if i["instance_id"] == instance_id]
    assert info["tp_size"] == 2 and info["registered_ranks"] == [0, 1]
    assert info["num_layers"] == LLAMA_LAYERS and info["open_regions"] == 2

    n = 128
    hashes = random_hashes(n)
    src = list(range(n))
    originals = [snapshot(kv, src) for kv in ranks]
    assert not np.array_equal(originals[0][0], originals[1][0]), "ranks must differ"

    # Rank 0 alone (every layer) never makes a block visible.
    r0 = client.save(instance_id, 0, src, hashes)
    assert (r0.saved_blocks, r0.sealed_blocks) == (n, 0)
    assert client.query(instance_id, hashes).hit_blocks == 0
    assert client.query(instance_id, hashes[:1]).hit_blocks == 0
    # Rank 1 completes them.
    r1 = client.save(instance_id, 1, src, hashes)
    assert (r1.saved_blocks, r1.sealed_blocks) == (n, n)
    q = client.query(instance_id, hashes)
    assert q.hit_blocks == n and q.lease_id is not None

    dest = list(range(300, 300 + n))
    for kv in ranks:
        zero_blocks(kv, dest)
    load_blocks(client, instance_id, 0, q.lease_id, dest)
    assert server.metric("pegaflow_leases") == 1, "rank 1 has not loaded yet"
    load_blocks(client, instance_id, 1, q.lease_id, dest)
    assert server.metric("pegaflow_leases") == 0, "both ranks loaded: lease released"
    for rank, kv in enumerate(ranks):
        assert_blocks_equal(kv, dest, originals[rank], f"rank {rank}")


def test_replicated_kv_is_stored_once_and_loaded_by_every_rank(
    server: ServerHandle, client: EngineClient, kv_cache: KvFactory, instance_id: str
) -> None:
    """MLA: TP ranks hold the same latent KV. Registered with replicated_kv, the cache
    keeps one copy (half the bytes of two ranks), any rank saves it, both load it."""
    ranks = [kv_cache(num_blocks=64, seed=110), kv_cache(num_blocks=64, seed=120)]
    block = client.register_kv_layers(
        instance_id, "mla", 0, 2, ranks[0].layer_specs(), replicated_kv=True
    )
    with pytest.raises(PegaflowInvalidArgument, match="replicated_kv"):
        client.register_kv_layers(instance_id, "mla", 1, 2, ranks[1].layer_specs())
    client.register_kv_layers(instance_id, "mla", 1, 2, ranks[1].layer_specs(), replicated_kv=True)
    (info,) = [i for i in client.list_instances() if i["instance_id"] == instance_id]
    assert info["replicated_kv"] is True and info["registered_ranks"] == [0, 1]

    n = 16
    hashes = random_hashes(n)
    src = list(range(n))
    originals = snapshot(ranks[0], src)
    r0 = client.save(instance_id, 0, src, hashes)
    assert (r0.saved_blocks, r0.sealed_blocks) == (n, n), "one rank's save makes them visible"
    r1 = client.save(instance_id, 1, src, hashes)
    assert (r1.saved_blocks, r1.skipped_blocks) == (0, n), "the second rank copies nothing"
    assert server.metric('pegaflow_resident_bytes{tier="ram"}') == n * block, "one copy"

    q = client.query(instance_id, hashes)
    assert q.hit_blocks == n and q.lease_id is not None
    dest = list(range(32, 32 + n))
    for rank, kv in enumerate(ranks):
        zero_blocks(kv, dest)
        load_blocks(client, instance_id, rank, q.lease_id, dest)
        assert_blocks_equal(kv, dest, originals, f"rank {rank} loads rank 0's bytes")
    assert server.metric("pegaflow_leases") == 0, "both ranks loaded: lease released"


def test_rank_zero_only_block_becomes_hit_after_rank_one(
    client: EngineClient, kv_cache: KvFactory, instance_id: str
) -> None:
    ranks = [kv_cache(num_blocks=32, seed=5), kv_cache(num_blocks=32, seed=6)]
    for rank, kv in enumerate(ranks):
        client.register_kv_layers(instance_id, "tp2-seal", rank, 2, kv.layer_specs())
    hashes = random_hashes(4)
    client.save(instance_id, 0, [0, 1, 2, 3], hashes)
    for _ in range(3):
        assert client.query(instance_id, hashes).hit_blocks == 0
    # Rank 1 saves only the first two: exactly those two become hits.
    client.save(instance_id, 1, [0, 1], hashes[:2])
    q = client.query(instance_id, hashes)
    assert q.hit_blocks == 2 and q.lease_id is not None
    client.release_lease(q.lease_id)


def test_second_instance_same_namespace_shares_blocks(
    server: ServerHandle, client: EngineClient, kv_cache: KvFactory, instance_id: str
) -> None:
    writer, reader, stranger = (
        kv_cache(num_blocks=256, seed=7),
        kv_cache(num_blocks=256, seed=8),
        kv_cache(num_blocks=16, seed=9),
    )
    client.register_kv_layers(f"{instance_id}-a", "shared-ns", 0, 1, writer.layer_specs())
    other_client = server.client()
    other_client.register_kv_layers(f"{instance_id}-b", "shared-ns", 0, 1, reader.layer_specs())
    other_client.register_kv_layers(f"{instance_id}-c", "other-ns", 0, 1, stranger.layer_specs())

    n = 64
    hashes = random_hashes(n)
    src = list(range(10, 10 + n))
    originals = snapshot(writer, src)
    client.save(f"{instance_id}-a", 0, src, hashes)

    assert other_client.query(f"{instance_id}-c", hashes).hit_blocks == 0
    assert other_client.query(f"{instance_id}-c", hashes[:1]).hit_blocks == 0
    q = other_client.query(f"{instance_id}-b", hashes)
    assert q.hit_blocks == n and q.lease_id is not None
    dest = list(range(128, 128 + n))
    zero_blocks(reader, dest)
    load_blocks(other_client, f"{instance_id}-b", 0, q.lease_id, dest)
    assert_blocks_equal(reader, dest, originals, "cross-instance load")

    # The other namespace stores its own copy under the same hashes, separately.
    r = other_client.save(f"{instance_id}-c", 0, list(range(4)), hashes[:4])
    assert (r.saved_blocks, r.skipped_blocks) == (4, 0)
    assert server.metric("pegaflow_cache_blocks") == n + 4
