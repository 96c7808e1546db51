"""Saves and loads of per-layer KV tensors through the connector's worker half, staged
(gathered into a staging buffer in this process, whole-block DMAs by the server) and
direct (the server copies each per-layer piece), in the same run; checks the bytes.

``--layout`` picks the per-layer tensors (blocks first, as vLLM hands them over):
``llama`` (default) 32 layers of ``[blocks, 16, 8, 256]`` bf16, 64 KiB per block and
layer (Llama-3.1-8B in vLLM 0.26's FlashAttention layout); ``gqa80`` 80 layers of 32 KiB;
``mla`` 61 layers of ``[blocks, 64, 576]`` (72 KiB, DeepSeek-like); ``small8k`` 24 layers
of 8 KiB; ``tp4k`` 32 layers of 4 KiB (a TP-sharded GQA rank); ``fp8`` Llama's shape in
1-byte elements (32 KiB). Requests are 512 MiB unless ``--blocks`` says otherwise.
Starts its own server (the installed ``pegaflow-server``). Prints one JSON line per mode.

``--concurrent N`` then runs two engine processes against the same server at once, one
saving N requests of new blocks and one loading N times a request it saved first (the
issue's "save and load at once from two instances"), and prints their total GB/s.

    python scripts/bench_staging.py [--layout llama] [--blocks N] [--reps 5] [--device cuda]
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time
import uuid
from typing import Any

from pegaflow.connector.config import ConnectorConfig
from pegaflow.connector.metadata import LoadJob, PegaConnectorMetadata, SaveJob
from pegaflow.connector.worker import WorkerSide
from pegaflow.server import free_port, read_metrics, spawn_server

LAYOUTS: dict[str, tuple[int, tuple[int, ...], str]] = {
    # name: (layers, a block's shape in one layer, element type)
    "llama": (32, (16, 8, 256), "bfloat16"),
    "gqa80": (80, (16, 8, 128), "bfloat16"),
    "mla": (61, (64, 576), "bfloat16"),
    "small8k": (24, (16, 2, 128), "bfloat16"),
    "tp4k": (32, (16, 1, 128), "bfloat16"),
    "fp8": (32, (16, 8, 256), "uint8"),
}
REQUEST_BYTES = 512 << 20


def block_bytes(layout: str) -> int:
    """Bytes of one block over all layers."""
    layers, shape, dtype = LAYOUTS[layout]
    elements = 1
    for size in shape:
        elements *= size
    return layers * elements * (1 if dtype == "uint8" else 2)


def make_caches(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    layers, shape, dtype = LAYOUTS[args.layout]
    full = (args.num_blocks, *shape)

    def layer() -> Any:
        if dtype == "uint8":
            return torch.randint(0, 256, full, device=args.device, dtype=torch.uint8)
        return torch.randn(full, device=args.device).to(torch.bfloat16)

    return {f"model.layers.{i}.self_attn.attn": layer() for i in range(layers)}


def server_times(metrics_addr: str) -> dict[str, float]:
    """The server's copy seconds per direction and RPC seconds per method, summed."""
    metrics = read_metrics(metrics_addr)
    out: dict[str, float] = {}
    for key, value in metrics.items():
        if key.startswith("pegaflow_transfer_duration_seconds_sum{"):
            direction = "load" if 'direction="load"' in key else "save"
            out[f"server_{direction}_copy"] = out.get(f"server_{direction}_copy", 0.0) + value
        elif key.startswith("pegaflow_transfer_duration_seconds_count{"):
            direction = "load" if 'direction="load"' in key else "save"
            out[f"server_{direction}_copies"] = out.get(f"server_{direction}_copies", 0.0) + value
        elif key.startswith("pegaflow_rpc_duration_seconds_sum{"):
            method = key.split('method="', 1)[1].split('"', 1)[0]
            if method in ("Save", "Load", "Query"):
                out[f"rpc_{method}"] = out.get(f"rpc_{method}", 0.0) + value
    return out


def gpu_ms(work: Any, device: str) -> float:
    """Milliseconds the GPU spends on ``work()`` (wall time on the CPU)."""
    import torch

    if device != "cuda":
        t0 = time.perf_counter()
        work()
        return (time.perf_counter() - t0) * 1e3
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    work()
    end.record()
    torch.cuda.synchronize()
    return float(start.elapsed_time(end))


def gemm_ms(args: argparse.Namespace, reps: int = 30) -> float:
    """Milliseconds of ``reps`` square bf16 matmuls on this thread's current stream."""
    import torch

    size = args.gemm_size
    a = torch.randn(size, size, device=args.device).to(torch.bfloat16)
    b = torch.randn(size, size, device=args.device).to(torch.bfloat16)
    c = torch.empty_like(a)
    if args.device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        torch.mm(a, b, out=c)
    if args.device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) * 1e3


def gemm_slowdown(args: argparse.Namespace, copies: Any) -> dict[str, Any]:
    """The engine's side of the goal "a concurrent GEMM in the client process slowed
    ≤ 3%": a matmul loop in this process alone, then while ``copies()`` (saves and loads
    through the worker, its gathers and scatters in this same CUDA context) runs in a
    loop on another thread; medians of 3."""
    alone = statistics.median(gemm_ms(args) for _ in range(3))
    stop = threading.Event()
    count = [0]

    def loop() -> None:
        while not stop.is_set():
            copies()
            count[0] += 1

    thread = threading.Thread(target=loop)
    thread.start()
    time.sleep(0.05)
    try:
        during = statistics.median(gemm_ms(args) for _ in range(3))
    finally:
        stop.set()
        thread.join()
    return {
        "gemm_alone_ms": round(alone, 2),
        "gemm_with_copies_ms": round(during, 2),
        "gemm_slowdown_pct": round((during / alone - 1) * 100, 2),
        "round_trips_during_gemm": count[0],
    }


def delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {k: after[k] - before.get(k, 0.0) for k in after}


def run(endpoint: str, metrics_addr: str, args: argparse.Namespace, staging: str) -> dict[str, Any]:
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
    per_block = block_bytes(args.layout)
    saves: list[float] = []
    loads: list[float] = []
    parts: list[dict[str, float]] = []

    def round_trip(tag: str) -> tuple[float, float]:
        """One save of blocks ``src`` and one query+load of them into ``dst``, in ms."""
        hashes = [uuid.uuid4().bytes * 2 for _ in range(n)]
        if args.device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        worker.wait_for_save(PegaConnectorMetadata(save=SaveJob(src, hashes, [f"s{tag}"])))
        assert worker.drain(60.0)
        save_ms = (time.perf_counter() - t0) * 1e3
        t0 = time.perf_counter()
        lease = client.query(config.instance_id, hashes).lease_id
        assert lease is not None
        worker.start_load_kv(PegaConnectorMetadata(loads=[LoadJob(f"l{tag}", lease, dst)]))
        done: set[str] = set()
        while not done:
            done = worker.get_finished(set())[1]
            time.sleep(args.poll_s)
        assert worker.take_load_errors() == set()
        return save_ms, (time.perf_counter() - t0) * 1e3

    for rep in range(args.reps):
        before = server_times(metrics_addr)
        if worker.staging is not None:
            before |= {k: v for k, v in worker.staging.timings.items()}
        save_ms, load_ms = round_trip(str(rep))
        saves.append(save_ms)
        loads.append(load_ms)
        after = server_times(metrics_addr)
        if worker.staging is not None:
            after |= {k: v for k, v in worker.staging.timings.items()}
        parts.append(delta(before, after))
    gemm = gemm_slowdown(args, lambda: round_trip("g")) if args.gemm else {}
    split = {
        (k if k.endswith("copies") else f"{k.removesuffix('_s')}_ms"): round(
            statistics.median(p.get(k, 0.0) for p in parts) * (1 if k.endswith("copies") else 1e3),
            3,
        )
        for k in parts[-1]
    }
    if worker.staging is not None:
        buffer, chunk = worker.staging.buffer, worker.staging.chunk
        ids = src[:chunk]
        buffer.gather(ids, 2 * chunk)  # the load half's slots hold src's blocks
        split["gpu_gather_chunk_ms"] = round(gpu_ms(lambda: buffer.gather(ids, 0), args.device), 3)
        split["gpu_scatter_chunk_ms"] = round(
            gpu_ms(lambda: buffer.scatter(2 * chunk, dst[:chunk]), args.device), 3
        )
        split["chunk_blocks"] = chunk
    exact = all(torch.equal(t[:n], t[n : 2 * n]) for t in caches.values())
    worker.shutdown()
    link_ms = n * per_block / args.link_gbps / 1e6
    return {
        "layout": args.layout,
        "staging": staging,
        "staged": worker.staging is not None,
        "blocks": n,
        "bytes": n * per_block,
        "save_ms_p50": round(statistics.median(saves), 2),
        "query_load_ms_p50": round(statistics.median(loads), 2),
        "save_x_link": round(statistics.median(saves) / link_ms, 2),
        "load_x_link": round(statistics.median(loads) / link_ms, 2),
        "save_ms": [round(s, 2) for s in saves],
        "load_ms": [round(s, 2) for s in loads],
        "byte_exact": exact,
        "split_p50": split,
        **gemm,
    }


def _transfer_loop(
    role: str, endpoint: str, args: argparse.Namespace, staging: str, start: Any, out: Any
) -> None:
    """One engine process of ``--concurrent``: saves (``role="save"``) or loads
    ``args.concurrent`` requests once every process is ready; puts (role, seconds, bytes,
    byte_exact, first start, last end) on ``out``."""
    import torch

    if args.device == "cuda":
        torch.cuda.init()
    config = ConnectorConfig(
        instance_id=f"bench-{role}-{uuid.uuid4().hex[:8]}",
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
    src, dst = list(range(n)), list(range(n, 2 * n))
    stored = [uuid.uuid4().bytes * 2 for _ in range(n)]
    worker.wait_for_save(PegaConnectorMetadata(save=SaveJob(src, stored, ["first"])))
    assert worker.drain(60.0)
    if args.device == "cuda":
        torch.cuda.synchronize()
    start.wait()
    t0 = time.perf_counter()
    for rep in range(args.concurrent):
        if role == "save":
            hashes = [uuid.uuid4().bytes * 2 for _ in range(n)]
            worker.wait_for_save(PegaConnectorMetadata(save=SaveJob(src, hashes, [f"s{rep}"])))
            assert worker.drain(60.0)
        else:
            lease = client.query(config.instance_id, stored).lease_id
            assert lease is not None
            worker.start_load_kv(PegaConnectorMetadata(loads=[LoadJob(f"l{rep}", lease, dst)]))
            done: set[str] = set()
            while not done:
                done = worker.get_finished(set())[1]
                time.sleep(args.poll_s)
            assert worker.take_load_errors() == set()
    t1 = time.perf_counter()
    exact = role == "save" or all(torch.equal(t[:n], t[n : 2 * n]) for t in caches.values())
    worker.shutdown()
    out.put((role, t1 - t0, args.concurrent * n * block_bytes(args.layout), exact, t0, t1))


def concurrent(endpoint: str, args: argparse.Namespace, staging: str) -> dict[str, Any]:
    """Saves in one process while another loads, through one server."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")  # CUDA does not survive fork
    start, out = ctx.Barrier(2), ctx.Queue()
    procs = [
        ctx.Process(target=_transfer_loop, args=(role, endpoint, args, staging, start, out))
        for role in ("save", "load")
    ]
    for proc in procs:
        proc.start()
    results = {r[0]: r for r in (out.get(timeout=600) for _ in procs)}
    for proc in procs:
        proc.join()
    wall = max(r[5] for r in results.values()) - min(r[4] for r in results.values())
    total = sum(r[2] for r in results.values())
    return {
        "layout": args.layout,
        "staging": staging,
        "concurrent_requests": args.concurrent,
        "bytes_each_way": results["save"][2],
        "save_gbps": round(results["save"][2] / results["save"][1] / 1e9, 2),
        "load_gbps": round(results["load"][2] / results["load"][1] / 1e9, 2),
        "total_gbps": round(total / wall / 1e9, 2),
        "wall_s": round(wall, 3),
        "byte_exact": all(r[3] for r in results.values()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--layout", choices=sorted(LAYOUTS), default="llama")
    parser.add_argument("--blocks", type=int, help="blocks a request (default: 512 MiB)")
    parser.add_argument("--num-blocks", type=int, help="KV cache blocks (default: 2 requests)")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--staging-mib", type=int, default=128)
    parser.add_argument("--modes", default="on,off", help="staging modes to run, in order")
    parser.add_argument("--link-gbps", type=float, default=55.0, help="link limit, GB/s")
    parser.add_argument("--pool-size", default="8gb")
    parser.add_argument(
        "--poll-s", type=float, default=0.0005, help="pause between polls (vLLM steps)"
    )
    parser.add_argument(
        "--gemm", action="store_true", help="also time a matmul loop alone and during copies"
    )
    parser.add_argument("--gemm-size", type=int, default=8192)
    parser.add_argument(
        "--concurrent",
        type=int,
        default=0,
        help="also save and load this many requests at once from two processes, per mode",
    )
    args = parser.parse_args()
    if args.blocks is None:
        args.blocks = max(1, REQUEST_BYTES // block_bytes(args.layout))
    if args.num_blocks is None:
        args.num_blocks = 2 * args.blocks + 16
    metrics_addr = f"127.0.0.1:{free_port()}"
    with spawn_server(
        pool_size=args.pool_size, startup_timeout_s=120.0, metrics_addr=metrics_addr
    ) as endpoint:
        for staging in args.modes.split(","):
            print(json.dumps(run(endpoint, metrics_addr, args, staging)), flush=True)
        for staging in args.modes.split(",") if args.concurrent else ():
            print(json.dumps(concurrent(endpoint, args, staging)), flush=True)


if __name__ == "__main__":
    main()
