"""The ``pegaflow-server`` console script, :func:`spawn_server` and :func:`read_metrics`
for scripts.

The console script runs the server built into the extension; :func:`spawn_server` starts
it as a child process for the length of a ``with`` block (examples, notebooks, tests);
:func:`read_metrics` reads a server's ``/metrics`` (benchmarks split times with it).
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Sequence

from pegaflow._native import EngineClient, run_server
from pegaflow.errors import PegaflowError


def main(argv: list[str] | None = None) -> int:
    """Run the server with ``argv`` (default: ``sys.argv[1:]``) until SIGINT/SIGTERM."""
    args = sys.argv[1:] if argv is None else argv
    return run_server(["pegaflow-server", *args])


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus/OpenMetrics text → {sample name (with labels, if any): value}."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, _, rest = line.rpartition(" ")
        if not name:
            continue
        try:
            out[name.strip()] = float(rest)
        except ValueError:
            # "name value timestamp": drop the timestamp and retry.
            name2, _, value = name.rpartition(" ")
            out[name2.strip()] = float(value)
    return out


def read_metrics(http_addr: str, timeout_s: float = 5.0) -> dict[str, float]:
    """GET ``http://{http_addr}/metrics`` of a running server, parsed by
    :func:`parse_metrics`."""
    with urllib.request.urlopen(f"http://{http_addr}/metrics", timeout=timeout_s) as resp:
        return parse_metrics(resp.read().decode())


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@contextlib.contextmanager
def spawn_server(
    pool_size: str = "256mb",
    extra_args: Sequence[str] = (),
    startup_timeout_s: float = 20.0,
    metrics_addr: str = "",
) -> Iterator[str]:
    """Starts ``pegaflow-server`` on a free loopback port and yields its endpoint once it
    is healthy; stops it with SIGTERM on exit. Its HTTP metrics are off unless
    ``metrics_addr`` (``host:port``) is given.

    Raises ``RuntimeError`` if it exits or is not healthy within ``startup_timeout_s``.
    """
    endpoint = f"127.0.0.1:{free_port()}"
    argv = [sys.executable, "-m", "pegaflow.server", "--addr", endpoint, "--pool-size", pool_size]
    argv += ["--metrics-addr", metrics_addr, *extra_args]
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL)
    try:
        _wait_healthy(proc, endpoint, startup_timeout_s)
        yield endpoint
    except BaseException:
        _stop(proc)
        raise
    code = _stop(proc)
    if code != 0:
        raise RuntimeError(f"pegaflow-server exited with {code} on SIGTERM")


def _wait_healthy(proc: subprocess.Popen[bytes], endpoint: str, timeout_s: float) -> None:
    probe = EngineClient(endpoint, timeout_s=0.5)
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"pegaflow-server exited with {proc.returncode} at startup")
            try:
                probe.health()
                return
            except PegaflowError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"pegaflow-server not healthy after {timeout_s} s") from None
                time.sleep(0.05)
    finally:
        probe.close()


def _stop(proc: subprocess.Popen[bytes]) -> int:
    """SIGTERM, then SIGKILL after 10 s; returns the exit code."""
    if proc.poll() is None:
        proc.terminate()
    try:
        return proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()


if __name__ == "__main__":
    sys.exit(main())
