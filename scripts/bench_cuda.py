"""CUDA benchmark on a GPU machine: save, query+load, both at once, compute interference.

Starts the real pegaflow-server (console script of the installed wheel), registers a
Llama-3.1-8B-like vLLM KV cache over CUDA IPC (32 layers of (2, 4000, 16, 8, 128) bf16,
FlashAttention NHD: 32 KiB per K or V segment) and times, with random scattered block ids
and fresh hashes every round:

- 8B-4K: 256 blocks (512 MiB, 16,384 segments); 8B-256: 16 blocks (32 MiB)
- `--layout cross`: vLLM's cross-layer layout, one (4000, 32, 2, 16, 8, 128) tensor whose
  blocks are contiguous across layers (2 MiB each), registered as per-layer views
- save (one RPC, returns when sealed); query+load (query + load + poll until done)
- save and load of different blocks at once (GB/s in total)
- an 8192^3 bf16 matmul loop alone and while copies run (slowdown)

Reference in the same run: one 1 GiB pinned copy each way (the link limit). Bytes of the
last round are verified. Writes $OUT/bench_cuda.json when OUT is set. With
--peer-results (the peg_results.json of shared/bench/peg_bench.py, run in the same GPU
session) it also prints our time divided by the peer's.

    python scripts/bench_cuda.py --reps 20 [--peer-results peg_results.json]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import statistics
import subprocess
import threading
import time
import urllib.request
from typing import Any

import numpy as np

import pegaflow as pf
from pegaflow.cuda import cuda_layer_specs

LAYERS, NUM_BLOCKS, BLOCK, HEADS, DIM = 32, 4000, 16, 8, 128
SEGMENT = BLOCK * HEADS * DIM * 2
WORKLOADS = {"8B-4K": 256, "8B-256": 16}


def free_ports(n: int) -> list[int]:
    """`n` distinct free ports (all sockets held open together, so none repeats)."""
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in sockets]
    finally:
        for s in sockets:
            s.close()


def metrics(url: str) -> dict[str, float]:
    with urllib.request.urlopen(url, timeout=5) as r:
        lines = r.read().decode().splitlines()
    return {k: float(v) for k, v in (ln.rsplit(" ", 1) for ln in lines if ln[:1] != "#")}


def pct(xs: list[float], q: float) -> float:
    return float(np.percentile(np.array(xs), q))


def summary(ms: list[float], nbytes: int) -> dict[str, float]:
    return {
        "p50_ms": pct(ms, 50),
        "p99_ms": pct(ms, 99),
        "GBps_p50": nbytes / (pct(ms, 50) / 1e3) / 1e9,
        "n": len(ms),
    }


def link_limit(torch: Any) -> dict[str, float]:
    n = 1 << 30
    host = torch.empty(n, dtype=torch.uint8, pin_memory=True)
    dev = torch.empty(n, dtype=torch.uint8, device="cuda")
    out = {}
    for name, dst, src in (("d2h", host, dev), ("h2d", dev, host)):
        times = []
        for _ in range(8):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            dst.copy_(src, non_blocking=True)
            torch.cuda.synchronize()
            times.append((time.perf_counter() - t0) * 1e3)
        out[name] = summary(times[2:], n)["GBps_p50"]
    return out


class Bench:
    def __init__(self, client: pf.EngineClient, kv: list[Any], torch: Any, block_dim: int) -> None:
        self.client, self.kv, self.torch, self.block_dim = client, kv, torch, block_dim
        self.rng = random.Random(0)
        self.state = pf.LoadState()

    def fresh(self, n: int) -> list[bytes]:
        return [os.urandom(32) for _ in range(n)]

    def ids(self, n: int, avoid: set[int] = frozenset()) -> list[int]:  # type: ignore[assignment]
        pool = [i for i in range(NUM_BLOCKS) if i not in avoid]
        return self.rng.sample(pool, n)

    def save(self, ids: list[int], hashes: list[bytes]) -> float:
        t0 = time.perf_counter()
        r = self.client.save("bench", 0, ids, hashes)
        dt = (time.perf_counter() - t0) * 1e3
        assert r.sealed_blocks == len(ids), r
        return dt

    def query_load(self, hashes: list[bytes], dst: list[int]) -> float:
        # One completion flag serves every load, as the vLLM connector reuses its pool.
        state = self.state
        state.reset()
        t0 = time.perf_counter()
        q = self.client.query("bench", hashes)
        assert q.hit_blocks == len(hashes) and q.lease_id is not None
        self.client.load("bench", 0, q.lease_id, dst, state)
        state.wait(60)
        return (time.perf_counter() - t0) * 1e3

    def verify(self, src: list[int], dst: list[int]) -> bool:
        torch = self.torch
        s, d = torch.tensor(src, device="cuda"), torch.tensor(dst, device="cuda")
        return all(
            torch.equal(
                t.index_select(self.block_dim, s).view(torch.int16),
                t.index_select(self.block_dim, d).view(torch.int16),
            )
            for t in self.kv
        )

    def workload(self, blocks: int, reps: int) -> dict[str, Any]:
        nbytes = blocks * LAYERS * 2 * SEGMENT
        saves, loads = [], []
        ok = True
        for i in range(reps + 2):
            src = self.ids(blocks)
            dst = self.ids(blocks, set(src))
            hashes = self.fresh(blocks)
            s = self.save(src, hashes)
            ld = self.query_load(hashes, dst)
            if i >= 2:  # two warm-up rounds
                saves.append(s)
                loads.append(ld)
            if i == reps + 1:
                self.torch.cuda.synchronize()
                ok = self.verify(src, dst)
        return {
            "bytes": nbytes,
            "save": summary(saves, nbytes),
            "query_load": summary(loads, nbytes),
            "verified": ok,
        }

    def both_at_once(self, reps: int) -> dict[str, Any]:
        blocks = 256
        nbytes = blocks * LAYERS * 2 * SEGMENT
        walls = []
        for _ in range(reps):
            a_src = self.ids(blocks)
            a_hashes = self.fresh(blocks)
            self.save(a_src, a_hashes)
            b_src = self.ids(blocks, set(a_src))
            a_dst = self.ids(blocks, set(a_src) | set(b_src))
            b_hashes = self.fresh(blocks)
            t0 = time.perf_counter()
            saver = threading.Thread(target=self.save, args=(b_src, b_hashes))
            saver.start()
            self.query_load(a_hashes, a_dst)
            saver.join()
            walls.append((time.perf_counter() - t0) * 1e3)
        return {"wall": summary(walls, 2 * nbytes)}

    def interference(self, iters: int = 40) -> dict[str, float]:
        """A matmul loop captured in a CUDA graph (so CPU and GIL contention cannot stretch
        it) timed alone and while saves and loads run."""
        torch = self.torch
        a = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
        stream = torch.cuda.Stream()
        with torch.cuda.stream(stream):
            a @ a  # warm up cuBLAS before capture
        stream.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            for _ in range(iters):
                a @ a

        def loop() -> float:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            with torch.cuda.stream(stream):
                start.record()
                graph.replay()
                end.record()
            end.synchronize()
            return float(start.elapsed_time(end))

        loop()
        alone = statistics.median(loop() for _ in range(7))

        # Reference: plain 1 GiB pinned DMAs both ways, no PegaFlow at all.
        stop = threading.Event()

        def dma() -> None:
            n = 1 << 30
            host = torch.empty(n, dtype=torch.uint8, pin_memory=True)
            dev = torch.empty(n, dtype=torch.uint8, device="cuda")
            side = torch.cuda.Stream()
            with torch.cuda.stream(side):
                while not stop.is_set():
                    host.copy_(dev, non_blocking=True)
                    dev.copy_(host, non_blocking=True)
                    side.synchronize()

        t = threading.Thread(target=dma)
        t.start()
        time.sleep(0.3)
        dma_busy = statistics.median(loop() for _ in range(7))
        stop.set()
        t.join()
        stop = threading.Event()
        busy_copies = [0]

        def copies() -> None:
            hashes = self.fresh(256)
            src = self.ids(256)
            self.save(src, hashes)
            while not stop.is_set():
                self.save(self.ids(256), self.fresh(256))
                self.query_load(hashes, self.ids(256, set(src)))
                busy_copies[0] += 2

        t = threading.Thread(target=copies)
        t.start()
        time.sleep(0.3)
        busy = statistics.median(loop() for _ in range(7))
        stop.set()
        t.join()
        return {
            "alone_ms": alone,
            "with_copies_ms": busy,
            "slowdown_pct": (busy / alone - 1) * 100,
            "copies_during": busy_copies[0],
            "plain_dma_slowdown_pct": (dma_busy / alone - 1) * 100,
        }


def peer_ratios(res: dict[str, Any], path: str) -> None:
    """Prints our p50 time ÷ the peer's (below 1 means we are faster)."""
    with open(path) as f:
        runs = json.load(f)["runs"]
    for mode, results in runs.items():
        for name, blocks in WORKLOADS.items():
            for ours_key, peer_key in (("save", "save"), ("query_load", "query+load")):
                peer = results.get(f"{peer_key} {blocks} blk x {LAYERS} layers")
                if peer:
                    ratio = res[name][ours_key]["p50_ms"] / peer["p50_ms"]
                    res.setdefault("vs_peer", {})[f"{mode} {name} {ours_key}"] = ratio
                    print(f"{name} {peer_key}: ours / {mode} = {ratio:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--pool-size", default="8gb")
    parser.add_argument("--peer-results", help="peg_results.json from the peer's benchmark")
    parser.add_argument("--layout", choices=["nhd", "cross"], default="nhd")
    args = parser.parse_args()
    import torch

    res: dict[str, Any] = {"device": torch.cuda.get_device_name(0)}
    grpc_port, http_port = free_ports(2)
    endpoint, http = f"127.0.0.1:{grpc_port}", f"127.0.0.1:{http_port}"
    t0 = time.perf_counter()
    flags = ["--addr", endpoint, "--pool-size", args.pool_size, "--metrics-addr", http]
    server = subprocess.Popen(["pegaflow-server", *flags, "--log-level", "info"])
    try:
        probe = pf.EngineClient(endpoint, timeout_s=0.5)
        while True:
            try:
                probe.health()
                break
            except pf.PegaflowError:
                if server.poll() is not None:
                    raise RuntimeError(f"pegaflow-server exited with {server.returncode}") from None
                time.sleep(0.005)
        res["serving_s"] = time.perf_counter() - t0
        while metrics(f"http://{http}/metrics").get("pegaflow_pool_dma_ready_bytes", 0) == 0:
            time.sleep(0.05)
            assert time.perf_counter() - t0 < 300, "pool never became DMA-ready"
        res["pool_dma_ready_s"] = time.perf_counter() - t0
        print(
            f"serving after {res['serving_s']:.2f} s, "
            f"pool DMA-ready after {res['pool_dma_ready_s']:.1f} s"
        )

        res["link_GBps"] = link_limit(torch)
        print("link limit (1 GiB pinned):", res["link_GBps"])
        res["layout"] = args.layout
        if args.layout == "cross":
            whole = torch.empty(
                NUM_BLOCKS, LAYERS, 2, BLOCK, HEADS, DIM, dtype=torch.bfloat16, device="cuda"
            )
            whole.view(torch.int16).random_()
            kv = [whole[:, i] for i in range(LAYERS)]
            block_dim, kv_dim = 0, 1
        else:
            kv = []
            for _ in range(LAYERS):
                t = torch.empty(
                    2, NUM_BLOCKS, BLOCK, HEADS, DIM, dtype=torch.bfloat16, device="cuda"
                )
                t.view(torch.int16).random_()
                kv.append(t)
            block_dim, kv_dim = 1, 0
        client = pf.EngineClient(endpoint, timeout_s=60)
        specs = cuda_layer_specs(kv, block_dim=block_dim, kv_dim=kv_dim)
        client.register_kv_layers("bench", "bench-ns", 0, 1, specs)
        bench = Bench(client, kv, torch, block_dim)
        for name, blocks in WORKLOADS.items():
            r = bench.workload(blocks, args.reps)
            res[name] = r
            link = res["link_GBps"]
            sv, ql = r["save"], r["query_load"]
            print(
                f"{name}: save p50 {sv['p50_ms']:.2f} ms p99 {sv['p99_ms']:.2f} ms "
                f"({sv['GBps_p50']:.1f} GB/s, {sv['GBps_p50'] / link['d2h']:.2f}x link) | "
                f"query+load p50 {ql['p50_ms']:.2f} ms p99 {ql['p99_ms']:.2f} ms "
                f"({ql['GBps_p50']:.1f} GB/s, {ql['GBps_p50'] / link['h2d']:.2f}x link) "
                f"| verified {r['verified']}"
            )
        res["both"] = bench.both_at_once(max(5, args.reps // 2))
        print(
            f"save+load at once (2 x 512 MiB): p50 {res['both']['wall']['p50_ms']:.2f} ms, "
            f"{res['both']['wall']['GBps_p50']:.1f} GB/s total"
        )
        res["interference"] = bench.interference()
        print("matmul loop:", res["interference"])
        client.close()
        if args.peer_results:
            peer_ratios(res, args.peer_results)
    finally:
        server.terminate()
        server.wait(60)
    out = os.environ.get("OUT")
    if out:
        with open(os.path.join(out, "bench_cuda.json"), "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
