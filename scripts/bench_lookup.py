"""What the connector's scheduler half costs vLLM's scheduler for one long prompt: the
lookup (``get_num_new_matched_tokens``: cache keys, the server's query) and the load
plan (``update_state_after_alloc``), for a prompt of ``--blocks`` stored blocks, and the
server's query RPC alone, in the same run. Starts its own server (host backend).

    python scripts/bench_lookup.py [--blocks 2048] [--reps 30]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
import types

import numpy as np

import pegaflow as pf
from pegaflow.connector.config import ConnectorConfig
from pegaflow.connector.scheduler import SchedulerSide
from pegaflow.host import SharedKvCache
from pegaflow.server import spawn_server

BLOCK = 16


def ms(samples: list[float]) -> float:
    return round(statistics.median(samples) * 1e3, 3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--blocks", type=int, default=2048, help="blocks of the prompt")
    parser.add_argument("--reps", type=int, default=30)
    args = parser.parse_args()
    n = args.blocks
    with spawn_server("1gb", ["--log-level", "warn"]) as endpoint:
        client = pf.EngineClient(endpoint)
        kv = SharedKvCache(1, (2, n + 16, BLOCK, 1, 8), np.float16, block_dim=1, kv_dim=0)
        client.register_kv_layers("bench", "ns", 0, 1, kv.layer_specs())
        hashes = [os.urandom(32) for _ in range(n)]
        client.save("bench", 0, list(range(n)), hashes)
        config = ConnectorConfig(instance_id="bench", endpoint=endpoint)
        query, lookup, plan = [], [], []
        for rep in range(args.reps):
            t0 = time.perf_counter()
            result = client.query("bench", hashes[: n - 1])
            query.append(time.perf_counter() - t0)
            assert result.lease_id is not None, "the saved blocks are gone"
            client.release_lease(result.lease_id)
            side = SchedulerSide(config, client, BLOCK, BLOCK)
            request = types.SimpleNamespace(
                request_id=f"r{rep}", block_hashes=hashes, num_tokens=n * BLOCK
            )
            t0 = time.perf_counter()
            hit = side.get_num_new_matched_tokens(request, 0)
            t1 = time.perf_counter()
            side.update_state_after_alloc(request, [list(range(1, n + 1))], hit or 0)
            t2 = time.perf_counter()
            lookup.append(t1 - t0)
            plan.append(t2 - t1)
            (job,) = side.build_connector_meta(types.SimpleNamespace(num_scheduled_tokens={})).loads
            client.release_lease(job.lease_id)
        print(
            json.dumps(
                {
                    "blocks": n,
                    "hit_blocks": (hit or 0) // BLOCK,
                    "query_rpc_ms_p50": ms(query),
                    "lookup_ms_p50": ms(lookup),
                    "load_plan_ms_p50": ms(plan),
                }
            )
        )


if __name__ == "__main__":
    main()
