"""The SSD tier end to end through a real server on a real disk: how fast saved blocks
reach the SSD (write-through), and how fast a restarted server copies a long prefix up
from it (query until the hit, the server's io_uring reads), bytes checked.

    python scripts/bench_ssd_tier.py --path /var/tmp/pf-ssd-bench [--blocks 2048] [--layers 2]

A block is ``layers`` times 64 KiB (Llama-3.1-8B's per-layer block: K and V of 16
tokens, 8 heads of 128, fp16). Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
import urllib.error
from pathlib import Path

import numpy as np

from pegaflow import EngineClient, LoadState, SharedKvCache
from pegaflow.server import free_port, read_metrics, spawn_server


def metric(addr: str, name: str) -> float:
    return read_metrics(addr).get(name, 0.0)


def wait_recovered(addr: str, timeout_s: float = 30.0) -> None:
    """Waits until the server replayed its SSD index."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if metric(addr, "pegaflow_ssd_recovering") == 0:
                return
        except (OSError, urllib.error.URLError):
            pass
        if time.monotonic() > deadline:
            raise TimeoutError("the SSD index was not replayed")
        time.sleep(0.005)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--path", required=True, type=Path)
    parser.add_argument("--blocks", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument(
        "--pool-size", default="4gb", help="writes may pin an eighth of it (else dropped)"
    )
    args = parser.parse_args()
    shutil.rmtree(args.path, ignore_errors=True)
    args.path.mkdir(parents=True)
    block_bytes = args.layers * 64 * 1024
    capacity_kb = (args.blocks * block_bytes * 2) // 1024
    ssd = ["--ssd-cache-path", str(args.path), "--ssd-cache-capacity", f"{capacity_kb}kb"]
    kv = SharedKvCache(args.layers, (2, args.blocks, 16, 8, 128), np.float16, block_dim=1, kv_dim=0)
    rng = np.random.default_rng(1)
    for layer in kv.layers:
        flat = layer.view(np.uint8).reshape(-1)
        flat[...] = rng.integers(0, 256, size=flat.size, dtype=np.uint8)
    originals = [layer.view(np.uint8).copy() for layer in kv.layers]
    hashes = [rng.bytes(32) for _ in range(args.blocks)]
    ids = list(range(args.blocks))
    result: dict[str, object] = {"blocks": args.blocks, "block_bytes": block_bytes}

    metrics_addr = f"127.0.0.1:{free_port()}"
    extra = [*ssd, "--ssd-write-queue-depth", "4096"]
    with spawn_server(args.pool_size, extra, metrics_addr=metrics_addr) as endpoint:
        client = EngineClient(endpoint)
        wait_recovered(metrics_addr)
        client.register_kv_layers("bench", "bench", 0, 1, kv.layer_specs())
        started = time.perf_counter()
        for at in range(0, args.blocks, 64):
            client.save("bench", 0, ids[at : at + 64], hashes[at : at + 64])
        saved = time.perf_counter() - started
        deadline = time.monotonic() + 120
        while True:
            metrics = read_metrics(metrics_addr)
            stored = metrics.get("pegaflow_ssd_blocks", 0.0)
            dropped = metrics.get("pegaflow_ssd_dropped_writes_total", 0.0)
            if stored + dropped >= args.blocks or time.monotonic() > deadline:
                break
            time.sleep(0.005)
        written = time.perf_counter() - started
        assert dropped == 0, f"{dropped} writes dropped: raise --pool-size"
        client.close()
    total = args.blocks * block_bytes
    result |= {
        "save_s": round(saved, 3),
        "written_s": round(written, 3),
        "write_gb_per_s": round(total / written / 1e9, 3),
        "dropped_writes": dropped,
    }

    with spawn_server(args.pool_size, ssd, metrics_addr=metrics_addr) as endpoint:
        client = EngineClient(endpoint)
        wait_recovered(metrics_addr)
        client.register_kv_layers("bench", "bench", 0, 1, kv.layer_specs())
        for layer in kv.layers:
            layer.view(np.uint8)[...] = 0
        started = time.perf_counter()
        loading = 0
        while True:
            answer = client.query("bench", hashes)
            if not answer.loading:
                break
            loading += 1
            time.sleep(0.0005)
        copied_up = time.perf_counter() - started
        assert answer.hit_blocks == args.blocks and answer.lease_id, answer
        state = LoadState()
        client.load("bench", 0, answer.lease_id, ids, state)
        state.wait(30)
        exact = all(
            np.array_equal(layer.view(np.uint8), original)
            for layer, original in zip(kv.layers, originals, strict=True)
        )
        client.close()
    result |= {
        "copy_up_s": round(copied_up, 3),
        "copy_up_gb_per_s": round(total / copied_up / 1e9, 3),
        "loading_answers": loading,
        "byte_exact": exact,
    }
    kv.close()
    shutil.rmtree(args.path, ignore_errors=True)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
