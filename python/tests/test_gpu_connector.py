"""The connector's worker half on CUDA tensors laid out as vLLM 0.32 allocates them
(marker ``gpu``; skipped where torch or a GPU is missing): one int8 allocation viewed as
``[blocks, heads, block_size, 2*head_dim]`` per layer, layer after layer (LBHNC) or block
after block (BLHNC, the layout the connector asks for on CUDA). Saves wait on a CUDA
event for the step's KV writes; loads land byte for byte in other blocks — directly, or
through the worker's staging buffer (gathered and scattered in this process, in chunks)."""

from __future__ import annotations

import time
from typing import Any

import pytest
from conftest import ServerHandle
from e2e_helpers import random_hashes

from pegaflow.connector.config import ConnectorConfig
from pegaflow.connector.metadata import LoadJob, PegaConnectorMetadata, SaveJob
from pegaflow.connector.worker import WorkerSide

torch = pytest.importorskip("torch")
if not torch.cuda.is_available():
    pytest.skip("no CUDA device", allow_module_level=True)

pytestmark = pytest.mark.gpu

LAYERS, BLOCKS, HEADS, BLOCK, HEAD_DIM = 4, 128, 8, 16, 128


def vllm_views(layout: str) -> dict[str, Any]:
    elem = 2  # bfloat16
    page = HEADS * BLOCK * 2 * HEAD_DIM * elem
    raw = torch.zeros(LAYERS * BLOCKS * page, dtype=torch.int8, device="cuda")
    if layout == "LBHNC":
        layer_stride, block_stride = BLOCKS * page, page
    else:  # BLHNC: block-outermost, a block of all layers is one run
        layer_stride, block_stride = page, LAYERS * page
    inner = (BLOCK * 2 * HEAD_DIM * elem, 2 * HEAD_DIM * elem, 1)
    views = {}
    for layer in range(LAYERS):
        view = torch.as_strided(
            raw,
            (BLOCKS, HEADS, BLOCK, 2 * HEAD_DIM * elem),
            (block_stride, *inner),
            storage_offset=layer * layer_stride,
        ).view(torch.bfloat16)
        views[f"model.layers.{layer}.self_attn.attn"] = view
    return views


PAGE_BYTES = HEADS * BLOCK * 2 * HEAD_DIM * 2
STAGING_BYTES = 8 * LAYERS * PAGE_BYTES  # chunks of 2 blocks: many chunks per request


@pytest.mark.parametrize("staging", ["off", "on", "auto"])
@pytest.mark.parametrize("layout", ["LBHNC", "BLHNC"])
def test_connector_worker_round_trip_on_cuda(
    server: ServerHandle, instance_id: str, layout: str, staging: str
) -> None:
    caches = vllm_views(layout)
    config = ConnectorConfig(
        instance_id=instance_id,
        endpoint=server.endpoint,
        staging=staging,
        staging_bytes=STAGING_BYTES,
    )
    worker = WorkerSide(config, 0, 1, {"model": "gpu-test"})
    try:
        worker.register_kv_caches(caches, BLOCKS)
        assert worker.stats()["registered"]
        # Per-layer views (even of BLHNC): staged unless staging is off.
        assert (worker.staging is not None) == (staging != "off")
        # The "forward pass": KV written on the current stream right before the save.
        for t in caches.values():
            t.normal_()
        src, dst = list(range(0, 64, 2)), list(range(64, 96))
        keys = random_hashes(len(src))
        worker.wait_for_save(PegaConnectorMetadata(save=SaveJob(src, keys, ["r1"])))
        assert worker.drain(20.0)
        assert worker.stats()["blocks_saved"] == len(src)
        hit = server.client().query(instance_id, keys)
        assert hit.hit_blocks == len(src) and hit.lease_id is not None
        worker.start_load_kv(PegaConnectorMetadata(loads=[LoadJob("r2", hit.lease_id, dst)]))
        deadline = time.monotonic() + 20.0
        done: set[str] = set()
        while not done and time.monotonic() < deadline:
            done = worker.get_finished(set())[1]
        assert done == {"r2"}
        assert worker.take_load_errors() == set()
        torch.cuda.synchronize()
        for t in caches.values():
            assert torch.equal(t[src], t[dst])
    finally:
        worker.shutdown()


def test_two_staged_workers_save_and_load_at_once(server: ServerHandle, instance_id: str) -> None:
    """Two instances (one GPU) through their own staging buffers: one saves while the
    other loads what a third save stored, both byte for byte."""
    workers, caches = [], []
    for name in ("a", "b"):
        config = ConnectorConfig(
            instance_id=f"{instance_id}-{name}",
            endpoint=server.endpoint,
            staging="on",
            staging_bytes=STAGING_BYTES,
        )
        workers.append(WorkerSide(config, 0, 1, {"model": "gpu-test"}))
        caches.append(vllm_views("LBHNC"))
    try:
        for worker, views in zip(workers, caches, strict=True):
            worker.register_kv_caches(views, BLOCKS)
            for t in views.values():
                t.normal_()
        a, b = workers
        first = random_hashes(32)
        a.wait_for_save(PegaConnectorMetadata(save=SaveJob(list(range(32)), first, ["s1"])))
        assert a.drain(20.0)
        hit = server.client().query(b.config.instance_id, first)
        assert hit.hit_blocks == 32 and hit.lease_id is not None
        second = random_hashes(32)
        # At once: a saves 32 more blocks while b loads the first 32 into 64..95.
        a.wait_for_save(PegaConnectorMetadata(save=SaveJob(list(range(32, 64)), second, ["s2"])))
        load = LoadJob("l", hit.lease_id, list(range(64, 96)))
        b.start_load_kv(PegaConnectorMetadata(loads=[load]))
        deadline = time.monotonic() + 20.0
        done: set[str] = set()
        while not done and time.monotonic() < deadline:
            done = b.get_finished(set())[1]
        assert done == {"l"} and b.take_load_errors() == set()
        assert a.drain(20.0)
        assert a.stats()["blocks_saved"] == 64
        torch.cuda.synchronize()
        for mine, theirs in zip(caches[1].values(), caches[0].values(), strict=True):
            assert torch.equal(mine[64:96], theirs[0:32])
    finally:
        for worker in workers:
            worker.shutdown()


@pytest.mark.parametrize(
    ("interior", "dtype"),
    [
        ((BLOCK, 576), torch.bfloat16),  # MLA-like: one latent segment per block
        ((BLOCK, 1, 2 * 64), torch.bfloat16),  # TP-sharded GQA: 4 KiB per block and layer
        ((BLOCK, HEADS, 2 * HEAD_DIM), torch.uint8),  # fp8-sized (1-byte) elements
        ((2, BLOCK, HEADS, HEAD_DIM), torch.bfloat16),  # blocks first, K and V apart
    ],
)
def test_staged_layouts_round_trip_byte_for_byte(
    server: ServerHandle, instance_id: str, interior: tuple[int, ...], dtype: Any
) -> None:
    layers = 6
    caches = {
        f"model.layers.{i}.attn": torch.randint(0, 255, (BLOCKS, *interior), device="cuda").to(
            dtype
        )
        for i in range(layers)
    }
    block_bytes = (
        layers
        * caches["model.layers.0.attn"][0].numel()
        * caches["model.layers.0.attn"].element_size()
    )
    config = ConnectorConfig(
        instance_id=instance_id,
        endpoint=server.endpoint,
        staging="auto",
        staging_bytes=12 * block_bytes,  # chunks of 3 blocks
    )
    worker = WorkerSide(config, 0, 1, {"model": f"gpu-{interior}-{dtype}"})
    try:
        worker.register_kv_caches(caches, BLOCKS)
        assert worker.staging is not None and worker.staging.chunk == 3
        src, dst = [7, 1, 90, 91, 92, 40, 3, 12, 50, 51], list(range(100, 110))
        keys = random_hashes(len(src))
        worker.wait_for_save(PegaConnectorMetadata(save=SaveJob(src, keys, ["r1"])))
        assert worker.drain(20.0)
        hit = server.client().query(instance_id, keys)
        assert hit.lease_id is not None
        worker.start_load_kv(PegaConnectorMetadata(loads=[LoadJob("r2", hit.lease_id, dst)]))
        deadline = time.monotonic() + 20.0
        done: set[str] = set()
        while not done and time.monotonic() < deadline:
            done = worker.get_finished(set())[1]
        assert done == {"r2"} and worker.take_load_errors() == set()
        torch.cuda.synchronize()
        for t in caches.values():
            assert torch.equal(t[src], t[dst])
    finally:
        worker.shutdown()


@pytest.mark.parametrize("n", [1, 3, 4])
def test_captured_chunk_copies_move_exactly_the_blocks_asked(n: int) -> None:
    """The staging buffer's CUDA graphs (a fixed chunk of 4 blocks, shorter chunks padded)
    gather the asked blocks and scatter into the asked blocks only."""
    from pegaflow.connector.staging import StagingBuffer

    layers = [torch.randn(BLOCKS, 16, 64, device="cuda").to(torch.bfloat16) for _ in range(3)]
    block_bytes = sum(t[0].numel() * t.element_size() for t in layers)
    buffer = StagingBuffer(layers, 8 * block_bytes)
    stream = torch.cuda.Stream()
    assert buffer.capture("gather", 0, 4, stream)
    assert buffer.capture("scatter", 4, 4, stream)
    sources, targets = [9, 2, 77, 30][:n], [100, 5, 61, 8][:n]
    with torch.cuda.stream(stream):
        buffer.gather(sources, 0)
    stream.synchronize()
    offset = 0
    for t in layers:
        size = t[0].numel() * t.element_size()
        gathered = buffer.buffer[:n, offset : offset + size]
        assert torch.equal(gathered, t[sources].view(torch.uint8).reshape(n, size))
        offset += size
    buffer.buffer[4:8].random_(0, 255)
    slots = buffer.buffer[4 : 4 + n].clone()
    before = [t.clone() for t in layers]
    with torch.cuda.stream(stream):
        buffer.scatter(4, targets)
    stream.synchronize()
    offset = 0
    untouched = [b for b in range(BLOCKS) if b not in targets]
    for t, old in zip(layers, before, strict=True):
        size = t[0].numel() * t.element_size()
        scattered = t[targets].view(torch.uint8).reshape(n, size)
        assert torch.equal(scattered, slots[:, offset : offset + size])
        assert torch.equal(t[untouched], old[untouched])
        offset += size


def test_a_saver_killed_mid_save_leaves_no_torn_block(server: ServerHandle) -> None:
    """A process saving through its staging buffer is killed mid-save (its CUDA context,
    and the memory the server was copying from, go with it): every block the server
    serves afterwards holds exactly the bytes saved under its hash."""
    from staged_saver_proc import kill_mid_save_and_check

    for seed in (1, 2, 3, 4):
        kill_mid_save_and_check(server.endpoint, "cuda", seed)
    assert server.client().health()["status"] == "ok"
