"""Sessions tie an instance to its client: when the client goes away, the server
unregisters the instance and unmaps its shared memory; the cached blocks stay."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import KvFactory, ServerHandle
from e2e_helpers import (
    assert_blocks_equal,
    load_blocks,
    make_kv_cache,
    random_hashes,
    snapshot,
    wait_until,
    zero_blocks,
)

from pegaflow import EngineClient, PegaflowAlreadyExists

CHILD = r"""
import sys, time
import numpy as np
from pegaflow import EngineClient, SharedKvCache

endpoint, instance, namespace, seed = sys.argv[1:5]
hashes = [bytes.fromhex(h) for h in sys.argv[5:]]
kv = SharedKvCache(4, (2, 32, 16, 2, 32), np.float16, block_dim=1, kv_dim=0)
rng = np.random.default_rng(int(seed))
for layer in kv.layers:
    flat = layer.view(np.uint8).reshape(-1)
    flat[...] = rng.integers(0, 256, size=flat.size, dtype=np.uint8)
client = EngineClient(endpoint)
client.register_kv_layers(instance, namespace, 0, 1, kv.layer_specs())
client.open_session(instance)
client.save(instance, 0, list(range(len(hashes))), hashes)
print("ready", kv.name, flush=True)
time.sleep(600)
"""


def instance_ids(client: EngineClient) -> list[str]:
    return [str(i["instance_id"]) for i in client.list_instances()]


def maps_mention(server: ServerHandle, memfd_name: str) -> bool:
    return f"/memfd:{memfd_name} " in server.maps()


@pytest.fixture
def child_procs() -> Iterator[list[subprocess.Popen[str]]]:
    procs: list[subprocess.Popen[str]] = []
    yield procs
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        if proc.stdout:
            proc.stdout.close()


def start_child(
    server: ServerHandle,
    tmp_path: Path,
    procs: list[subprocess.Popen[str]],
    instance: str,
    namespace: str,
    hashes: list[bytes],
    seed: int,
) -> tuple[subprocess.Popen[str], str]:
    """Runs the child client; returns it and its KV memfd's name once ready."""
    argv = [sys.executable, "-c", CHILD, server.endpoint, instance, namespace, str(seed)]
    proc = subprocess.Popen(
        [*argv, *(h.hex() for h in hashes)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=tmp_path,  # not python/, whose pegaflow sources lack the extension
    )
    procs.append(proc)
    assert proc.stdout is not None
    line = proc.stdout.readline()  # blocks until "ready" or the child dies
    if not line.startswith("ready "):
        rest = proc.stdout.read() if proc.poll() is not None else ""
        pytest.fail(f"child did not get ready: {line!r}{rest}")
    return proc, line.split()[1]


def test_killed_client_is_unregistered(
    server: ServerHandle,
    client: EngineClient,
    kv_cache: KvFactory,
    tmp_path: Path,
    child_procs: list[subprocess.Popen[str]],
    instance_id: str,
) -> None:
    hashes = random_hashes(8)
    proc, shm_name = start_child(
        server, tmp_path, child_procs, instance_id, "death", hashes, seed=51
    )
    assert instance_id in instance_ids(client)
    assert maps_mention(server, shm_name)
    metrics = server.metrics()
    assert metrics["pegaflow_instances"] == 1
    assert metrics["pegaflow_open_regions"] == 1
    assert metrics["pegaflow_cache_sealed_blocks"] == 8

    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(10)

    assert wait_until(lambda: instance_id not in instance_ids(client), 10.0), (
        f"instance still registered 10 s after its client died: {client.list_instances()}"
    )
    assert wait_until(lambda: server.metric("pegaflow_open_regions") == 0, 10.0)
    metrics = server.metrics()
    assert metrics["pegaflow_instances"] == 0
    assert metrics["pegaflow_open_regions"] == 0
    assert wait_until(lambda: not maps_mention(server, shm_name), 10.0), (
        "the server still maps the dead client's shared memory"
    )

    # The cache outlives the client: another instance of the namespace hits and loads.
    kv = kv_cache(num_layers=4, num_blocks=32, seed=52)
    client.register_kv_layers(f"{instance_id}-heir", "death", 0, 1, kv.layer_specs())
    assert client.query(f"{instance_id}-heir", hashes[:1]).hit_blocks == 1
    q = client.query(f"{instance_id}-heir", hashes)
    assert q.hit_blocks == 8 and q.lease_id is not None
    # What the child saved: its file's layers 0..3, blocks 0..7, from seed 51.
    expected_kv = make_kv_cache(num_layers=4, num_blocks=32, seed=51)
    try:
        expected = snapshot(expected_kv, list(range(8)))
    finally:
        expected_kv.close()
    dest = list(range(16, 24))
    zero_blocks(kv, dest)
    load_blocks(client, f"{instance_id}-heir", 0, q.lease_id, dest)
    assert_blocks_equal(kv, dest, expected, "blocks saved by a dead client")
    # A different namespace still sees nothing.
    other = kv_cache(num_layers=4, num_blocks=32, seed=None)
    client.register_kv_layers(f"{instance_id}-other", "not-death", 0, 1, other.layer_specs())
    assert client.query(f"{instance_id}-other", hashes).hit_blocks == 0


def test_close_session_unregisters(
    server: ServerHandle, client: EngineClient, kv_cache: KvFactory, instance_id: str
) -> None:
    kv = kv_cache(num_layers=4, num_blocks=32, seed=53)
    session_client = server.client()
    session_client.register_kv_layers(instance_id, "sessions", 0, 1, kv.layer_specs())
    session_client.open_session(instance_id)
    hashes = random_hashes(4)
    session_client.save(instance_id, 0, [0, 1, 2, 3], hashes)
    assert instance_id in instance_ids(client)
    assert maps_mention(server, kv.name)

    session_client.close_session(instance_id)
    assert wait_until(lambda: instance_id not in instance_ids(client), 10.0)
    assert wait_until(lambda: server.metric("pegaflow_open_regions") == 0, 10.0)
    assert server.metric("pegaflow_instances") == 0
    assert wait_until(lambda: not maps_mention(server, kv.name), 10.0)
    # The client's own memory stays usable.
    kv.layers[0].reshape(-1)[0] = 7
    assert kv.layers[0].reshape(-1)[0] == 7
    # Its blocks stay cached for the namespace.
    client.register_kv_layers(f"{instance_id}-next", "sessions", 0, 1, kv.layer_specs())
    assert client.query(f"{instance_id}-next", hashes).hit_blocks == 4


def test_client_close_unregisters_every_session(
    server: ServerHandle, client: EngineClient, kv_cache: KvFactory, instance_id: str
) -> None:
    kv = kv_cache(num_layers=4, num_blocks=32, seed=54)
    session_client = server.client()
    for suffix in ("a", "b"):
        session_client.register_kv_layers(f"{instance_id}-{suffix}", "s", 0, 1, kv.layer_specs())
        session_client.open_session(f"{instance_id}-{suffix}")
    assert server.metric("pegaflow_instances") == 2
    session_client.close()
    assert wait_until(lambda: server.metric("pegaflow_instances") == 0, 10.0)
    assert wait_until(lambda: server.metric("pegaflow_open_regions") == 0, 10.0)


def test_session_without_close_keeps_instance(
    server: ServerHandle, client: EngineClient, kv_cache: KvFactory, instance_id: str
) -> None:
    """A live session keeps the instance registered (heartbeats flow)."""
    kv = kv_cache(num_layers=4, num_blocks=32, seed=55)
    session_client = server.client()
    session_client.register_kv_layers(instance_id, "s", 0, 1, kv.layer_specs())
    session_client.open_session(instance_id)
    assert not wait_until(lambda: instance_id not in instance_ids(client), 1.0)
    session_client.close_session(instance_id)
    assert wait_until(lambda: instance_id not in instance_ids(client), 10.0)


def test_a_closed_session_drops_its_ranks_while_others_stay_open(
    server: ServerHandle, client: EngineClient, kv_cache: KvFactory, instance_id: str
) -> None:
    """A restarted client reusing the instance id must not stay locked out by the old
    client's registration once the old session is gone, even while its own session of the
    same instance is open."""
    kv = kv_cache(num_layers=4, num_blocks=32, seed=54)
    old, new = server.client(), server.client()
    old.open_session(instance_id)
    old.register_kv_layers(instance_id, "restart", 0, 1, kv.layer_specs())
    new.open_session(instance_id)
    with pytest.raises(PegaflowAlreadyExists):
        new.register_kv_layers(instance_id, "restart", 0, 1, kv.layer_specs())

    old.close_session(instance_id)  # as when the old client's connection finally dies
    assert wait_until(lambda: instance_id not in instance_ids(client), 10.0)
    new.register_kv_layers(instance_id, "restart", 0, 1, kv.layer_specs())
    assert instance_id in instance_ids(client)
    new.close_session(instance_id)
    assert wait_until(lambda: instance_id not in instance_ids(client), 10.0)
