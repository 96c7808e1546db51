"""Host-backend benchmark: save / load throughput, query latency, start-up time.

Runs a real pegaflow-server (the console script of the installed wheel) and drives it
with the Python client over shared memory. Throughput is reported as a ratio to one
single-threaded memcpy (numpy.copyto) of the same number of bytes measured in the same
run. Workloads follow shared/bench/README.md: "8B-4K" is 256 blocks x 32 layers x K,V x
32 KiB (512 MiB), "8B-256" is 16 blocks (32 MiB).

    python scripts/bench_host.py --reps 20
"""

from __future__ import annotations

import argparse
import itertools
import os
import socket
import statistics
import subprocess
import time
import urllib.request
from collections.abc import Callable

import numpy as np

import pegaflow as pf

LAYERS = 32
# (K/V, blocks, block_size, kv_heads, head_dim) in 16-bit: 32 KiB per K or V segment.
BLOCK_SIZE, KV_HEADS, HEAD_DIM = 16, 8, 128
WORKLOADS = {"8B-4K": 256, "8B-256": 16}
# Distinct hashes for every round of the run, so each save really copies.
_ROUNDS = itertools.count()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    """A running pegaflow-server."""

    def __init__(self, proc: subprocess.Popen[bytes], endpoint: str, metrics: str) -> None:
        self.proc, self.endpoint, self.metrics = proc, endpoint, metrics

    def pool_ready(self) -> bool:
        """True once every pool page is populated (pegaflow_pool_ready_bytes = capacity)."""
        with urllib.request.urlopen(self.metrics, timeout=5) as r:
            lines = r.read().decode().splitlines()
        values = dict(line.rsplit(" ", 1) for line in lines if line[:1] != "#")
        ready = float(values["pegaflow_pool_ready_bytes"])
        return ready >= float(values["pegaflow_pool_capacity_bytes"])

    def wait_pool_ready(self) -> None:
        while not self.pool_ready():
            time.sleep(0.01)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)


def start_server(pool_size: str) -> tuple[Server, float]:
    """Starts a server; returns it and the seconds until it answered Health."""
    endpoint = f"127.0.0.1:{free_port()}"
    metrics = f"127.0.0.1:{free_port()}"
    flags = ["--addr", endpoint, "--pool-size", pool_size, "--metrics-addr", metrics]
    flags += ["--log-level", "warn"]
    t0 = time.perf_counter()
    proc = subprocess.Popen(["pegaflow-server", *flags])
    probe = pf.EngineClient(endpoint, timeout_s=0.2)
    while True:
        try:
            probe.health()
            return Server(proc, endpoint, f"http://{metrics}/metrics"), time.perf_counter() - t0
        except pf.PegaflowError:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode}") from None
            time.sleep(0.0005)


def pct(samples: list[float], q: float) -> float:
    return float(np.percentile(np.array(samples), q))


def timed(fn: Callable[[], object], reps: int) -> list[float]:
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def bench_workload(
    client: pf.EngineClient, kv: pf.SharedKvCache, blocks: int, reps: int
) -> dict[str, float]:
    nbytes = blocks * LAYERS * 2 * BLOCK_SIZE * KV_HEADS * HEAD_DIM * 2
    src_ids = list(range(blocks))
    dst_ids = list(range(blocks, 2 * blocks))
    # memcpy reference: one contiguous copy of the same bytes, same process, same run.
    a = np.ones(nbytes, dtype=np.uint8)
    b = np.empty_like(a)
    memcpy = timed(lambda: np.copyto(b, a), reps)

    def fresh_hashes() -> list[bytes]:
        n = next(_ROUNDS)
        return [
            n.to_bytes(8, "little") + i.to_bytes(8, "little") + bytes(16) for i in range(blocks)
        ]

    saves, loads, queries = [], [], []
    # One completion flag serves every round, as the vLLM connector reuses its pool of them.
    state = pf.LoadState()
    for _ in range(reps):
        hashes = fresh_hashes()
        t0 = time.perf_counter()
        r = client.save("bench", 0, src_ids, hashes)
        saves.append(time.perf_counter() - t0)
        assert r.sealed_blocks == blocks, r
        state.reset()
        t0 = time.perf_counter()
        hit = client.query("bench", hashes)
        t1 = time.perf_counter()
        assert hit.hit_blocks == blocks and hit.lease_id is not None
        client.load("bench", 0, hit.lease_id, dst_ids, state)
        state.wait(60)
        loads.append(time.perf_counter() - t0)
        queries.append(t1 - t0)
    # Byte check of the last round.
    for layer in kv.layers:
        assert np.array_equal(layer[:, dst_ids], layer[:, src_ids])

    def gbps(seconds: float) -> float:
        return nbytes / seconds / 1e9

    return {
        "bytes": nbytes,
        "memcpy_p50_ms": pct(memcpy, 50) * 1e3,
        "memcpy_gbps": gbps(pct(memcpy, 50)),
        "save_p50_ms": pct(saves, 50) * 1e3,
        "save_p99_ms": pct(saves, 99) * 1e3,
        "save_gbps": gbps(pct(saves, 50)),
        "save_vs_memcpy": pct(memcpy, 50) / pct(saves, 50),
        "query_load_p50_ms": pct(loads, 50) * 1e3,
        "query_load_p99_ms": pct(loads, 99) * 1e3,
        "load_gbps": gbps(pct(loads, 50)),
        "load_vs_memcpy": pct(memcpy, 50) / pct(loads, 50),
        "query_p50_ms": pct(queries, 50) * 1e3,
    }


def bench_query_latency(
    client: pf.EngineClient, hashes: list[bytes], reps: int
) -> dict[str, float]:
    lat = []
    for _ in range(reps):
        t0 = time.perf_counter()
        hit = client.query("bench", hashes)
        lat.append(time.perf_counter() - t0)
        if hit.lease_id:
            client.release_lease(hit.lease_id)
    return {"p50_us": pct(lat, 50) * 1e6, "p99_us": pct(lat, 99) * 1e6}


def bench_startup(pool_size: str, reps: int) -> dict[str, float]:
    serving, ready = [], []
    for _ in range(reps):
        t0 = time.perf_counter()
        server, seconds = start_server(pool_size)
        serving.append(seconds)
        server.wait_pool_ready()
        ready.append(time.perf_counter() - t0)
        server.stop()
    return {
        "p50_ms": statistics.median(serving) * 1e3,
        "max_ms": max(serving) * 1e3,
        "ready_p50_ms": statistics.median(ready) * 1e3,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--pool-size", default="3gb")
    args = parser.parse_args()

    print(f"cpus={os.cpu_count()} reps={args.reps}")
    startup = bench_startup("4gb", 5)
    print(
        f"start-up to serving, 4 GiB pool: p50 {startup['p50_ms']:.1f} ms, "
        f"max {startup['max_ms']:.1f} ms; all pages populated: p50 {startup['ready_p50_ms']:.0f} ms"
    )

    server, _ = start_server(args.pool_size)
    try:
        server.wait_pool_ready()
        client = pf.EngineClient(server.endpoint, timeout_s=60)
        num_blocks = 2 * max(WORKLOADS.values())
        shape = (2, num_blocks, BLOCK_SIZE, KV_HEADS, HEAD_DIM)
        with pf.SharedKvCache(LAYERS, shape, np.uint16, block_dim=1, kv_dim=0) as kv:
            rng = np.random.default_rng(0)
            for layer in kv.layers:
                layer[...] = rng.integers(0, 2**16, size=layer.shape, dtype=np.uint16)
            client.register_kv_layers("bench", "bench-ns", 0, 1, kv.layer_specs())
            for name, blocks in WORKLOADS.items():
                # Warm-up round: touches pool pages so steady state is measured.
                bench_workload(client, kv, blocks, 3)
                r = bench_workload(client, kv, blocks, args.reps)
                print(
                    f"{name}: {r['bytes'] / 2**20:.0f} MiB | memcpy {r['memcpy_p50_ms']:.2f} ms "
                    f"({r['memcpy_gbps']:.2f} GB/s) | save p50 {r['save_p50_ms']:.2f} ms "
                    f"p99 {r['save_p99_ms']:.2f} ms ({r['save_gbps']:.2f} GB/s, "
                    f"{r['save_vs_memcpy']:.2f}x memcpy) | "
                    f"query+load p50 {r['query_load_p50_ms']:.2f} ms "
                    f"p99 {r['query_load_p99_ms']:.2f} ms ({r['load_gbps']:.2f} GB/s, "
                    f"{r['load_vs_memcpy']:.2f}x memcpy)"
                )
            hashes = [i.to_bytes(32, "little") for i in range(256)]
            client.save("bench", 0, list(range(256)), hashes)
            q = bench_query_latency(client, hashes, max(200, args.reps * 10))
            print(
                f"query of 256 hashes (all hit, lease + release): "
                f"p50 {q['p50_us']:.0f} us, p99 {q['p99_us']:.0f} us"
            )
    finally:
        server.stop()


if __name__ == "__main__":
    main()
