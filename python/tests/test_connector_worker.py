"""The connector's worker half with torch CPU tensors shaped like vLLM's, against a real
server: in-place shared memory, save → load byte for byte, load failures, and
registration that follows the server (absent at start, restarted). No vLLM needed."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from typing import Any

import pytest
from conftest import ServerHandle, StartServer, free_port, require_module
from e2e_helpers import random_hashes

from pegaflow.connector.config import ConnectorConfig
from pegaflow.connector.metadata import LoadJob, PegaConnectorMetadata, SaveJob
from pegaflow.connector.worker import WorkerSide

torch = require_module("torch")

NUM_BLOCKS, HEADS, BLOCK, CONTENT = 64, 2, 32, 64  # vLLM CPU view [B, H, N, 2*head_dim]
MakeWorker = Callable[..., WorkerSide]


def vllm_like_caches(num_layers: int = 3) -> dict[str, Any]:
    """Per-layer ``[B, H, N, C]`` float32 views of one int8 allocation, layer after
    layer (vLLM's LBHNC), filled with random values."""
    layer_bytes = NUM_BLOCKS * HEADS * BLOCK * CONTENT * 4
    raw = torch.zeros(layer_bytes * num_layers, dtype=torch.int8)
    caches = {}
    for i in range(num_layers):
        view = raw[i * layer_bytes : (i + 1) * layer_bytes].view(torch.float32)
        caches[f"model.layers.{i}.self_attn.attn"] = view.view(NUM_BLOCKS, HEADS, BLOCK, CONTENT)
    torch.manual_seed(0)
    for t in caches.values():
        t.normal_()
    return caches


def wait_until(predicate: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"not {what} within {timeout_s} s")
        time.sleep(0.02)


def finish_loads(worker: WorkerSide, timeout_s: float = 10.0) -> set[str]:
    done: set[str] = set()
    deadline = time.monotonic() + timeout_s
    while not done and time.monotonic() < deadline:
        done |= worker.get_finished(set())[1]
        time.sleep(0.005)
    return done


def test_share_storages_moves_memory_in_place_into_a_sealed_memfd() -> None:
    import fcntl

    from pegaflow.cpu import share_storage, share_storages

    caches = vllm_like_caches()
    views = list(caches.values())
    with torch.inference_mode():  # vLLM's KV caches are inference tensors
        views.append(torch.zeros(8))
    before = [v.clone() for v in views]
    ptrs = [v.data_ptr() for v in views]
    share_storages(views)
    assert all(v.data_ptr() != p for v, p in zip(views, ptrs, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(before, views, strict=True))
    # The views of one allocation still share one storage, now a sealed memfd.
    fd, offset = share_storage(views[1])
    storages = {v.untyped_storage().data_ptr() for v in views[:3]}
    assert offset == 0 and len(storages) == 1
    seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
    assert seals & fcntl.F_SEAL_SHRINK and seals & fcntl.F_SEAL_GROW
    # Idempotent: the same memfd for any view of the same storage.
    assert share_storage(views[2]) == (fd, 0)
    # Writes through the tensor are visible in the memfd at the view's offset.
    views[0][0, 0, 0, 0] = 1234.5
    at = views[0].storage_offset() * views[0].element_size()
    assert torch.frombuffer(bytearray(os.pread(fd, 4, at)), dtype=torch.float32).item() == 1234.5


def test_share_storage_refuses_non_cpu_tensors() -> None:
    from pegaflow.cpu import share_storage

    with pytest.raises(ValueError, match="not the CPU"):
        share_storage(torch.zeros(4, device="meta"))


def test_save_then_load_into_other_blocks(server: ServerHandle, make_worker: MakeWorker) -> None:
    caches = vllm_like_caches()
    worker = make_worker(server.endpoint)
    worker.register_kv_caches(caches, NUM_BLOCKS)
    assert worker.stats()["registered"]
    hashes = random_hashes(4)
    src, dst = [3, 9, 4, 20], [40, 41, 42, 43]
    worker.wait_for_save(PegaConnectorMetadata(save=SaveJob(src, hashes, ["r1"])))
    assert worker.drain(10.0)
    # Finished request r1: reported once its save is done.
    assert worker.get_finished({"r1"}) == ({"r1"}, set())

    query = server.client().query(worker.config.instance_id, hashes)
    assert query.hit_blocks == 4
    assert query.lease_id is not None
    worker.start_load_kv(PegaConnectorMetadata(loads=[LoadJob("r2", query.lease_id, dst)]))
    assert finish_loads(worker) == {"r2"}
    assert worker.take_load_errors() == set()
    for t in caches.values():
        for s, d in zip(src, dst, strict=True):
            assert torch.equal(t[s], t[d])
    stats = worker.stats()
    assert (stats["loads_ok"], stats["blocks_loaded"]) == (1, 4)
    assert stats["load_wait_s"] > 0
    assert (stats["kv_tensors"], stats["cross_layer"]) == (len(caches), False)


def test_preemption_drops_queued_saves_and_forgets_them(
    server: ServerHandle, make_worker: MakeWorker
) -> None:
    import threading

    worker = make_worker(server.endpoint)
    worker.register_kv_caches(vllm_like_caches(), NUM_BLOCKS)
    gate = threading.Event()
    worker._saver.submit(gate.wait)  # the saver is busy: the next save stays queued
    hashes = random_hashes(2)
    worker.wait_for_save(PegaConnectorMetadata(save=SaveJob([1, 2], hashes, ["r1"])))
    releaser = threading.Timer(0.2, gate.set)
    releaser.start()
    worker.handle_preemptions(PegaConnectorMetadata(preempted_req_ids={"r1"}))
    releaser.join()
    assert worker.drain(5.0)
    # Never saved (its blocks may hold another request's KV now), and not reported.
    assert server.client().query(worker.config.instance_id, hashes).hit_blocks == 0
    assert worker.get_finished({"r1"}) == (set(), set())


def test_failed_load_reports_its_blocks(server: ServerHandle, make_worker: MakeWorker) -> None:
    worker = make_worker(server.endpoint)
    worker.register_kv_caches(vllm_like_caches(), NUM_BLOCKS)
    worker.start_load_kv(PegaConnectorMetadata(loads=[LoadJob("r1", "no-such-lease", [5, 6])]))
    assert worker.get_finished(set()) == (set(), {"r1"})
    assert worker.take_load_errors() == {5, 6}
    assert worker.take_load_errors() == set()
    # Hybrid models take failures per request (their block ids repeat across groups).
    assert worker.take_failed_requests() == {"r1"}
    assert worker.take_failed_requests() == set()


def test_a_fence_waits_only_for_saves_reading_reused_blocks(
    server: ServerHandle, make_worker: MakeWorker
) -> None:
    """A hybrid model frees blocks mid-request: before a step writes into blocks it
    handed out again, the saves still reading them finish; other saves keep running."""
    import threading

    worker = make_worker(server.endpoint)
    worker.register_kv_caches(vllm_like_caches(), NUM_BLOCKS)
    gate = threading.Event()
    worker._saver.submit(gate.wait)  # the saver is busy: the saves below stay queued
    first, second = random_hashes(2), random_hashes(2)
    worker.wait_for_save(PegaConnectorMetadata(save=SaveJob([1, 2], first, ["r1"])))
    worker.wait_for_save(PegaConnectorMetadata(save=SaveJob([7, 8], second, ["r2"])))
    worker.handle_preemptions(PegaConnectorMetadata(fence_block_ids={30, 31}))  # unrelated
    assert not gate.is_set()
    releaser = threading.Timer(0.2, gate.set)
    releaser.start()
    started = time.monotonic()
    worker.handle_preemptions(PegaConnectorMetadata(fence_block_ids={2, 40}))
    assert time.monotonic() - started >= 0.15  # waited for the save reading block 2
    releaser.join()
    client = server.client()
    assert client.query(worker.config.instance_id, first).hit_blocks == 2
    assert worker.drain(5.0)
    assert client.query(worker.config.instance_id, second).hit_blocks == 2


def test_a_load_whose_blocks_were_lost_is_reported_failed(
    server: ServerHandle, make_worker: MakeWorker
) -> None:
    worker = make_worker(server.endpoint)
    worker.register_kv_caches(vllm_like_caches(), NUM_BLOCKS)
    worker.start_load_kv(PegaConnectorMetadata(loads=[LoadJob("r1", "", [5, 6])]))
    assert worker.get_finished(set()) == (set(), {"r1"})
    assert worker.take_load_errors() == {5, 6}
    assert worker.stats()["loads_failed"] == 1


def test_views_of_one_buffer_register_once_through_the_widest(
    server: ServerHandle, make_worker: MakeWorker
) -> None:
    """vLLM's hybrid manager: same-position layers of different groups view one buffer
    each their own way (attention as float32 blocks, a recurrent state as a shorter int8
    run): one layer is registered, spanning the whole block."""
    page = HEADS * BLOCK * CONTENT * 4
    raw = torch.zeros(NUM_BLOCKS * page, dtype=torch.int8)
    attention = raw.view(torch.float32).view(NUM_BLOCKS, HEADS, BLOCK, CONTENT)
    state = raw.view(NUM_BLOCKS, page)[:, : page - 512].unflatten(1, (1, 1, page - 512))
    worker = make_worker(server.endpoint)
    worker.register_kv_caches(
        {"model.layers.0.linear_attn": state, "model.layers.1.self_attn.attn": attention},
        NUM_BLOCKS,
    )
    registration = worker.registration
    assert registration is not None
    assert registration.layer_names == ["model.layers.0.linear_attn"]
    assert len(registration.layers) == 1
    assert len(registration.layout_factors) == 2  # both views shape the namespace
    attention[3].normal_()
    hashes = random_hashes(1)
    worker.wait_for_save(PegaConnectorMetadata(save=SaveJob([3], hashes, ["r1"])))
    assert worker.drain(10.0)
    lease = server.client().query(worker.config.instance_id, hashes).lease_id
    assert lease is not None
    worker.start_load_kv(PegaConnectorMetadata(loads=[LoadJob("r2", lease, [9])]))
    assert finish_loads(worker) == {"r2"}
    assert torch.equal(attention[9], attention[3])  # the whole page, past the state's end


def test_requests_without_saves_are_not_reported(
    server: ServerHandle, make_worker: MakeWorker
) -> None:
    worker = make_worker(server.endpoint)
    worker.register_kv_caches(vllm_like_caches(), NUM_BLOCKS)
    assert worker.get_finished({"never-saved"}) == (set(), set())


def test_server_absent_at_start_then_registered(
    start_server: StartServer, make_worker: MakeWorker
) -> None:
    endpoint = f"127.0.0.1:{free_port()}"
    worker = make_worker(endpoint, timeout_s=0.5)
    caches = vllm_like_caches()
    worker.register_kv_caches(caches, NUM_BLOCKS)  # returns although nobody listens
    assert not worker.stats()["registered"]
    # Saves are skipped (request still reported), loads fail fast.
    worker.wait_for_save(PegaConnectorMetadata(save=SaveJob([1], random_hashes(1), ["r1"])))
    assert worker.get_finished({"r1"}) == ({"r1"}, set())
    worker.start_load_kv(PegaConnectorMetadata(loads=[LoadJob("r2", "lease", [7])]))
    assert worker.get_finished(set()) == (set(), {"r2"})
    assert worker.take_load_errors() == {7}

    server = start_server(endpoint=endpoint)
    wait_until(lambda: worker.stats()["registered"], 10.0, "registered")
    assert [i["instance_id"] for i in server.client().list_instances()] == [
        worker.config.instance_id
    ]


def test_server_restart_is_followed(start_server: StartServer, make_worker: MakeWorker) -> None:
    server = start_server()
    worker = make_worker(server.endpoint)
    caches = vllm_like_caches()
    worker.register_kv_caches(caches, NUM_BLOCKS)
    assert worker.stats()["registrations"] == 1
    server.stop(signal.SIGKILL)
    wait_until(lambda: not worker.stats()["registered"], 10.0, "unregistered")
    restarted = start_server(endpoint=server.endpoint)
    wait_until(lambda: worker.stats()["registered"], 10.0, "registered again")
    assert worker.stats()["registrations"] == 2
    hashes = random_hashes(2)
    worker.wait_for_save(PegaConnectorMetadata(save=SaveJob([1, 2], hashes, ["r1"])))
    assert worker.drain(10.0)
    assert restarted.client().query(worker.config.instance_id, hashes).hit_blocks == 2


def is_registered(worker: WorkerSide) -> Callable[[], bool]:
    return lambda: bool(worker.stats()["registered"])


def test_mla_ranks_share_one_stored_copy(server: ServerHandle, instance_id: str) -> None:
    """MLA-shaped caches (``[blocks, block_size, 576]``, the same bytes on both TP ranks)
    registered as replicated: both ranks save, the server keeps one copy, both load it."""
    config = ConnectorConfig(
        instance_id=instance_id, endpoint=server.endpoint, retry_interval_s=0.2
    )

    def mla_caches() -> dict[str, Any]:
        torch.manual_seed(7)  # identical latent KV on every rank, as MLA has
        return {
            f"model.layers.{i}.self_attn.attn": torch.randn(NUM_BLOCKS, 16, 576) for i in range(2)
        }

    workers = [
        WorkerSide(config, rank, 2, {"model": "mla-test"}, replicated_kv=True) for rank in (0, 1)
    ]
    caches = [mla_caches() for _ in workers]
    try:
        for worker, cache in zip(workers, caches, strict=True):
            worker.register_kv_caches(cache, NUM_BLOCKS)
            wait_until(is_registered(worker), 10, "registered")
        assert workers[0].namespace == workers[1].namespace
        hashes = random_hashes(4)
        src, dst = [1, 2, 3, 4], [50, 51, 52, 53]
        for worker in workers:
            worker.wait_for_save(PegaConnectorMetadata(save=SaveJob(src, hashes, ["r1"])))
            assert worker.drain(10.0)
        block = 2 * 16 * 576 * 4  # two layers of one block
        assert server.metric('pegaflow_resident_bytes{tier="ram"}') == 4 * block, "one copy"
        q = server.client().query(instance_id, hashes)
        assert q.hit_blocks == 4 and q.lease_id is not None
        for worker, cache in zip(workers, caches, strict=True):
            for t in cache.values():
                t[dst] = 0
            worker.start_load_kv(PegaConnectorMetadata(loads=[LoadJob("r2", q.lease_id, dst)]))
            assert finish_loads(worker) == {"r2"}
            for t in cache.values():
                assert torch.equal(t[dst], t[src])
        assert server.metric("pegaflow_leases") == 0, "both ranks loaded"
    finally:
        for worker in workers:
            worker.shutdown()


def test_pipeline_stages_are_ranks_of_one_instance(server: ServerHandle, instance_id: str) -> None:
    """Pipeline parallelism (vLLM's CPU build cannot run PP=2, so this is tested at the
    worker level): two stages with different layers (1 and 3) register as ranks 0 and 1
    of one instance under one namespace; a block is a hit only once both stages saved
    it, and each stage loads its own layers back."""
    config = ConnectorConfig(
        instance_id=instance_id, endpoint=server.endpoint, retry_interval_s=0.2
    )
    factors = {"model": "pp-test", "pp": 2, "tp": 1}
    workers = [
        WorkerSide(config, stage, 2, factors, layouts_in_namespace=False) for stage in (0, 1)
    ]
    caches = [vllm_like_caches(1), vllm_like_caches(3)]
    try:
        for worker, cache in zip(workers, caches, strict=True):
            worker.register_kv_caches(cache, NUM_BLOCKS)
            wait_until(is_registered(worker), 10, "registered")
        assert workers[0].namespace == workers[1].namespace
        hashes = random_hashes(4)
        src, dst = [1, 2, 3, 4], [50, 51, 52, 53]
        client = server.client()
        workers[0].wait_for_save(PegaConnectorMetadata(save=SaveJob(src, hashes, ["r1"])))
        assert workers[0].drain(10.0)
        assert client.query(instance_id, hashes).hit_blocks == 0, "stage 1 has not saved"
        workers[1].wait_for_save(PegaConnectorMetadata(save=SaveJob(src, hashes, ["r1"])))
        assert workers[1].drain(10.0)
        q = client.query(instance_id, hashes)
        assert q.hit_blocks == 4 and q.lease_id is not None
        for worker, cache in zip(workers, caches, strict=True):
            expected = {name: t[src].clone() for name, t in cache.items()}
            for t in cache.values():
                t[dst] = 0
            worker.start_load_kv(PegaConnectorMetadata(loads=[LoadJob("r2", q.lease_id, dst)]))
            assert finish_loads(worker) == {"r2"}
            for name, t in cache.items():
                assert torch.equal(t[dst], expected[name])
        assert server.metric("pegaflow_leases") == 0, "both stages loaded"
    finally:
        for worker in workers:
            worker.shutdown()


def test_a_permuted_cross_layer_tensor_registers_as_whole_blocks(
    server: ServerHandle, make_worker: MakeWorker
) -> None:
    """vLLM 0.26's cross-layer tensor is a permuted view of its buffer (here stored
    block, head, layer, token, content; viewed block, layer, token, head, content): each
    block is still one run, registered as such and copied whole."""
    physical = torch.randn(NUM_BLOCKS, HEADS, 3, BLOCK, CONTENT)
    view = physical.permute(0, 2, 3, 1, 4)
    worker = make_worker(server.endpoint)
    worker.register_kv_caches({"cross_layers": view}, NUM_BLOCKS)
    stats = worker.stats()
    assert stats["registered"]
    assert (stats["kv_tensors"], stats["cross_layer"]) == (1, True)
    hashes = random_hashes(2)
    worker.wait_for_save(PegaConnectorMetadata(save=SaveJob([4, 5], hashes, ["r1"])))
    assert worker.drain(10.0)
    lease = server.client().query(worker.config.instance_id, hashes).lease_id
    assert lease is not None
    worker.start_load_kv(PegaConnectorMetadata(loads=[LoadJob("r2", lease, [30, 31])]))
    assert finish_loads(worker) == {"r2"}
    # (Registration moved the view's memory into shared memory: read through the view.)
    assert torch.equal(view[30:32], view[4:6])
