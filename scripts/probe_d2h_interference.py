"""Device-to-host traffic from a process of its own, to see what a saturated link costs
an inference engine running beside it (no PegaFlow involved).

Copies ``--mib`` MiB from GPU memory to pinned host memory, ``--per-sync`` copies queued
on a stream before the CPU waits for them, until ``--seconds`` pass or ``--stop-file``
exists; prints the copies and GiB/s it moved. Run it in the background while an engine
decodes (docs/benchmarks.md, "Decode inter-token latency"):

    python scripts/probe_d2h_interference.py --mib 128 --per-sync 1 &
    python examples/bench_kv_cache.py --llama-8b-dummy --connector none --decode
    touch /tmp/pegaflow-d2h.stop
"""

from __future__ import annotations

import argparse
import os
import time


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--mib", type=int, default=128, help="MiB one copy moves")
    parser.add_argument("--per-sync", type=int, default=1, help="copies queued per CPU wait")
    parser.add_argument("--seconds", type=float, default=300.0)
    parser.add_argument("--stop-file", default="/tmp/pegaflow-d2h.stop")
    args = parser.parse_args()
    import torch

    if os.path.exists(args.stop_file):
        os.remove(args.stop_file)
    src = torch.empty(args.mib << 20, dtype=torch.uint8, device="cuda")
    dst = torch.empty(args.mib << 20, dtype=torch.uint8, pin_memory=True)
    stream = torch.cuda.Stream()
    copies = 0
    start = time.perf_counter()
    end = start + args.seconds
    with torch.cuda.stream(stream):
        while time.perf_counter() < end and not os.path.exists(args.stop_file):
            for _ in range(args.per_sync):
                dst.copy_(src, non_blocking=True)
            stream.synchronize()
            copies += args.per_sync
    elapsed = time.perf_counter() - start
    gib_s = copies * args.mib / 1024 / elapsed
    print(
        f"{copies} copies of {args.mib} MiB, {args.per_sync} per wait, {gib_s:.1f} GiB/s",
        flush=True,
    )


if __name__ == "__main__":
    main()
