"""The ``pegaflow-server`` console script, and :func:`spawn_server` for scripts.

The console script runs the server built into the extension; :func:`spawn_server` starts
it as a child process for the length of a ``with`` block (examples, notebooks, tests).
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence

from pegaflow._native import EngineClient, run_server
from pegaflow.errors import PegaflowError


def main(argv: list[str] | None = None) -> int:
    """Run the server with ``argv`` (default: ``sys.argv[1:]``) until SIGINT/SIGTERM."""
    args = sys.argv[1:] if argv is None else argv
    return run_server(["pegaflow-server", *args])


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@contextlib.contextmanager
def spawn_server(
    pool_size: str = "256mb",
    extra_args: Sequence[str] = (),
    startup_timeout_s: float = 20.0,
) -> Iterator[str]:
    """Starts ``pegaflow-server`` on a free loopback port (metrics off) and yields its
    endpoint once it is healthy; stops it with SIGTERM on exit.

    Raises ``RuntimeError`` if it exits or is not healthy within ``startup_timeout_s``.
    """
    endpoint = f"127.0.0.1:{_free_port()}"
    argv = [sys.executable, "-m", "pegaflow.server", "--addr", endpoint, "--pool-size", pool_size]
    proc = subprocess.Popen([*argv, "--metrics-addr", "", *extra_args], stdin=subprocess.DEVNULL)
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
