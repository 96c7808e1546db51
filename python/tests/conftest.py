"""Fixtures of the end-to-end suite: real ``pegaflow-server`` processes and shared-memory
KV caches.

Every test that takes ``server`` (or calls ``start_server``) gets its own server on free
ports; teardown stops it with SIGTERM and requires exit code 0 within 10 s.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

_PYTHON_DIR = Path(__file__).resolve().parent.parent


def _prefer_installed_pegaflow() -> None:
    """``python -m pytest`` run from ``python/`` puts the source tree first on sys.path,
    whose ``pegaflow`` package has no compiled ``_native`` (only the installed wheel has
    it). Drop that entry so the installed package is imported."""
    src = _PYTHON_DIR / "pegaflow"
    if any(src.glob("_native*.so")):
        return  # an in-place (maturin develop) build: the source tree works
    sys.path[:] = [p for p in sys.path if Path(p or os.curdir).resolve() != _PYTHON_DIR]


_prefer_installed_pegaflow()

from e2e_helpers import (  # noqa: E402
    make_kv_cache,
)

from pegaflow import EngineClient, PegaflowError, SharedKvCache  # noqa: E402
from pegaflow.server import free_port as free_port  # noqa: E402
from pegaflow.server import parse_metrics as parse_metrics  # noqa: E402

STARTUP_TIMEOUT_S = 20.0
STOP_TIMEOUT_S = 10.0


def server_executable() -> str:
    """The ``pegaflow-server`` console script of this interpreter's environment."""
    candidate = Path(sys.executable).parent / "pegaflow-server"
    if candidate.exists():
        return str(candidate)
    return "pegaflow-server"


def http_get(url: str, timeout_s: float = 5.0) -> tuple[int, str, str]:
    """GET ``url``: (status, content type, body)."""
    with urllib.request.urlopen(url, timeout=timeout_s) as resp:
        status: int = resp.status
        ctype: str = resp.headers.get("Content-Type", "")
        body: str = resp.read().decode()
        return status, ctype, body


@dataclass
class ServerHandle:
    """A running ``pegaflow-server`` subprocess."""

    endpoint: str
    http_addr: str
    proc: subprocess.Popen[bytes]
    log_path: Path
    pool_size: str
    exit_code: int | None = None
    _clients: list[EngineClient] = field(default_factory=list)

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def metrics_url(self) -> str:
        return f"http://{self.http_addr}/metrics"

    @property
    def health_url(self) -> str:
        return f"http://{self.http_addr}/health"

    def log(self) -> str:
        """What the server wrote to stderr/stdout so far."""
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def metrics(self) -> dict[str, float]:
        """GET /metrics, parsed to {name: value}."""
        status, _, body = http_get(self.metrics_url)
        assert status == 200, body
        return parse_metrics(body)

    def metric(self, name: str) -> float:
        values = self.metrics()
        assert name in values, f"metric {name} missing; have {sorted(values)}"
        return values[name]

    def metric_total(self, name: str) -> float:
        """The sum of every series of the metric ``name`` (all label values)."""
        values = self.metrics()
        series = [v for k, v in values.items() if k == name or k.startswith(name + "{")]
        assert series, f"metric {name} missing; have {sorted(values)}"
        return sum(series)

    def client(self, timeout_s: float = 10.0) -> EngineClient:
        """A new client of this server (closed at teardown)."""
        client = EngineClient(self.endpoint, timeout_s=timeout_s)
        self._clients.append(client)
        return client

    def maps(self) -> str:
        """The server process's /proc/<pid>/maps."""
        return Path(f"/proc/{self.pid}/maps").read_text()

    def is_running(self) -> bool:
        return self.exit_code is None and self.proc.poll() is None

    def stop(self, sig: signal.Signals = signal.SIGTERM, timeout_s: float = STOP_TIMEOUT_S) -> int:
        """Sends ``sig`` and waits for the exit code (kills and raises after ``timeout_s``)."""
        if self.exit_code is not None:
            return self.exit_code
        for client in self._clients:
            client.close()
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            self.exit_code = self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.exit_code = self.proc.wait()
            raise AssertionError(
                f"server did not exit within {timeout_s} s of {sig.name}\n{self.log()}"
            ) from None
        return self.exit_code


StartServer = Callable[..., ServerHandle]


def _spawn(
    tmp_dir: Path, pool_size: str, extra_args: Sequence[str], endpoint: str | None = None
) -> ServerHandle:
    grpc_port = int(endpoint.rpartition(":")[2]) if endpoint else free_port()
    http_port = free_port()
    while http_port == grpc_port:
        http_port = free_port()
    endpoint, http_addr = f"127.0.0.1:{grpc_port}", f"127.0.0.1:{http_port}"
    log_path = tmp_dir / f"server-{grpc_port}.log"
    argv = [
        server_executable(),
        "--addr",
        endpoint,
        "--pool-size",
        pool_size,
        "--metrics-addr",
        http_addr,
        "--log-level",
        "info",
        *extra_args,
    ]
    env = {k: v for k, v in os.environ.items() if k != "RUST_LOG"}
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            argv,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=tmp_dir,
            env=env,
        )
    return ServerHandle(endpoint, http_addr, proc, log_path, pool_size)


def _wait_healthy(handle: ServerHandle) -> None:
    probe = EngineClient(handle.endpoint, timeout_s=1.0)
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    try:
        while True:
            rc = handle.proc.poll()
            if rc is not None:
                handle.exit_code = rc
                raise RuntimeError(f"pegaflow-server exited with {rc} at startup:\n{handle.log()}")
            try:
                if probe.health()["status"] == "ok":
                    return
            except PegaflowError:
                pass
            if time.monotonic() > deadline:
                handle.proc.kill()
                handle.exit_code = handle.proc.wait()
                pytest.fail(
                    f"pegaflow-server not healthy after {STARTUP_TIMEOUT_S} s:\n{handle.log()}"
                )
            time.sleep(0.05)
    finally:
        probe.close()


@pytest.fixture
def start_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StartServer]:
    """Factory: ``start_server(pool_size="256mb", extra_args=(), endpoint=None)`` starts a
    server (on ``endpoint`` if given, e.g. to restart one) and returns its
    :class:`ServerHandle`. Teardown stops each with SIGTERM (exit code 0)."""
    started: list[ServerHandle] = []
    tmp_dir = tmp_path_factory.mktemp("pegaflow-server")

    def start(
        pool_size: str = "256mb", extra_args: Sequence[str] = (), endpoint: str | None = None
    ) -> ServerHandle:
        last_error: Exception | None = None
        for _ in range(3):  # a free port can be taken by someone else before we bind it
            handle = _spawn(tmp_dir, pool_size, extra_args, endpoint)
            started.append(handle)
            try:
                _wait_healthy(handle)
                return handle
            except RuntimeError as e:
                last_error = e
                if "cannot listen" not in str(e):
                    break
        pytest.fail(str(last_error))

    yield start

    problems: list[str] = []
    for handle in started:
        if handle.exit_code is not None:
            continue  # failed at startup (already reported) or stopped by the test itself
        if handle.proc.poll() is not None:
            handle.exit_code = handle.proc.returncode
            problems.append(
                f"server {handle.endpoint} died during the test with exit code "
                f"{handle.exit_code}:\n{handle.log()[-4000:]}"
            )
            continue
        try:
            rc = handle.stop(signal.SIGTERM)
        except AssertionError as e:
            problems.append(str(e))
            continue
        if rc != 0:
            problems.append(
                f"server {handle.endpoint} exited with {rc} on SIGTERM:\n{handle.log()[-4000:]}"
            )
    if problems:
        pytest.fail("\n\n".join(problems))


@pytest.fixture
def server(start_server: StartServer) -> ServerHandle:
    """A fresh server with a 256 MiB pool."""
    return start_server(pool_size="256mb")


@pytest.fixture
def client(server: ServerHandle) -> EngineClient:
    """A client of ``server``."""
    return server.client()


KvFactory = Callable[..., SharedKvCache]


@pytest.fixture
def kv_cache() -> Iterator[KvFactory]:
    """Factory of shared-memory KV caches (see :func:`e2e_helpers.make_kv_cache`), all
    closed and unlinked at teardown."""
    made: list[SharedKvCache] = []

    def make(**options: Any) -> SharedKvCache:
        kv = make_kv_cache(**options)
        made.append(kv)
        return kv

    yield make
    for kv in made:
        kv.close()


@pytest.fixture
def instance_id(request: pytest.FixtureRequest) -> str:
    """An instance id unique to the test."""
    return f"{request.node.name}-{os.getpid()}-{time.monotonic_ns()}"


@pytest.fixture
def make_worker(instance_id: str) -> Iterator[Callable[..., Any]]:
    """Makes the connector's worker half (rank 0 of 1): call it with an endpoint, an
    instance-id suffix (another suffix: another instance) and config fields; each worker
    is shut down at teardown."""
    from pegaflow.connector.config import ConnectorConfig
    from pegaflow.connector.worker import WorkerSide

    made: list[WorkerSide] = []

    def make(endpoint: str, suffix: str = "", **cfg: Any) -> WorkerSide:
        cfg.setdefault("retry_interval_s", 0.2)
        config = ConnectorConfig(instance_id=instance_id + suffix, endpoint=endpoint, **cfg)
        worker = WorkerSide(config, 0, 1, {"model": "test"})
        made.append(worker)
        return worker

    yield make
    for worker in made:
        worker.shutdown()


def require_module(name: str) -> Any:
    """Imports ``name`` for a test. Without it the test is skipped, except where
    ``PEGAFLOW_REQUIRE_VLLM=1`` (the README test command, CI): there it fails, so the
    vLLM/torch suites can never pass by being skipped."""
    if os.environ.get("PEGAFLOW_REQUIRE_VLLM") == "1":
        import importlib

        return importlib.import_module(name)
    return pytest.importorskip(name)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random-weight Llama saved for vLLM (:func:`pegaflow.testing.build_tiny_llama`)."""
    require_module("transformers")
    from pegaflow.testing import build_tiny_llama

    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))
