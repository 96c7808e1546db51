"""A pool much smaller than what is saved: eviction of unleased blocks (LRU, and the
default W-TinyLFU), leased blocks kept byte-exact, no save refused."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import KvFactory, StartServer
from e2e_helpers import assert_blocks_equal, block_bytes, load_blocks, random_hashes, snapshot

from pegaflow import EngineClient, PegaflowResourceExhausted

POOL = 32 << 20
# 8 layers of (2, 128, 16, 8, 64) float16: 16 KiB per K or V segment, 256 KiB per block.
LAYERS, NUM_BLOCKS, BLOCK_SIZE, HEADS, HEAD_DIM = 8, 128, 16, 8, 64
BLOCK = 256 << 10
BATCH = 32
LEASED = 4


def hits(client: EngineClient, instance: str, hashes: list[bytes]) -> list[bool]:
    """Per hash, whether it is cached (one query each; leases released at once)."""
    out = []
    for h in hashes:
        q = client.query(instance, [h])
        if q.lease_id is not None:
            client.release_lease(q.lease_id)
        out.append(q.hit_blocks == 1)
    return out


@pytest.mark.parametrize("policy", ["lru", "tinylfu"])
def test_eviction_under_pressure(
    start_server: StartServer, kv_cache: KvFactory, policy: str
) -> None:
    args = ("--disable-lfu-admission",) if policy == "lru" else ()
    server = start_server(pool_size="32mb", extra_args=args)
    client = server.client()
    kv = kv_cache(
        num_layers=LAYERS,
        num_blocks=NUM_BLOCKS,
        block_size=BLOCK_SIZE,
        kv_heads=HEADS,
        head_dim=HEAD_DIM,
        seed=41,
    )
    assert block_bytes(kv) == BLOCK
    assert client.register_kv_layers("pressure", "ns", 0, 1, kv.layer_specs()) == BLOCK
    capacity = server.metric("pegaflow_pool_capacity_bytes")
    assert capacity == POOL
    rng = np.random.default_rng(42)

    # A few blocks leased for a long time.
    leased_hashes = random_hashes(LEASED, rng)
    leased_ids = list(range(LEASED))
    leased_originals = snapshot(kv, leased_ids)
    client.save("pressure", 0, leased_ids, leased_hashes)
    q = client.query("pressure", leased_hashes, lease_ttl_ms=60_000)
    assert q.hit_blocks == LEASED and q.lease_id is not None
    lease_id = q.lease_id

    # 4x the pool in new blocks, saved in batches; block bytes are whatever the ids hold.
    total_blocks = 4 * POOL // BLOCK
    saved: list[bytes] = []
    evicted = 0
    for start in range(0, total_blocks, BATCH):
        batch = random_hashes(BATCH, rng)
        ids = [LEASED + (i % (NUM_BLOCKS - LEASED)) for i in range(start, start + BATCH)]
        r = client.save("pressure", 0, ids, batch)
        assert (r.saved_blocks, r.sealed_blocks) == (BATCH, BATCH), f"batch at {start}: {r}"
        evicted += r.evicted_blocks
        saved.extend(batch)
        metrics = server.metrics()
        assert metrics["pegaflow_pool_used_bytes"] <= capacity
        # Read-your-writes holds under pressure too.
        assert hits(client, "pressure", batch[-1:]) == [True]

    metrics = server.metrics()
    fit = POOL // BLOCK  # 128 blocks fit
    assert evicted > 0
    assert metrics['pegaflow_evicted_blocks_total{tier="ram",reason="capacity"}'] == evicted
    assert evicted >= total_blocks + LEASED - fit
    assert metrics["pegaflow_pool_used_bytes"] <= capacity
    assert metrics["pegaflow_cache_blocks"] <= fit
    assert metrics["pegaflow_leases"] == 1

    # Oldest unleased blocks are gone (under W-TinyLFU: those nobody read; the loop above
    # read the last block of each batch, which may stay), the newest are there.
    oldest = saved[:BATCH] if policy == "lru" else saved[: BATCH - 1]
    assert not any(hits(client, "pressure", oldest)), "oldest blocks survived"
    newest = fit - LEASED - BATCH  # leave slack for allocator rounding
    assert all(hits(client, "pressure", saved[-newest:])), "a recent block was evicted"

    # The leased blocks survived and still load byte-exact.
    dest = list(range(NUM_BLOCKS - LEASED, NUM_BLOCKS))
    for layer in kv.layers:
        layer.view(np.uint8)[:, dest] = 0
    load_blocks(client, "pressure", 0, lease_id, dest)
    assert_blocks_equal(kv, dest, leased_originals, "leased blocks after pressure")
    assert server.metric("pegaflow_leases") == 0


def test_lease_protects_blocks_until_released(
    start_server: StartServer, kv_cache: KvFactory
) -> None:
    """Leased blocks survive a full turnover; once released they age out like others
    (under LRU: W-TinyLFU would rightly keep these much-read blocks over one-off saves)."""
    server = start_server(pool_size="4mb", extra_args=("--disable-lfu-admission",))
    client = server.client()
    kv = kv_cache(num_blocks=64, seed=43)
    client.register_kv_layers("turnover", "ns", 0, 1, kv.layer_specs())
    pinned = random_hashes(8)
    client.save("turnover", 0, list(range(8)), pinned)
    q = client.query("turnover", pinned, lease_ttl_ms=60_000)
    assert q.lease_id is not None
    for _ in range(6):  # 6 x 16 blocks through a pool of 32
        client.save("turnover", 0, list(range(8, 24)), random_hashes(16))
    assert all(hits(client, "turnover", pinned))
    client.release_lease(q.lease_id)
    for _ in range(4):
        client.save("turnover", 0, list(range(8, 24)), random_hashes(16))
    assert not any(hits(client, "turnover", pinned))


@pytest.mark.parametrize("num_layers", [32, 37])
def test_evicting_one_block_makes_room_for_one(
    start_server: StartServer, kv_cache: KvFactory, num_layers: int
) -> None:
    """Every other block leased, the rest evictable: saving one more block of the same
    size evicts one old block and succeeds. 32 layers give a 128 KiB block, 37 layers a
    148 KiB one (not a power of two: the allocator rounds it to its size bin, so the pool
    holds a few fewer blocks than pool_size / block)."""
    kv = kv_cache(num_layers=num_layers, num_blocks=32, seed=44)
    block = block_bytes(kv)
    server = start_server(pool_size=str(20 * block))
    client = server.client()
    client.register_kv_layers("odd", "ns", 0, 1, kv.layer_specs())
    hashes: list[bytes] = []
    while True:
        h = random_hashes(1)
        r = client.save("odd", 0, [len(hashes)], h)
        if r.evicted_blocks:
            break
        hashes.extend(h)
    assert len(hashes) >= 17, f"only {len(hashes)} blocks of {block} B fit in 20 blocks' room"
    assert server.metrics()["pegaflow_pool_used_bytes"] <= 20 * block
    for leased in hashes[2::2]:
        assert client.query("odd", [leased], lease_ttl_ms=60_000).hit_blocks == 1

    r = client.save("odd", 0, [31], random_hashes(1))
    assert r.sealed_blocks == 1
    assert r.evicted_blocks == 1, f"{r.evicted_blocks} blocks evicted to store one"


@pytest.mark.parametrize("policy", ["lru", "tinylfu"])
def test_everything_leased_is_transient_exhaustion(
    start_server: StartServer, kv_cache: KvFactory, policy: str
) -> None:
    """With every block leased there is nothing to evict: the save is refused, nothing
    changes, and the same save succeeds once the lease is released."""
    args = ("--disable-lfu-admission",) if policy == "lru" else ()
    server = start_server(pool_size="4mb", extra_args=args)  # 32 blocks of 128 KiB
    client = server.client()
    kv = kv_cache(num_blocks=64, seed=45)
    client.register_kv_layers("pinned", "ns", 0, 1, kv.layer_specs())
    full = random_hashes(32)
    r = client.save("pinned", 0, list(range(32)), full)
    assert (r.sealed_blocks, r.evicted_blocks) == (32, 0)
    q = client.query("pinned", full, lease_ttl_ms=60_000)
    assert q.hit_blocks == 32 and q.lease_id is not None
    before = server.metrics()

    extra = random_hashes(2)
    with pytest.raises(PegaflowResourceExhausted, match="leased"):
        client.save("pinned", 0, [40, 41], extra)
    after = server.metrics()
    for name in (
        "pegaflow_cache_blocks",
        "pegaflow_pool_used_bytes",
        'pegaflow_evicted_blocks_total{tier="ram",reason="capacity"}',
    ):
        assert after[name] == before[name], name
    # Asked for three times (every time a miss): W-TinyLFU admits them over blocks asked
    # for once, whatever its sketch's chance collisions.
    for _ in range(3):
        assert client.query("pinned", extra).hit_blocks == 0

    client.release_lease(q.lease_id)
    r = client.save("pinned", 0, [40, 41], extra)
    assert (r.sealed_blocks, r.evicted_blocks) == (2, 2)
    assert hits(client, "pinned", extra) == [True, True]
    if policy == "lru":
        assert hits(client, "pinned", full[:2]) == [False, False], "LRU: the oldest go first"
        assert all(hits(client, "pinned", full[2:]))
    else:
        # W-TinyLFU picks its victims by the frequency sketch, whose counters random
        # hashes share by chance: which two leave is its choice, how many is not.
        assert hits(client, "pinned", full).count(False) == 2
