"""Server logs: plain text when not on a terminal, and the per-load trace line
(query → lease → copy → ready) sampled by --trace-sample-rate and forced by
--trace-slow-ms."""

from __future__ import annotations

import re
import time

from conftest import KvFactory, ServerHandle, StartServer
from e2e_helpers import load_blocks, random_hashes

STAGES = ("lease_us", "prepare_us", "copy_us", "ready_us", "total_us")


def one_load(server: ServerHandle, kv_cache: KvFactory, instance: str) -> str:
    """Saves, queries and loads four blocks; returns the lease id."""
    client = server.client()
    kv = kv_cache(num_blocks=8, seed=9)
    client.register_kv_layers(instance, "ns", 0, 1, kv.layer_specs())
    hashes = random_hashes(4)
    client.save(instance, 0, [0, 1, 2, 3], hashes)
    q = client.query(instance, hashes)
    assert q.lease_id is not None
    load_blocks(client, instance, 0, q.lease_id, [4, 5, 6, 7])
    return q.lease_id


def trace_lines(server: ServerHandle, lease: str) -> list[str]:
    deadline = time.monotonic() + 5
    while True:
        lines = [ln for ln in server.log().splitlines() if "load path" in ln and lease in ln]
        if lines or time.monotonic() > deadline:
            return lines
        time.sleep(0.05)


def test_every_sampled_load_logs_its_stages_in_plain_text(
    start_server: StartServer, kv_cache: KvFactory
) -> None:
    server = start_server(extra_args=("--trace-sample-rate", "1"))
    lease = one_load(server, kv_cache, "traced")
    lines = trace_lines(server, lease)
    assert len(lines) == 1, server.log()[-3000:]
    line = lines[0]
    assert "pegaflow::trace" in line and re.search(r'op="?load', line), line
    for field in (*STAGES, "blocks=4", 'instance="traced"', "ok=true"):
        assert field in line, f"{field} missing: {line}"
    stages = {k: int(v) for k, v in re.findall(r"(\w+_us)=(\d+)", line)}
    assert stages["total_us"] >= stages["copy_us"] and stages["total_us"] >= stages["prepare_us"]
    assert "\x1b[" not in server.log(), "colour codes in a log that is not a terminal"


def test_unsampled_fast_loads_stay_quiet_and_slow_ones_always_log(
    start_server: StartServer, kv_cache: KvFactory
) -> None:
    quiet = start_server(extra_args=("--trace-sample-rate", "0", "--trace-slow-ms", "100000"))
    lease = one_load(quiet, kv_cache, "quiet")
    assert trace_lines(quiet, lease) == []
    # A threshold of 0 ms: every load is slow.
    slow = start_server(extra_args=("--trace-sample-rate", "0", "--trace-slow-ms", "0"))
    lease = one_load(slow, kv_cache, "slow")
    lines = trace_lines(slow, lease)
    assert len(lines) == 1 and "slow=true" in lines[0], slow.log()[-3000:]
