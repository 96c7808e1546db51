"""The ``pegaflow-server`` command line: help, flag errors, signals, HTTP health."""

from __future__ import annotations

import json
import signal
import subprocess
import urllib.error
from pathlib import Path

import pytest
from conftest import KvFactory, ServerHandle, StartServer, free_port, http_get, server_executable

from pegaflow import EngineClient, __version__


def run_cli(*args: str, timeout_s: float = 20.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [server_executable(), *args],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        stdin=subprocess.DEVNULL,
    )


def test_help() -> None:
    result = run_cli("--help")
    assert result.returncode == 0, result.stderr
    for flag in ("--pool-size", "--addr", "--metrics-addr", "--log-level"):
        assert flag in result.stdout


def test_version() -> None:
    result = run_cli("--version")
    assert result.returncode == 0, result.stderr
    assert __version__ in result.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--pool-size", "lots"], "lots"),
        (["--pool-size", "0"], "at least one byte"),
        (["--pool-size", "12pb"], "unit"),
        (["--addr", "not-an-address"], "not-an-address"),
        (["--no-such-flag"], "--no-such-flag"),
    ],
)
def test_bad_flags(args: list[str], message: str) -> None:
    result = run_cli(*args)
    assert result.returncode not in (0, None)
    assert message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def test_bad_metrics_addr() -> None:
    port = free_port()
    result = run_cli(
        "--addr", f"127.0.0.1:{port}", "--pool-size", "1mb", "--metrics-addr", "nonsense"
    )
    assert result.returncode != 0
    assert "metrics-addr" in result.stderr


def test_port_in_use(server: ServerHandle) -> None:
    """A second server on a taken port fails to start with a message, not a hang."""
    result = run_cli(
        "--addr",
        server.endpoint,
        "--pool-size",
        "1mb",
        "--metrics-addr",
        f"127.0.0.1:{free_port()}",
    )
    assert result.returncode == 1
    assert "cannot listen" in result.stderr
    assert "Traceback" not in result.stderr


def test_health_endpoint(server: ServerHandle) -> None:
    status, ctype, body = http_get(server.health_url)
    assert status == 200
    assert "json" in ctype
    assert json.loads(body) == {"status": "ok"}
    with pytest.raises(urllib.error.HTTPError) as err:
        http_get(server.health_url.replace("/health", "/nope"))
    assert err.value.code == 404


def test_metrics_endpoint(server: ServerHandle) -> None:
    status, _, body = http_get(server.metrics_url)
    assert status == 200
    metrics = server.metrics()
    for name in (
        "pegaflow_instances",
        "pegaflow_open_regions",
        "pegaflow_cache_blocks",
        "pegaflow_cache_sealed_blocks",
        "pegaflow_pool_used_bytes",
        "pegaflow_pool_capacity_bytes",
        "pegaflow_leases",
        'pegaflow_evicted_blocks_total{tier="ram",reason="capacity"}',
        "pegaflow_saved_blocks_total",
        "pegaflow_loaded_blocks_total",
        'pegaflow_lookups_total{outcome="hit"}',
        'pegaflow_lookup_blocks_total{tier="miss"}',
    ):
        assert name in metrics, f"{name} missing from /metrics:\n{body}"
    assert metrics["pegaflow_pool_capacity_bytes"] == 256 << 20
    assert metrics["pegaflow_instances"] == 0


def test_grpc_health(server: ServerHandle) -> None:
    health = server.client().health()
    assert health["status"] == "ok"
    assert health["version"] == __version__
    assert health["pool_capacity_bytes"] == 256 << 20
    assert health["cache_bytes"] == 0


def test_sigint_stops_with_exit_code_zero(start_server: StartServer) -> None:
    server = start_server(pool_size="16mb")
    rc = server.stop(signal.SIGINT)
    assert rc == 0, f"exit code {rc} on SIGINT:\n{server.log()[-3000:]}"
    assert "Traceback" not in server.log()


def test_sigterm_stops_with_exit_code_zero(start_server: StartServer) -> None:
    server = start_server(pool_size="16mb")
    rc = server.stop(signal.SIGTERM)
    assert rc == 0, f"exit code {rc} on SIGTERM:\n{server.log()[-3000:]}"
    assert "Traceback" not in server.log()


def test_sigterm_with_open_session_exits(start_server: StartServer, kv_cache: KvFactory) -> None:
    """Shutdown must not wait for clients to end their (endless) session streams."""
    server = start_server(pool_size="16mb")
    kv = kv_cache(num_layers=2, num_blocks=8, seed=None)
    client = EngineClient(server.endpoint, timeout_s=5.0)  # not closed before the signal
    client.register_kv_layers("held", "ns", 0, 1, kv.layer_specs())
    client.open_session("held")
    try:
        rc = server.stop(signal.SIGTERM, timeout_s=10.0)
    finally:
        client.close()
    assert rc == 0, f"exit code {rc} on SIGTERM:\n{server.log()[-3000:]}"


def test_spawn_server_serves_metrics_only_when_asked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pegaflow.server import read_metrics, spawn_server

    monkeypatch.chdir(tmp_path)  # `python -m pegaflow.server` imports the installed package
    addr = f"127.0.0.1:{free_port()}"
    with spawn_server(pool_size="64mb", metrics_addr=addr) as endpoint:
        assert EngineClient(endpoint).health()
        metrics = read_metrics(addr)
        assert metrics["pegaflow_pool_capacity_bytes"] == 64 << 20
        series = 'pegaflow_transfer_duration_seconds_count{direction="load",backend="host"}'
        assert series in metrics
    with spawn_server(pool_size="64mb"), pytest.raises(OSError):
        read_metrics(addr, timeout_s=1.0)
