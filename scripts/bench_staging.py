"""Saves and loads of per-layer KV tensors through the connector's worker half, staged
(gathered into a staging buffer in this process, whole-block DMAs by the server) and
direct (the server copies each per-layer piece), in the same run; checks the bytes.

Llama-3.1-8B-shaped by default: 32 layers of ``[blocks, 16, 8, 256]`` bf16 (64 KiB per
block and layer, vLLM 0.26's FlashAttention layout), 256-block requests (512 MiB).
Starts its own server (the installed ``pegaflow-server``). Prints one JSON line per mode.

    python scripts/bench_staging.py [--blocks 256] [--reps 5] [--device cuda]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import uuid
from typing import Any

from pegaflow.connector.config import ConnectorConfig
from pegaflow.connector.metadata import LoadJob, PegaConnectorMetadata, SaveJob
from pegaflow.connector.worker import WorkerSide
from pegaflow.server import spawn_server


def make_caches(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    shape = (args.num_blocks, 16, args.heads, 2 * args.head_dim)
    return {
        f"model.layers.{i}.self_attn.attn": torch.randn(shape, device=args.device).to(
            torch.bfloat16
        )
        for i in range(args.layers)
    }


def run(endpoint: str, args: argparse.Namespace, staging: str) -> dict[str, Any]:
    import torch

    config = ConnectorConfig(
        instance_id=f"bench-{staging}-{uuid.uuid4().hex[:8]}",
        endpoint=endpoint,
        staging=staging,
        staging_bytes=args.staging_mib << 20,
    )
    worker = WorkerSide(config, 0, 1, {"model": f"bench-{staging}"})
    caches = make_caches(args)
    worker.register_kv_caches(caches, args.num_blocks)
    client = worker.link.client if worker.link else None
    assert client is not None
    n = args.blocks
    src = list(range(n))
    dst = list(range(n, 2 * n))
    block_bytes = args.layers * 16 * args.heads * 2 * args.head_dim * 2
    saves: list[float] = []
    loads: list[float] = []
    for rep in range(args.reps):
        hashes = [uuid.uuid4().bytes * 2 for _ in range(n)]
        if args.device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        worker.wait_for_save(PegaConnectorMetadata(save=SaveJob(src, hashes, [f"s{rep}"])))
        assert worker.drain(60.0)
        saves.append((time.perf_counter() - t0) * 1e3)
        t0 = time.perf_counter()
        lease = client.query(config.instance_id, hashes).lease_id
        assert lease is not None
        worker.start_load_kv(PegaConnectorMetadata(loads=[LoadJob(f"l{rep}", lease, dst)]))
        done: set[str] = set()
        while not done:
            done = worker.get_finished(set())[1]
            time.sleep(args.poll_s)
        loads.append((time.perf_counter() - t0) * 1e3)
        assert worker.take_load_errors() == set()
    exact = all(torch.equal(t[:n], t[n : 2 * n]) for t in caches.values())
    worker.shutdown()
    link_ms = n * block_bytes / args.link_gbps / 1e6
    return {
        "staging": staging,
        "staged": worker.staging is not None,
        "blocks": n,
        "bytes": n * block_bytes,
        "save_ms_p50": round(statistics.median(saves), 2),
        "query_load_ms_p50": round(statistics.median(loads), 2),
        "save_x_link": round(statistics.median(saves) / link_ms, 2),
        "load_x_link": round(statistics.median(loads) / link_ms, 2),
        "save_ms": [round(s, 2) for s in saves],
        "load_ms": [round(s, 2) for s in loads],
        "byte_exact": exact,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--num-blocks", type=int, default=600)
    parser.add_argument("--blocks", type=int, default=256)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--staging-mib", type=int, default=128)
    parser.add_argument("--link-gbps", type=float, default=55.0, help="link limit, GB/s")
    parser.add_argument("--pool-size", default="8gb")
    parser.add_argument(
        "--poll-s", type=float, default=0.0005, help="pause between polls (vLLM steps)"
    )
    args = parser.parse_args()
    with spawn_server(pool_size=args.pool_size, startup_timeout_s=120.0) as endpoint:
        for staging in ("on", "off"):
            print(json.dumps(run(endpoint, args, staging)), flush=True)


if __name__ == "__main__":
    main()
