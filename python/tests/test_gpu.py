"""CUDA backend end to end (marker ``gpu``; skipped where torch or a GPU is missing).

The server is a separate process, so every test exercises CUDA IPC across processes:
the client exports its tensors' IPC handles, the server opens them and copies between
GPU memory and its pinned pool.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import ServerHandle, StartServer

from pegaflow import EngineClient, KvLayer, LoadState
from pegaflow.errors import PegaflowInvalidArgument

torch = pytest.importorskip("torch")
if not torch.cuda.is_available():
    pytest.skip("no CUDA device", allow_module_level=True)

from pegaflow.cuda import cuda_layer_spec  # noqa: E402

pytestmark = pytest.mark.gpu
Tensor = Any  # Tensor (torch is optional, so not importable for type checks)

LAYERS, BLOCKS, BLOCK, HEADS, DIM = 4, 128, 16, 8, 128


def hashes(n: int) -> list[bytes]:
    return [os.urandom(32) for _ in range(n)]


def nhd() -> tuple[list[Tensor], list[KvLayer]]:
    """FlashAttention NHD: one (2, blocks, block, heads, dim) tensor per layer."""
    tensors = [
        torch.randn(2, BLOCKS, BLOCK, HEADS, DIM, dtype=torch.bfloat16, device="cuda")
        for _ in range(LAYERS)
    ]
    specs = [cuda_layer_spec(i, t, block_dim=1, kv_dim=0) for i, t in enumerate(tensors)]
    return tensors, specs


def blocks_first() -> tuple[list[Tensor], list[KvLayer]]:
    """(blocks, 2, block, heads, dim) per layer."""
    tensors = [
        torch.randn(BLOCKS, 2, BLOCK, HEADS, DIM, dtype=torch.bfloat16, device="cuda")
        for _ in range(LAYERS)
    ]
    specs = [cuda_layer_spec(i, t, block_dim=0, kv_dim=1) for i, t in enumerate(tensors)]
    return tensors, specs


def cross_layer() -> tuple[list[Tensor], list[KvLayer]]:
    """vLLM's cross-layer single tensor (blocks, layers, 2, block, heads, dim)."""
    whole = torch.randn(BLOCKS, LAYERS, 2, BLOCK, HEADS, DIM, dtype=torch.bfloat16, device="cuda")
    views = [whole[:, i] for i in range(LAYERS)]
    specs = [cuda_layer_spec(i, v, block_dim=0, kv_dim=1) for i, v in enumerate(views)]
    return views, specs


LAYOUTS: dict[str, tuple[Callable[[], tuple[list[Tensor], list[KvLayer]]], int]] = {
    "nhd": (nhd, 1),
    "blocks_first": (blocks_first, 0),
    "cross_layer": (cross_layer, 0),
}


def block_slice(t: Tensor, block_dim: int, ids: list[int]) -> Tensor:
    index = torch.tensor(ids, device=t.device)
    return t.index_select(block_dim, index).view(torch.int16)


def load(client: EngineClient, inst: str, lease: str | None, dst: list[int]) -> None:
    assert lease is not None
    state = LoadState()
    client.load(inst, 0, lease, dst, state)
    state.wait(timeout_s=30)


@pytest.fixture
def gpu_server(start_server: StartServer) -> ServerHandle:
    return start_server(pool_size="1gb")


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_round_trip_is_byte_exact(gpu_server: ServerHandle, instance_id: str, layout: str) -> None:
    make, block_dim = LAYOUTS[layout]
    tensors, specs = make()
    client = gpu_server.client()
    client.register_kv_layers(instance_id, f"ns-{layout}", 0, 1, specs)
    src = list(range(0, 64, 2))  # scattered source blocks
    dst = list(range(127, 95, -1))  # other blocks, reversed
    h = hashes(len(src))
    before = [block_slice(t, block_dim, src).clone() for t in tensors]
    r = client.save(instance_id, 0, src, h)
    assert r.sealed_blocks == len(src)
    for t in tensors:
        t.index_fill_(block_dim, torch.tensor(dst, device="cuda"), 0)
    q = client.query(instance_id, h)
    assert q.hit_blocks == len(src)
    load(client, instance_id, q.lease_id, dst)
    torch.cuda.synchronize()
    for layer, t in enumerate(tensors):
        assert torch.equal(block_slice(t, block_dim, dst), before[layer]), f"layer {layer}"
        # Blocks outside the destination are untouched.
        assert torch.equal(block_slice(t, block_dim, src), before[layer])


@pytest.mark.parametrize("layout", ["cross_layer", "nhd"])
def test_paced_saves_keep_their_rate_and_bytes(
    start_server: StartServer, instance_id: str, layout: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``PEGAFLOW_CUDA_SAVE_GBPS=1``: a save of 8 MiB goes as four 2 MiB groups with 2.1 ms
    between their starts (direct DMAs for cross-layer blocks, batched calls for NHD's
    32 KiB pieces), so it takes at least 6 ms instead of ~0.3, and loads back exact."""
    monkeypatch.setenv("PEGAFLOW_CUDA_SAVE_GBPS", "1")
    monkeypatch.setenv("PEGAFLOW_CUDA_SAVE_PIECE_MB", "2")
    server = start_server(pool_size="1gb")
    make, block_dim = LAYOUTS[layout]
    tensors, specs = make()
    client = server.client()
    client.register_kv_layers(instance_id, f"ns-paced-{layout}", 0, 1, specs)
    src = list(range(32))  # 32 blocks x 256 KiB = 8 MiB
    dst = list(range(64, 96))
    h = hashes(len(src))
    before = [block_slice(t, block_dim, src).clone() for t in tensors]
    torch.cuda.synchronize()
    start = time.perf_counter()
    assert client.save(instance_id, 0, src, h).sealed_blocks == len(src)
    assert time.perf_counter() - start >= 6e-3
    q = client.query(instance_id, h)
    load(client, instance_id, q.lease_id, dst)
    torch.cuda.synchronize()
    for layer, t in enumerate(tensors):
        assert torch.equal(block_slice(t, block_dim, dst), before[layer]), f"layer {layer}"


def test_large_contiguous_blocks_take_the_direct_path(
    gpu_server: ServerHandle, instance_id: str
) -> None:
    """One 4 MiB segment per block per layer: few large DMAs, no staging."""
    tensors = [torch.randn(8, 2 << 20, dtype=torch.float16, device="cuda") for _ in range(2)]
    specs = [cuda_layer_spec(i, t, block_dim=0) for i, t in enumerate(tensors)]
    client = gpu_server.client()
    client.register_kv_layers(instance_id, "ns-big", 0, 1, specs)
    h = hashes(3)
    before = [t[0:3].clone() for t in tensors]
    client.save(instance_id, 0, [0, 1, 2], h)
    q = client.query(instance_id, h)
    load(client, instance_id, q.lease_id, [5, 6, 7])
    torch.cuda.synchronize()
    for layer, t in enumerate(tensors):
        assert torch.equal(t[5:8].view(torch.int16), before[layer].view(torch.int16))


def test_concurrent_save_and_load_on_disjoint_blocks(
    gpu_server: ServerHandle, instance_id: str
) -> None:
    tensors, specs = nhd()
    client = gpu_server.client()
    client.register_kv_layers(instance_id, "ns-conc", 0, 1, specs)
    base = hashes(16)
    client.save(instance_id, 0, list(range(16)), base)
    expected = [block_slice(t, 1, list(range(16))).clone() for t in tensors]
    errors: list[BaseException] = []

    def saver() -> None:
        try:
            for _ in range(10):
                client.save(instance_id, 0, list(range(16, 48)), hashes(32))
        except BaseException as e:
            errors.append(e)

    def loader() -> None:
        try:
            for _ in range(10):
                q = client.query(instance_id, base)
                load(client, instance_id, q.lease_id, list(range(64, 80)))
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=saver), threading.Thread(target=loader)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    torch.cuda.synchronize()
    for layer, t in enumerate(tensors):
        assert torch.equal(block_slice(t, 1, list(range(64, 80))), expected[layer])


def test_unregister_and_register_again(gpu_server: ServerHandle, instance_id: str) -> None:
    tensors, specs = nhd()
    client = gpu_server.client()
    client.register_kv_layers(instance_id, "ns-rereg", 0, 1, specs)
    assert gpu_server.metrics()["pegaflow_open_regions"] == LAYERS
    h = hashes(8)
    before = [block_slice(t, 1, list(range(8))).clone() for t in tensors]
    client.save(instance_id, 0, list(range(8)), h)
    client.unregister_instance(instance_id)
    assert gpu_server.metrics()["pegaflow_open_regions"] == 0
    client.register_kv_layers(instance_id, "ns-rereg", 0, 1, specs)
    q = client.query(instance_id, h)
    assert q.hit_blocks == 8
    load(client, instance_id, q.lease_id, list(range(100, 108)))
    torch.cuda.synchronize()
    for layer, t in enumerate(tensors):
        assert torch.equal(block_slice(t, 1, list(range(100, 108))), before[layer])


def test_pool_becomes_dma_ready(gpu_server: ServerHandle) -> None:
    import time

    deadline = time.monotonic() + 60
    while gpu_server.metrics().get("pegaflow_pool_dma_ready_bytes", 0) == 0:
        assert time.monotonic() < deadline, "pool never pinned"
        time.sleep(0.1)


@pytest.mark.parametrize("strategy", ["batched", "staged", "direct", "ce-gather"])
def test_every_copy_strategy_is_byte_exact(
    start_server: StartServer, monkeypatch: pytest.MonkeyPatch, instance_id: str, strategy: str
) -> None:
    """The server is forced onto one strategy (the environment reaches its process)."""
    monkeypatch.setenv("PEGAFLOW_CUDA_STRATEGY", strategy)
    server = start_server(pool_size="1gb")
    tensors, specs = nhd()
    client = server.client()
    client.register_kv_layers(instance_id, f"ns-{strategy}", 0, 1, specs)
    src, dst = list(range(1, 97, 3)), list(range(96, 128))
    h = hashes(len(src))
    before = [block_slice(t, 1, src).clone() for t in tensors]
    client.save(instance_id, 0, src, h)
    q = client.query(instance_id, h)
    load(client, instance_id, q.lease_id, dst)
    torch.cuda.synchronize()
    for layer, t in enumerate(tensors):
        assert torch.equal(block_slice(t, 1, dst), before[layer]), f"{strategy}: layer {layer}"


# A client whose CUDA_VISIBLE_DEVICES reorders the GPUs: its cuda:0 is physical GPU 1.
_REORDERED_CLIENT = """
import os, sys, torch
from pegaflow import EngineClient, LoadState
from pegaflow.cuda import cuda_layer_spec
client = EngineClient(sys.argv[1])
kv = torch.randn(2, 64, 16, 8, 128, dtype=torch.bfloat16, device="cuda:0")
client.register_kv_layers("reordered", "ns-reordered", 0, 1,
                          [cuda_layer_spec(0, kv, block_dim=1, kv_dim=0)])
hashes = [os.urandom(32) for _ in range(8)]
assert client.save("reordered", 0, list(range(8)), hashes).sealed_blocks == 8
q = client.query("reordered", hashes)
state = LoadState()
client.load("reordered", 0, q.lease_id, list(range(32, 40)), state)
state.wait(timeout_s=30)
torch.cuda.synchronize()
assert torch.equal(kv[:, :8].view(torch.int16), kv[:, 32:40].view(torch.int16))
print("ok", torch.cuda.get_device_properties(0).uuid)
"""


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_gpus_are_matched_by_uuid_whatever_the_client_sees(
    start_server: StartServer, instance_id: str, tmp_path: Path
) -> None:
    """The server serves only its GPU 1. A client that sees the GPUs in reverse order
    (its cuda:0 is GPU 1) is served; a tensor on GPU 0 is refused by name of its UUID."""
    import subprocess
    import sys

    server = start_server(pool_size="256mb", extra_args=["--devices", "1"])
    # The server sees the same devices as this process; the child sees its first two
    # swapped, so its cuda:0 is the server's device 1.
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "0,1").split(",")
    env = dict(os.environ, CUDA_VISIBLE_DEVICES=f"{visible[1]},{visible[0]}")
    done = subprocess.run(
        [sys.executable, "-c", _REORDERED_CLIENT, server.endpoint],
        env=env,
        cwd=tmp_path,  # not the source tree: the installed package has the extension
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == ["ok", str(torch.cuda.get_device_properties(1).uuid)], done.stdout
    on_gpu0 = torch.randn(2, 8, 16, 8, 128, dtype=torch.bfloat16, device="cuda:0")
    with pytest.raises(PegaflowInvalidArgument, match="no GPU with UUID"):
        server.client().register_kv_layers(
            instance_id, "ns-gpu0", 0, 1, [cuda_layer_spec(0, on_gpu0, block_dim=1, kv_dim=0)]
        )
