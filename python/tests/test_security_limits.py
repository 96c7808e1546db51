"""A client cannot exhaust or wedge the server: silent and idle connections are closed,
connections, leases and request sizes are capped, echoed ids are cut short, and a server
that dies mid-call or mid-load fails the client's calls and loads promptly and cleanly."""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import KvFactory, ServerHandle, StartServer
from e2e_helpers import random_hashes, wait_until

from pegaflow import (
    EngineClient,
    LoadState,
    PegaflowInternalError,
    PegaflowInvalidArgument,
    PegaflowLoadError,
    PegaflowNotFound,
    PegaflowResourceExhausted,
    PegaflowUnavailable,
)

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


def timed_out(server: ServerHandle, reason: str) -> float:
    sample = f'pegaflow_connections_timed_out_total{{reason="{reason}"}}'
    return server.metrics().get(sample, 0.0)


def raw_socket(endpoint: str) -> socket.socket:
    host, _, port = endpoint.rpartition(":")
    return socket.create_connection((host, int(port)), timeout=5.0)


def connections_at_rest(server: ServerHandle) -> float:
    """pegaflow_connections with no client connected: the fewest of a few scrapes (a build
    that counts HTTP connections shows the scrape's own one, and a finished scrape's
    connection can linger a moment)."""
    time.sleep(0.2)
    return min(server.metric("pegaflow_connections") for _ in range(5))


def wait_closed(sock: socket.socket, deadline: float) -> bool:
    """Reads (and drops) what the server sends until it closes ``sock`` (EOF or reset);
    False if it is still open at ``deadline`` (a ``time.monotonic()`` value)."""
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        sock.settimeout(left)
        try:
            if not sock.recv(65536):
                return True
        except ConnectionResetError:
            return True
        except TimeoutError:
            return False


def test_silent_idle_and_excess_connections_are_closed(start_server: StartServer) -> None:
    """With --handshake-timeout-s 1 --idle-timeout-s 2 --max-connections 8: silent sockets
    and a half preface are closed after the handshake timeout, a 9th connection is closed
    at once while 8 are held, an idle client is disconnected after 2 s and reconnects, and
    every close is counted."""
    server = start_server(
        pool_size="16mb",
        extra_args=[
            "--handshake-timeout-s",
            "1",
            "--idle-timeout-s",
            "2",
            "--max-connections",
            "8",
        ],
    )
    assert wait_until(lambda: server.metric("pegaflow_connections") <= 1, 5.0)
    rest = connections_at_rest(server)

    def connections() -> float:
        return server.metric("pegaflow_connections") - rest

    before = server.metrics()
    handshake0 = timed_out(server, "handshake")

    opened = time.monotonic()
    held = [raw_socket(server.endpoint) for _ in range(8)]
    try:
        assert wait_until(lambda: connections() == 8, 0.8)
        extra = raw_socket(server.endpoint)
        start = time.monotonic()
        with extra:
            assert wait_closed(extra, start + 0.5), "a 9th connection was served"
        refused = server.metric("pegaflow_connections_refused_total")
        assert refused == before["pegaflow_connections_refused_total"] + 1
        for sock in held:
            assert wait_closed(sock, opened + 3.0), "a silent connection stayed open for 3 s"
        assert time.monotonic() - opened >= 0.8, "closed before the handshake timeout"
    finally:
        for sock in held:
            sock.close()
    assert timed_out(server, "handshake") == handshake0 + 8
    assert wait_until(lambda: connections() == 0, 2.0)

    total0 = timed_out(server, "handshake") + timed_out(server, "idle")
    with raw_socket(server.endpoint) as half:
        half.sendall(PREFACE[: len(PREFACE) // 2])
        assert wait_closed(half, time.monotonic() + 3.5), "a half preface kept its connection"
    assert timed_out(server, "handshake") + timed_out(server, "idle") == total0 + 1

    client = EngineClient(server.endpoint, timeout_s=5.0)
    try:
        assert client.health()["status"] == "ok"
        idle0 = timed_out(server, "idle")
        # Two: the endpoint's TCP connection (it found the socket) and the Unix socket its
        # calls then moved to, both idle from now on.
        assert wait_until(lambda: connections() == 2, 1.0)
        start = time.monotonic()
        assert wait_until(lambda: timed_out(server, "idle") == idle0 + 2, 6.0)
        assert time.monotonic() - start >= 1.5, "an idle connection closed before 2 s"
        assert wait_until(lambda: connections() == 0, 2.0)
        assert client.health()["status"] == "ok"  # reconnects
    finally:
        client.close()


def test_lease_and_request_size_caps(start_server: StartServer, kv_cache: KvFactory) -> None:
    """--max-leases-per-instance 2, --max-leased-blocks 48, --max-hashes-per-request 100:
    queries past a lease cap fail ResourceExhausted and pin nothing; requests over 100
    hashes or ids fail InvalidArgument and change nothing; exactly 100 is fine."""
    server = start_server(
        pool_size="64mb",
        extra_args=[
            "--max-leases-per-instance",
            "2",
            "--max-leased-blocks",
            "48",
            "--max-hashes-per-request",
            "100",
        ],
    )
    client = server.client()
    kv = kv_cache(num_layers=2, num_blocks=128, seed=1)
    client.register_kv_layers("caps", "ns", 0, 1, kv.layer_specs())
    client.register_kv_layers(
        "caps2", "ns", 0, 1, kv_cache(num_layers=2, num_blocks=128).layer_specs()
    )
    hashes = random_hashes(100)
    assert client.save("caps", 0, list(range(100)), hashes).sealed_blocks == 100

    def lease(instance: str, n: int) -> str:
        q = client.query(instance, hashes[:n])
        assert q.hit_blocks == n and q.lease_id is not None
        return q.lease_id

    refused0 = server.metric("pegaflow_refused_leases_total")
    leases = [lease("caps", 4), lease("caps", 4)]
    with pytest.raises(PegaflowResourceExhausted):
        client.query("caps", hashes[:4])
    assert server.metric("pegaflow_leases") == 2
    assert server.metric("pegaflow_refused_leases_total") == refused0 + 1
    leases.append(lease("caps2", 4))  # the cap is per instance
    for lease_id in leases:
        client.release_lease(lease_id)

    first = lease("caps", 32)
    with pytest.raises(PegaflowResourceExhausted):
        client.query("caps2", hashes[:32])  # 64 blocks pinned > 48
    assert server.metric("pegaflow_leases") == 1
    assert server.metric("pegaflow_refused_leases_total") == refused0 + 2
    second = lease("caps2", 16)  # exactly 48
    client.release_lease(first)
    client.release_lease(second)

    oversized0 = server.metric("pegaflow_oversized_requests_total")
    with pytest.raises(PegaflowInvalidArgument, match=r"101 .*in one request"):
        client.query("caps", [*hashes, os.urandom(32)])
    with pytest.raises(PegaflowInvalidArgument, match=r"101 .*in one request"):
        client.save("caps", 0, list(range(101)), random_hashes(101))
    one = client.query("caps", [hashes[0], *random_hashes(99)])  # 100 hashes: allowed
    assert one.hit_blocks == 1 and one.lease_id is not None
    with pytest.raises(PegaflowInvalidArgument, match=r"101 .*in one request"):
        client.load("caps", 0, one.lease_id, list(range(101)), LoadState())
    client.release_lease(one.lease_id)
    metrics = server.metrics()
    assert metrics["pegaflow_oversized_requests_total"] == oversized0 + 3
    assert metrics["pegaflow_cache_blocks"] == 100
    assert metrics["pegaflow_leases"] == 0


def test_long_ids_are_cut_in_messages(
    server: ServerHandle, client: EngineClient, kv_cache: KvFactory
) -> None:
    """A 20,000-character instance or lease id gets NotFound with a short message that
    names the id's start (not a transport error over an oversized status header)."""
    kv = kv_cache(num_layers=2, num_blocks=16, seed=2)
    client.register_kv_layers("real", "ns", 0, 1, kv.layer_specs())
    hashes = random_hashes(2)
    client.save("real", 0, [0, 1], hashes)
    q = client.query("real", hashes)
    assert q.lease_id is not None
    long_id = "long-" + "y" * 19_995
    calls: dict[str, Callable[[], object]] = {
        "save": lambda: client.save(long_id, 0, [2], random_hashes(1)),
        "query": lambda: client.query(long_id, hashes),
        "load": lambda: client.load(long_id, 0, str(q.lease_id), [4, 5], LoadState()),
        "unregister": lambda: client.unregister_instance(long_id),
        "release_lease": lambda: client.release_lease(long_id),
    }
    for name, call in calls.items():
        with pytest.raises(PegaflowNotFound) as err:
            call()
        message = str(err.value)
        assert len(message) < 1000, f"{name}: {len(message)} chars"
        assert "long-yyyy" in message, f"{name}: {message}"
    assert client.health()["status"] == "ok"
    client.release_lease(q.lease_id)


def stop(pid: int) -> None:
    """SIGSTOPs ``pid`` and waits until every thread of it has stopped (delivery is
    asynchronous: a running thread can still answer a request right after kill())."""

    def stopped() -> bool:
        for task in os.listdir(f"/proc/{pid}/task"):
            try:
                stat = Path(f"/proc/{pid}/task/{task}/stat").read_text()
            except FileNotFoundError:
                continue  # the thread exited
            if stat.rpartition(")")[2].split()[0] not in ("T", "t"):
                return False
        return True

    os.kill(pid, signal.SIGSTOP)
    assert wait_until(stopped, 5.0, 0.001), f"process {pid} did not stop"


def test_server_killed_mid_call(server: ServerHandle) -> None:
    """A call in flight when the server is SIGKILLed fails with PegaflowUnavailable (a
    ConnectionError, not an internal error) within a few seconds, not at its deadline."""
    client = server.client(timeout_s=30.0)
    assert client.health()["status"] == "ok"
    stop(server.pid)
    outcome: list[BaseException | None] = []

    def call() -> None:
        try:
            client.query("anything", [bytes(32)])
            outcome.append(None)
        except BaseException as e:
            outcome.append(e)

    thread = threading.Thread(target=call, daemon=True)
    try:
        thread.start()
        time.sleep(0.3)
        assert not outcome, f"the call finished against a stopped server: {outcome}"
    finally:
        os.kill(server.pid, signal.SIGKILL)
        server.exit_code = server.proc.wait(10)
    killed = time.monotonic()
    thread.join(10.0)
    assert outcome, "the call still hangs 10 s after the server died"
    assert time.monotonic() - killed < 5.0
    (error,) = outcome
    assert not isinstance(error, PegaflowInternalError), repr(error)
    assert isinstance(error, PegaflowUnavailable), repr(error)
    assert isinstance(error, ConnectionError)


def test_load_fails_promptly_when_the_server_dies(
    start_server: StartServer, kv_cache: KvFactory
) -> None:
    """A load caught in flight (server SIGSTOPped right after queueing it) whose server is
    then killed: LoadState.wait raises PegaflowLoadError within 2 s, not at its timeout."""
    server = start_server(pool_size="256mb")
    client = server.client(timeout_s=20.0)
    kv = kv_cache(num_layers=32, num_blocks=1024, seed=4)  # 128 KiB a block
    client.register_kv_layers("dying", "ns", 0, 1, kv.layer_specs())
    hashes = random_hashes(512)
    assert client.save("dying", 0, list(range(512)), hashes).sealed_blocks == 512
    dest = list(range(512, 1024))
    state = LoadState()
    for _ in range(10):
        q = client.query("dying", hashes)
        assert q.hit_blocks == 512 and q.lease_id is not None
        state.reset()
        client.load("dying", 0, q.lease_id, dest, state)
        stop(server.pid)
        if state.status() == "pending":
            break
        os.kill(server.pid, signal.SIGCONT)
        state.wait(20)
    else:
        pytest.fail("every load finished before the server could be stopped")

    os.kill(server.pid, signal.SIGKILL)
    server.exit_code = server.proc.wait(10)
    killed = time.monotonic()
    with pytest.raises(PegaflowLoadError):
        state.wait(30)
    assert time.monotonic() - killed < 2.0, "the load outlived its server by 2 s"
    # A poller sees it through the session (the state itself says what the server wrote).
    assert not client.session_alive("dying") and not state.is_done()
