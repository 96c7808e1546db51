"""RPC latency probe: a loopback `health` call back to back and after idle gaps.

Shows what a sleeping thread costs on this host: a call after the client and server
threads went idle pays their wake-ups. Starts its own server (the installed
`pegaflow-server`). The client's keep-warm window follows `PEGAFLOW_CLIENT_SPIN_US`.

    python scripts/rpc_latency.py [--reps 300] [--spin-us 0]
"""

from __future__ import annotations

import argparse
import statistics
import time

import pegaflow as pf
from pegaflow.server import spawn_server


def probe(client: pf.EngineClient, reps: int, gap_s: float, busy: bool) -> list[float]:
    """Microseconds per call, each after `gap_s` of sleeping (or spinning when `busy`)."""
    out = []
    for _ in range(reps):
        if busy:
            end = time.perf_counter() + gap_s
            while time.perf_counter() < end:
                pass
        elif gap_s:
            time.sleep(gap_s)
        t0 = time.perf_counter()
        client.health()
        out.append((time.perf_counter() - t0) * 1e6)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--reps", type=int, default=300)
    parser.add_argument("--spin-us", help="the server's --spin-us (default: its own)")
    args = parser.parse_args()
    flags = ["--log-level", "warn"] + (["--spin-us", args.spin_us] if args.spin_us else [])
    with spawn_server("256mb", flags) as endpoint:
        client = pf.EngineClient(endpoint)
        probe(client, 20, 0, False)  # connect and warm up
        for gap_ms, busy in ((0, False), (1, False), (10, False), (10, True)):
            us = sorted(probe(client, args.reps, gap_ms / 1e3, busy))
            caller = "spinning" if busy else "sleeping"
            p50, p90 = statistics.median(us), us[int(len(us) * 0.9)]
            label = f"health after {gap_ms:2d} ms ({caller} caller)"
            print(f"{label}: p50 {p50:6.0f} us  p90 {p90:6.0f} us")


if __name__ == "__main__":
    main()
