"""PegaFlow in 40 lines: register a KV cache, save blocks, query, load them elsewhere.

Run against a server started with `pegaflow-server --pool-size 1gb`, or pass
--spawn-server to start one for the duration of the example.
"""

from __future__ import annotations

import argparse
import hashlib
import os

import numpy as np

import pegaflow as pf
from pegaflow.server import spawn_server


def main(endpoint: str) -> None:
    client = pf.EngineClient(endpoint, timeout_s=5.0)
    # 4 layers of a FlashAttention-like KV cache: (K/V, blocks, block_size, heads, head_dim).
    with pf.SharedKvCache(4, (2, 128, 16, 4, 64), np.float16, block_dim=1, kv_dim=0) as kv:
        for layer in kv.layers:
            layer[...] = np.random.default_rng(0).standard_normal(layer.shape)
        client.open_session("quickstart")  # the server unregisters us if we die
        client.register_kv_layers("quickstart", "demo-model", 0, 1, kv.layer_specs())

        # Block hashes come from the inference engine (a prefix hash chain).
        hashes = [hashlib.sha256(f"block-{i}".encode()).digest() for i in range(8)]
        print("save:", client.save("quickstart", 0, block_ids=list(range(8)), block_hashes=hashes))

        hit = client.query("quickstart", [*hashes, hashlib.sha256(b"new").digest()])
        print("query:", hit)
        assert hit.hit_blocks == 8 and hit.lease_id is not None

        state = pf.LoadState()
        client.load("quickstart", 0, hit.lease_id, list(range(100, 108)), state)
        state.wait(timeout_s=10)
        same = all(np.array_equal(k[:, 100:108], k[:, 0:8]) for k in kv.layers)
        print("load:", state.status(), "bytes identical:", same)
        assert same
        client.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    default_endpoint = os.environ.get("PEGAFLOW_ENGINE_ENDPOINT", "127.0.0.1:50055")
    parser.add_argument("--endpoint", default=default_endpoint)
    parser.add_argument("--spawn-server", action="store_true", help="start a server for it")
    args = parser.parse_args()
    if args.spawn_server:
        with spawn_server(pool_size="256mb") as endpoint:
            main(endpoint)
    else:
        main(args.endpoint)
