"""Times the candidate kernels of the staging buffer's per-layer copies on a GPU: a chunk
of N blocks gathered from (or scattered into) 32 layers of 64 KiB rows, each candidate
captured as one CUDA graph and replayed 50 times.

    python scripts/probe_staging_kernels.py [--layers 32] [--row-kib 64]
"""

from __future__ import annotations

import argparse
import functools
from collections.abc import Callable

import torch


def replay_us(work: Callable[[], object], reps: int = 50) -> float:
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=torch.cuda.Stream()):
        work()
    for _ in range(3):
        graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(reps):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return float(start.elapsed_time(end)) / reps * 1e3


Kernel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], object]
KERNELS: dict[str, Kernel] = {
    "gather index_select": lambda rows, slots, i: torch.index_select(rows, 0, i, out=slots),
    "gather index.Tensor_out": lambda rows, slots, i: torch.ops.aten.index.Tensor_out(
        rows, [i], out=slots
    ),
    "scatter index_copy_": lambda rows, slots, i: rows.index_copy_(0, i, slots),
    "scatter index_put_": lambda rows, slots, i: rows.index_put_((i,), slots),
}


def each_layer(
    kernel: Kernel, chunk: list[tuple[torch.Tensor, torch.Tensor]], index: torch.Tensor
) -> None:
    for rows, slots in chunk:
        kernel(rows, slots, index)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--row-kib", type=int, default=64)
    parser.add_argument("--blocks", type=int, default=600)
    args = parser.parse_args()
    width = args.row_kib * 1024 // 8  # int64 elements per row
    layers = [
        torch.randint(0, 1 << 40, (args.blocks, width), device="cuda") for _ in range(args.layers)
    ]
    buffer = torch.empty(64, args.layers * width, dtype=torch.int64, device="cuda")
    columns = [buffer[:, i * width : (i + 1) * width] for i in range(args.layers)]
    pairs = list(zip(layers, columns, strict=True))
    for n in (8, 16, 32, 64):
        index = torch.randperm(args.blocks, device="cuda")[:n]
        chunk = [(rows, column[:n]) for rows, column in pairs]
        megabytes = n * args.layers * width * 8 / 1e6
        row = {}
        for name, kernel in KERNELS.items():
            us = replay_us(functools.partial(each_layer, kernel, chunk, index))
            row[name] = f"{us:.0f} us ({megabytes / us * 1e3:.0f} GB/s)"
        print(n, row, flush=True)


if __name__ == "__main__":
    main()
