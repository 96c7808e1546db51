"""The worker half moving blocks through its staging buffer (``staging="on"``; with
``"auto"`` CUDA workers with per-layer tensors do), against a real server on the host
backend: chunked saves and loads byte for byte, blocks shared with a worker that does
not stage, and a load whose server dies fails at once."""

from __future__ import annotations

import signal
import time

import pytest
from conftest import ServerHandle, StartServer, require_module
from e2e_helpers import random_hashes
from test_connector_worker import NUM_BLOCKS, MakeWorker, finish_loads, vllm_like_caches

from pegaflow.connector.config import ConnectorConfig
from pegaflow.connector.metadata import LoadJob, PegaConnectorMetadata, SaveJob

torch = require_module("torch")

BLOCK_BYTES = 3 * 2 * 32 * 64 * 4  # vllm_like_caches(): 3 layers of [2, 32, 64] f32
STAGING = {"staging": "on", "staging_bytes": 8 * BLOCK_BYTES}  # chunks of 2 blocks


def test_a_staged_worker_saves_and_loads_in_chunks(
    server: ServerHandle, make_worker: MakeWorker
) -> None:
    caches = vllm_like_caches()
    worker = make_worker(server.endpoint, **STAGING)
    worker.register_kv_caches(caches, NUM_BLOCKS)
    assert worker.staging is not None and worker.staging.chunk == 2
    src, dst = [9, 3, 40, 41, 42, 17, 5], [50, 51, 52, 53, 30, 31, 60]
    hashes = random_hashes(len(src))
    worker.wait_for_save(PegaConnectorMetadata(save=SaveJob(src, hashes, ["r1"])))
    assert worker.drain(10.0)
    assert worker.stats()["blocks_saved"] == len(src)

    lease = server.client().query(worker.config.instance_id, hashes).lease_id
    assert lease is not None
    worker.start_load_kv(PegaConnectorMetadata(loads=[LoadJob("r2", lease, dst)]))
    assert finish_loads(worker) == {"r2"}
    assert worker.take_load_errors() == set()
    for t in caches.values():
        for s, d in zip(src, dst, strict=True):
            assert torch.equal(t[s], t[d])
    assert server.metric("pegaflow_leases") == 0, "the last range released the lease"
    # The staging buffer is reused: a second load of the first blocks.
    for t in caches.values():
        t[20:23].zero_()
    lease = server.client().query(worker.config.instance_id, hashes[:3]).lease_id
    assert lease is not None
    worker.start_load_kv(PegaConnectorMetadata(loads=[LoadJob("r3", lease, [20, 21, 22])]))
    assert finish_loads(worker) == {"r3"}
    for t in caches.values():
        assert torch.equal(t[20:23], t[[9, 3, 40]])


def test_staged_and_direct_workers_share_blocks(
    server: ServerHandle, make_worker: MakeWorker
) -> None:
    staged_caches, direct_caches = vllm_like_caches(), vllm_like_caches()
    staged = make_worker(server.endpoint, "-staged", **STAGING)
    direct = make_worker(server.endpoint, "-direct", staging="off")
    staged.register_kv_caches(staged_caches, NUM_BLOCKS)
    direct.register_kv_caches(direct_caches, NUM_BLOCKS)
    assert direct.staging is None
    assert staged.namespace == direct.namespace
    for t in direct_caches.values():
        t.zero_()
    hashes = random_hashes(5)
    staged.wait_for_save(PegaConnectorMetadata(save=SaveJob([1, 2, 3, 4, 5], hashes, ["r"])))
    assert staged.drain(10.0)
    lease = server.client().query(direct.config.instance_id, hashes).lease_id
    assert lease is not None
    direct.start_load_kv(PegaConnectorMetadata(loads=[LoadJob("r", lease, [11, 12, 13, 14, 15])]))
    assert finish_loads(direct) == {"r"}
    for mine, theirs in zip(direct_caches.values(), staged_caches.values(), strict=True):
        assert torch.equal(mine[11:16], theirs[1:6])


def test_a_staged_load_fails_at_once_when_the_server_dies(
    start_server: StartServer, make_worker: MakeWorker
) -> None:
    server = start_server()
    worker = make_worker(server.endpoint, **STAGING)
    worker.register_kv_caches(vllm_like_caches(), NUM_BLOCKS)
    hashes = random_hashes(6)
    worker.wait_for_save(PegaConnectorMetadata(save=SaveJob(list(range(6)), hashes, ["r1"])))
    assert worker.drain(10.0)
    lease = server.client().query(worker.config.instance_id, hashes).lease_id
    assert lease is not None
    server.stop(signal.SIGKILL)
    started = time.monotonic()
    worker.start_load_kv(PegaConnectorMetadata(loads=[LoadJob("r2", lease, list(range(30, 36)))]))
    assert finish_loads(worker) == {"r2"}
    assert time.monotonic() - started < 5.0
    assert worker.take_load_errors() == set(range(30, 36))
    assert worker.stats()["loads_failed"] == 1


def test_a_saver_killed_mid_save_leaves_no_torn_block(server: ServerHandle) -> None:
    """Whatever a staged save had done when its process died, every block the server
    serves afterwards holds exactly the bytes that were saved under its hash."""
    from staged_saver_proc import kill_mid_save_and_check

    for seed in (1, 2, 3, 4):
        kill_mid_save_and_check(server.endpoint, "cpu", seed)
    assert server.client().health()["status"] == "ok"


def test_auto_staging_is_for_gpu_tensors_of_several_pieces(
    server: ServerHandle, make_worker: MakeWorker
) -> None:
    worker = make_worker(server.endpoint, staging="auto")
    worker.register_kv_caches(vllm_like_caches(), NUM_BLOCKS)
    assert worker.staging is None, "CPU tensors: the host backend copies them directly"
    assert ConnectorConfig(instance_id="i").staging == "auto"


def test_a_staging_buffer_that_cannot_be_made_leaves_direct_copies(
    server: ServerHandle, make_worker: MakeWorker, caplog: pytest.LogCaptureFixture
) -> None:
    caches = vllm_like_caches()
    worker = make_worker(server.endpoint, staging="on", staging_bytes=3 * BLOCK_BYTES)
    with caplog.at_level("WARNING", logger="pegaflow.connector.worker"):
        worker.register_kv_caches(caches, NUM_BLOCKS)
    assert worker.staging is None
    assert "no staging buffer, blocks are copied directly" in caplog.text
    hashes = random_hashes(2)
    worker.wait_for_save(PegaConnectorMetadata(save=SaveJob([4, 5], hashes, ["r1"])))
    assert worker.drain(10.0)
    assert worker.stats()["blocks_saved"] == 2


def test_staging_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="staging must be"):
        ConnectorConfig(instance_id="i", staging="maybe")
    with pytest.raises(ValueError, match="staging_bytes must be > 0"):
        ConnectorConfig(instance_id="i", staging_bytes=0)
