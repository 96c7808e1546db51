"""The SSD tier through a real server on real files: blocks written through when sealed
come back after the pool evicted them ("loading", then a hit), after a kill -9 and a
restart on the same path, never with wrong bytes (a corrupted block is a miss); bad
paths, a full disk and a second server on the same path fail at start with a clear
error; a full write queue drops writes, counted, while saves succeed."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest
from conftest import KvFactory, ServerHandle, StartServer
from e2e_helpers import (
    U8Array,
    assert_blocks_equal,
    load_blocks,
    random_hashes,
    snapshot,
    zero_blocks,
)

from pegaflow import EngineClient, SharedKvCache

POOL = "64mb"  # 512 Llama-like blocks of 128 KiB


def ssd_args(path: Path, *extra: str) -> list[str]:
    return ["--ssd-cache-path", str(path), "--ssd-cache-capacity", "256mb", *extra]


def wait_written(server: ServerHandle, blocks: int, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while server.metric("pegaflow_ssd_blocks") < blocks:
        assert time.monotonic() < deadline, f"SSD holds {server.metric('pegaflow_ssd_blocks')}"
        time.sleep(0.02)


def restarted(start_server: StartServer, args: list[str], endpoint: str) -> ServerHandle:
    """A server started again with ``args``, once it replayed the SSD's index."""
    server = start_server(POOL, args, endpoint=endpoint)
    deadline = time.monotonic() + 20
    while server.metric("pegaflow_ssd_recovering") != 0:
        assert time.monotonic() < deadline, "SSD index not recovered"
        time.sleep(0.01)
    return server


def query_until_hit(
    client: EngineClient, instance_id: str, hashes: list[bytes], timeout_s: float = 20.0
) -> tuple[int, str | None, int]:
    """Asks until the answer is not "loading"; returns (hits, lease, loading answers)."""
    deadline = time.monotonic() + timeout_s
    loading = 0
    while True:
        result = client.query(instance_id, hashes)
        if not result.loading:
            return int(result.hit_blocks), result.lease_id, loading
        loading += 1
        assert time.monotonic() < deadline, "still loading"
        time.sleep(0.01)


def saved_on_ssd(
    start_server: StartServer,
    kv: SharedKvCache,
    instance_id: str,
    path: Path,
    blocks: int,
) -> tuple[ServerHandle, list[bytes]]:
    """A server on ``path`` with blocks 0..``blocks`` of ``kv`` saved and written."""
    server = start_server(POOL, ssd_args(path))
    client = server.client()
    client.register_kv_layers(instance_id, "llama", 0, 1, kv.layer_specs())
    hashes = random_hashes(blocks)
    client.save(instance_id, 0, list(range(blocks)), hashes)
    wait_written(server, blocks)
    return server, hashes


def loads_back(
    server: ServerHandle,
    kv: SharedKvCache,
    instance_id: str,
    hashes: list[bytes],
    originals: list[U8Array],
    first: int,
    what: str,
) -> None:
    """Registers ``kv`` on ``server``, asks for ``hashes`` until they hit, loads them into
    blocks ``first``.. and compares them with ``originals``."""
    client = server.client()
    client.register_kv_layers(instance_id, "llama", 0, 1, kv.layer_specs())
    hits, lease, _ = query_until_hit(client, instance_id, hashes)
    assert hits == len(hashes) and lease is not None
    dest = list(range(first, first + len(hashes)))
    zero_blocks(kv, dest)
    load_blocks(client, instance_id, 0, lease, dest)
    assert_blocks_equal(kv, dest, originals, what)


def fill_and_evict(client: EngineClient, instance_id: str, ids: list[int], rounds: int) -> None:
    """Saves ``rounds`` batches of new blocks from ``ids``: the pool evicts older ones."""
    for _ in range(rounds):
        client.save(instance_id, 0, ids, random_hashes(len(ids)))


def test_blocks_evicted_from_the_pool_come_back_from_the_ssd(
    start_server: StartServer, kv_cache: KvFactory, instance_id: str, tmp_path: Path
) -> None:
    # LRU: the old blocks leave the pool (W-TinyLFU could refuse the new ones instead).
    server = start_server(POOL, ssd_args(tmp_path, "--disable-lfu-admission"))
    client = server.client()
    kv = kv_cache(num_blocks=1024, seed=3)
    client.register_kv_layers(instance_id, "llama", 0, 1, kv.layer_specs())
    hashes = random_hashes(64)
    src = list(range(64))
    originals = snapshot(kv, src)
    assert client.save(instance_id, 0, src, hashes).sealed_blocks == 64
    wait_written(server, 64)
    fill_and_evict(client, instance_id, list(range(100, 400)), rounds=3)
    assert server.metric('pegaflow_evicted_blocks_total{tier="ram",reason="capacity"}') >= 64

    hits, lease, loading = query_until_hit(client, instance_id, hashes)
    assert loading >= 1, "the first answer was 'loading'"
    assert hits == 64 and lease is not None
    dest = list(range(600, 664))
    zero_blocks(kv, dest)
    load_blocks(client, instance_id, 0, lease, dest)
    assert_blocks_equal(kv, dest, originals, "blocks copied up from the SSD")
    metrics = server.metrics()
    assert metrics["pegaflow_ssd_promoted_blocks_total"] >= 64
    assert metrics['pegaflow_lookup_blocks_total{tier="ssd"}'] >= 64
    assert metrics["pegaflow_ssd_checksum_failures_total"] == 0
    # 128 KiB blocks in 128 KiB pool ranges: written from and read into the pool in place.
    assert metrics['pegaflow_ssd_copied_parts_total{direction="write"}'] == 0
    assert metrics['pegaflow_ssd_copied_parts_total{direction="read"}'] == 0


def test_a_restarted_server_serves_what_it_wrote_before_a_kill(
    start_server: StartServer, kv_cache: KvFactory, instance_id: str, tmp_path: Path
) -> None:
    kv = kv_cache(num_blocks=1024, seed=4)
    originals = snapshot(kv, list(range(32)))
    server, hashes = saved_on_ssd(start_server, kv, instance_id, tmp_path, 32)
    server.stop(signal.SIGKILL)

    again = restarted(start_server, ssd_args(tmp_path), server.endpoint)
    assert again.metric("pegaflow_ssd_recovered_blocks") == 32
    loads_back(again, kv, instance_id, hashes, originals, 500, "blocks written before the kill")


def test_blocks_not_aligned_for_direct_io_round_trip_through_a_buffer(
    start_server: StartServer, kv_cache: KvFactory, instance_id: str, tmp_path: Path
) -> None:
    # 3 layers of 2 x 5 x 1 x 10 float16 = 600-byte blocks: not whole 4 KiB extents, so
    # they go through an aligned buffer (blocks of whole extents, the other tests'
    # 128 KiB, are written from and read into the pool in place).
    kv = kv_cache(num_layers=3, num_blocks=256, block_size=5, kv_heads=1, head_dim=10, seed=6)
    originals = snapshot(kv, list(range(40)))
    server, hashes = saved_on_ssd(start_server, kv, instance_id, tmp_path, 40)
    assert server.metric('pegaflow_ssd_copied_parts_total{direction="write"}') == 40
    server.stop(signal.SIGKILL)

    again = restarted(start_server, ssd_args(tmp_path), server.endpoint)
    assert again.metric("pegaflow_ssd_recovered_blocks") == 40
    loads_back(again, kv, instance_id, hashes, originals, 100, "600-byte blocks")
    assert again.metric('pegaflow_ssd_copied_parts_total{direction="read"}') == 40
    assert again.metric("pegaflow_ssd_checksum_failures_total") == 0


def test_a_corrupted_block_is_a_miss_and_is_dropped(
    start_server: StartServer, kv_cache: KvFactory, instance_id: str, tmp_path: Path
) -> None:
    kv = kv_cache(num_blocks=1024, seed=5)
    server, hashes = saved_on_ssd(start_server, kv, instance_id, tmp_path, 4)
    server.stop(signal.SIGTERM)
    data = tmp_path / "pegaflow-ssd.data"
    with data.open("r+b") as f:  # the first block's first bytes
        first = f.read(16)
        f.seek(0)
        f.write(bytes(b ^ 0xFF for b in first))

    again = restarted(start_server, ssd_args(tmp_path), server.endpoint)
    client = again.client()
    client.register_kv_layers(instance_id, "llama", 0, 1, kv.layer_specs())
    hits, lease, _ = query_until_hit(client, instance_id, hashes)
    assert again.metric("pegaflow_ssd_checksum_failures_total") == 1
    assert "failed its checksum" in again.log()
    # The first block written is gone; whichever of the four it was, no wrong bytes load.
    if lease is not None:
        client.release_lease(lease)
    assert again.metric("pegaflow_ssd_blocks") == 3
    assert hits < 4


def test_a_full_write_queue_drops_writes_and_saves_still_succeed(
    start_server: StartServer, kv_cache: KvFactory, instance_id: str, tmp_path: Path
) -> None:
    server = start_server(
        "256mb",
        ssd_args(tmp_path, "--ssd-write-queue-depth", "1", "--ssd-write-inflight", "1"),
    )
    client = server.client()
    kv = kv_cache(num_blocks=1024, seed=6)
    client.register_kv_layers(instance_id, "llama", 0, 1, kv.layer_specs())
    sealed = 0
    for _ in range(40):
        sealed += client.save(instance_id, 0, list(range(32)), random_hashes(32)).sealed_blocks
    assert sealed == 40 * 32
    deadline = time.monotonic() + 20
    while True:
        metrics = server.metrics()
        written = metrics["pegaflow_ssd_blocks"]
        dropped = metrics["pegaflow_ssd_dropped_writes_total"]
        if written + dropped == sealed or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert dropped > 0, "40 saves into a queue of one batch: some were dropped"
    assert written + dropped == sealed


@pytest.mark.parametrize(
    ("make_path", "message"),
    [
        (lambda tmp: tmp / "missing" / "cache", "No such file or directory"),
        (lambda tmp: Path("/proc/pegaflow-cache"), "SSD cache /proc/pegaflow-cache"),
    ],
)
def test_a_bad_ssd_path_fails_at_start_with_a_clear_error(
    start_server: StartServer, tmp_path: Path, make_path: object, message: str
) -> None:
    path = make_path(tmp_path)  # type: ignore[operator]
    with pytest.raises(pytest.fail.Exception, match=message):
        start_server(POOL, ssd_args(path))


def test_an_ssd_path_without_the_room_fails_at_start(
    start_server: StartServer, tmp_path: Path
) -> None:
    args = ["--ssd-cache-path", str(tmp_path), "--ssd-cache-capacity", "4000tb"]
    with pytest.raises(pytest.fail.Exception, match="not enough free space"):
        start_server(POOL, args)


def test_a_second_server_on_the_same_path_refuses_to_start(
    start_server: StartServer, tmp_path: Path
) -> None:
    start_server(POOL, ssd_args(tmp_path))
    with pytest.raises(pytest.fail.Exception, match="in use by another process"):
        start_server(POOL, ssd_args(tmp_path))


def test_without_an_ssd_path_nothing_is_written(
    server: ServerHandle, kv_cache: KvFactory, instance_id: str
) -> None:
    client = server.client()
    kv = kv_cache(num_blocks=64, seed=7)
    client.register_kv_layers(instance_id, "llama", 0, 1, kv.layer_specs())
    client.save(instance_id, 0, list(range(8)), random_hashes(8))
    metrics = server.metrics()
    assert metrics["pegaflow_ssd_blocks"] == 0 and metrics["pegaflow_ssd_capacity_bytes"] == 0


def test_the_scheduler_waits_while_the_server_copies_up_then_hits(
    start_server: StartServer, kv_cache: KvFactory, instance_id: str, tmp_path: Path
) -> None:
    from e2e_helpers import FakeRequest

    from pegaflow.connector.config import ConnectorConfig
    from pegaflow.connector.scheduler import SchedulerSide

    server = start_server(POOL, ssd_args(tmp_path))
    client = server.client()
    kv = kv_cache(num_layers=2, num_blocks=64, block_size=16)
    client.register_kv_layers(instance_id, "ns", 0, 1, kv.layer_specs())
    hashes = random_hashes(10)
    client.save(instance_id, 0, list(range(10)), hashes)
    wait_written(server, 10)
    server.stop(signal.SIGKILL)
    again = restarted(start_server, ssd_args(tmp_path), server.endpoint)
    again.client().register_kv_layers(instance_id, "ns", 0, 1, kv.layer_specs())

    config = ConnectorConfig(instance_id=instance_id, endpoint=again.endpoint)
    side = SchedulerSide(config, again.client(), 16, 16)
    request = FakeRequest("r1", num_tokens=10 * 16 + 1, block_hashes=hashes)
    answers: list[int | None] = []
    deadline = time.monotonic() + 10
    while not answers or answers[-1] is None:
        answers.append(side.get_num_new_matched_tokens(request, 0))
        assert time.monotonic() < deadline
        time.sleep(0.005)
    assert answers[0] is None, "the first lookup found the blocks on the SSD only"
    assert answers[-1] == 10 * 16


class _AlwaysLoading:
    """A server that keeps copying up and never finishes."""

    def query(self, instance_id: str, keys: list[bytes], lease_ttl_ms: int = 0) -> object:
        class Result:
            hit_blocks = 0
            lease_id = None
            loading = True
            lease_ttl_ms = 0

        return Result()


def test_a_prefix_still_loading_after_the_wait_is_a_miss(instance_id: str) -> None:
    from e2e_helpers import FakeRequest

    from pegaflow.connector.config import ConnectorConfig
    from pegaflow.connector.scheduler import SchedulerSide

    now = [100.0]
    config = ConnectorConfig(instance_id=instance_id, endpoint="127.0.0.1:1", loading_wait_s=2.0)
    side = SchedulerSide(config, _AlwaysLoading(), 16, 16, clock=lambda: now[0])  # type: ignore[arg-type]
    request = FakeRequest("r1", num_tokens=4 * 16 + 1, block_hashes=random_hashes(4))
    assert side.get_num_new_matched_tokens(request, 0) is None
    now[0] += 1.9
    assert side.get_num_new_matched_tokens(request, 0) is None
    now[0] += 0.2
    assert side.get_num_new_matched_tokens(request, 0) == 0, "waited long enough: a miss"
    assert side.get_num_new_matched_tokens(request, 0) == 0, "and remembered as one"


def test_a_full_ssd_reuses_its_oldest_blocks(
    start_server: StartServer, kv_cache: KvFactory, instance_id: str, tmp_path: Path
) -> None:
    # 2 MiB: 16 blocks of 128 KiB.
    args = ["--ssd-cache-path", str(tmp_path), "--ssd-cache-capacity", "2mb"]
    server = start_server(POOL, args)
    client = server.client()
    kv = kv_cache(num_blocks=1024, seed=8)
    client.register_kv_layers(instance_id, "llama", 0, 1, kv.layer_specs())
    old, new = random_hashes(16), random_hashes(16)
    client.save(instance_id, 0, list(range(16)), old)
    wait_written(server, 16)
    client.save(instance_id, 0, list(range(16, 32)), new)
    deadline = time.monotonic() + 20
    while server.metric("pegaflow_ssd_io_bytes_count" + '{direction="write"}') < 32:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert server.metric("pegaflow_ssd_blocks") == 16
    server.stop(signal.SIGTERM)  # RAM gone

    again = restarted(start_server, args, server.endpoint)
    assert again.metric("pegaflow_ssd_recovered_blocks") == 16
    client = again.client()
    client.register_kv_layers(instance_id, "llama", 0, 1, kv.layer_specs())
    first = client.query(instance_id, old)
    assert (first.hit_blocks, first.loading) == (0, False), "the oldest blocks were overwritten"
    hits, lease, _ = query_until_hit(client, instance_id, new)
    assert hits == 16 and lease is not None
    client.release_lease(lease)


def test_blocks_spread_over_several_paths_and_come_back_from_all(
    start_server: StartServer, kv_cache: KvFactory, instance_id: str, tmp_path: Path
) -> None:
    first, second = tmp_path / "a", tmp_path / "b"
    first.mkdir()
    second.mkdir()
    args = ["--ssd-cache-path", f"{first},{second}", "--ssd-cache-capacity", "64mb"]
    server = start_server(POOL, args)
    client = server.client()
    kv = kv_cache(num_blocks=1024, seed=9)
    client.register_kv_layers(instance_id, "llama", 0, 1, kv.layer_specs())
    hashes = random_hashes(64)
    originals = snapshot(kv, list(range(64)))
    client.save(instance_id, 0, list(range(64)), hashes)
    wait_written(server, 64)
    assert server.metric("pegaflow_ssd_capacity_bytes") == 64 << 20
    for path in (first, second):
        index = path / "pegaflow-ssd.data.index"
        assert index.stat().st_size > 1000, f"{path} got (almost) none of the blocks"
    server.stop(signal.SIGKILL)

    again = restarted(start_server, args, server.endpoint)
    assert again.metric("pegaflow_ssd_recovered_blocks") == 64
    loads_back(again, kv, instance_id, hashes, originals, 700, "blocks from both paths")
