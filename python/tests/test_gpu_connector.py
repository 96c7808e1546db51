"""The connector's worker half on CUDA tensors laid out as vLLM 0.32 allocates them
(marker ``gpu``; skipped where torch or a GPU is missing): one int8 allocation viewed as
``[blocks, heads, block_size, 2*head_dim]`` per layer, layer after layer (LBHNC) or block
after block (BLHNC, the layout the connector asks for on CUDA). Saves wait on a CUDA
event for the step's KV writes; loads land byte for byte in other blocks."""

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


@pytest.mark.parametrize("layout", ["LBHNC", "BLHNC"])
def test_connector_worker_round_trip_on_cuda(
    server: ServerHandle, instance_id: str, layout: str
) -> None:
    caches = vllm_views(layout)
    config = ConnectorConfig(instance_id=instance_id, endpoint=server.endpoint)
    worker = WorkerSide(config, 0, 1, {"model": "gpu-test"})
    try:
        worker.register_kv_caches(caches, BLOCKS)
        assert worker.stats()["registered"]
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
