"""Network exposure: a non-loopback listener needs credentials (or --insecure); with an
auth token every TCP gRPC call and every HTTP path but /health needs it, while the Unix
socket does not; with TLS a client that trusts the certificate connects and a plain one
does not."""

from __future__ import annotations

import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
from conftest import ServerHandle, free_port, parse_metrics, server_executable

from pegaflow import EngineClient, PegaflowError, PegaflowPermissionDenied

TOKEN = "0123456789abcdefghijklmnopqrstuv"  # 32 characters


def run_until_exit(args: Sequence[str], timeout_s: float = 15.0) -> tuple[int | None, str]:
    """Runs pegaflow-server; (exit code, output), or (None, output) if it is still running
    after ``timeout_s`` (then it is stopped)."""
    proc = subprocess.Popen(
        [server_executable(), "--pool-size", "16mb", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        text=True,
    )
    try:
        out, _ = proc.communicate(timeout=timeout_s)
        return proc.returncode, out
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=10)
        return None, out


@pytest.mark.parametrize(
    "where",
    ["grpc", "metrics"],
)
def test_public_listener_needs_credentials(where: str) -> None:
    """--addr or --metrics-addr on 0.0.0.0 without a token (or TLS, for gRPC) makes the
    server exit non-zero at start, saying why; the same with --insecure starts."""
    grpc, http = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    if where == "grpc":
        grpc = f"0.0.0.0:{free_port()}"
    else:
        http = f"0.0.0.0:{free_port()}"
    args = ["--addr", grpc, "--metrics-addr", http, "--uds", ""]
    rc, out = run_until_exit(args)
    assert rc not in (0, None), f"started on {grpc} / {http} without credentials:\n{out}"
    assert "without credentials" in out, out
    assert "Traceback" not in out

    rc, out = run_until_exit([*args, "--insecure"], timeout_s=3.0)
    assert rc is None, f"--insecure did not start (exit code {rc}):\n{out}"


@pytest.fixture
def spawned(tmp_path: Path) -> Iterator[list[ServerHandle]]:
    """Servers started by :func:`spawn`; each must exit 0 on SIGTERM at teardown."""
    handles: list[ServerHandle] = []
    yield handles
    for handle in handles:
        rc = handle.stop(signal.SIGTERM)
        assert rc == 0, f"exit code {rc} on SIGTERM:\n{handle.log()[-3000:]}"


def spawn(
    handles: list[ServerHandle],
    tmp_path: Path,
    args: Sequence[str],
    grpc_port: int,
    http_port: int,
    probe: EngineClient,
) -> ServerHandle:
    """Starts pegaflow-server with ``args`` and waits until ``probe`` gets a health answer."""
    log_path = tmp_path / f"server-{grpc_port}.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [server_executable(), "--pool-size", "16mb", *args],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=tmp_path,
        )
    handle = ServerHandle(
        f"127.0.0.1:{grpc_port}", f"127.0.0.1:{http_port}", proc, log_path, "16mb"
    )
    handles.append(handle)
    deadline = time.monotonic() + 20.0
    while True:
        if proc.poll() is not None:
            handle.exit_code = proc.returncode
            pytest.fail(f"server exited with {proc.returncode}:\n{handle.log()}")
        try:
            if probe.health()["status"] == "ok":
                return handle
        except PegaflowError:
            if time.monotonic() > deadline:
                raise
        time.sleep(0.05)


def http_status(url: str, token: str | None = None) -> int:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=5) as r:
            status: int = r.status
            return status
    except urllib.error.HTTPError as e:
        return e.code


def metrics_with_token(server: ServerHandle) -> dict[str, float]:
    request = urllib.request.Request(
        server.metrics_url, headers={"Authorization": f"Bearer {TOKEN}"}
    )
    with urllib.request.urlopen(request, timeout=5) as resp:
        return parse_metrics(resp.read().decode())


def test_auth_token(
    spawned: list[ServerHandle], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On 0.0.0.0 with --auth-token-file: TCP calls without the token (or with a wrong one)
    are PermissionDenied and counted; with the token (argument or env) they work; Unix
    socket calls need none; HTTP needs it everywhere but /health."""
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    token_file.chmod(0o600)
    wrong_file = tmp_path / "wrong"
    wrong_file.write_text("x" * 32)
    wrong_file.chmod(0o600)
    grpc_port, http_port = free_port(), free_port()
    endpoint = f"127.0.0.1:{grpc_port}"
    authed = EngineClient(endpoint, timeout_s=5.0, auth_token_file=str(token_file))
    args = [
        "--addr",
        f"0.0.0.0:{grpc_port}",
        "--metrics-addr",
        f"0.0.0.0:{http_port}",
        "--auth-token-file",
        str(token_file),
    ]
    server = spawn(spawned, tmp_path, args, grpc_port, http_port, authed)
    before = metrics_with_token(server)["pegaflow_unauthenticated_requests_total"]

    anonymous = EngineClient(endpoint, timeout_s=5.0)
    with pytest.raises(PegaflowPermissionDenied):
        anonymous.health()
    with pytest.raises(PegaflowPermissionDenied):
        anonymous.list_instances()
    with pytest.raises(PegaflowPermissionDenied):
        EngineClient(endpoint, timeout_s=5.0, auth_token_file=str(wrong_file)).health()
    after = metrics_with_token(server)["pegaflow_unauthenticated_requests_total"]
    assert after >= before + 3

    health = authed.health()
    assert health["status"] == "ok"
    monkeypatch.setenv("PEGAFLOW_AUTH_TOKEN_FILE", str(token_file))
    assert EngineClient(endpoint, timeout_s=5.0).health()["status"] == "ok"
    monkeypatch.delenv("PEGAFLOW_AUTH_TOKEN_FILE")
    local = EngineClient(f"unix:{health['uds_path']}", timeout_s=5.0)
    assert local.health()["status"] == "ok"
    assert local.list_instances() == []

    assert http_status(server.metrics_url) == 401
    assert http_status(server.metrics_url, "y" * 32) == 401
    assert http_status(server.metrics_url, TOKEN) == 200
    assert http_status(server.health_url) == 200
    final = metrics_with_token(server)["pegaflow_unauthenticated_requests_total"]
    assert final > after, "refused HTTP requests were not counted"
    for client in (authed, anonymous, local):
        client.close()


def openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


def make_ca(directory: Path, name: str) -> tuple[Path, Path]:
    """A self-signed CA certificate and its key."""
    cert, key = directory / f"{name}.pem", directory / f"{name}.key"
    openssl(
        *("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}", "-days", "1"),
        *("-keyout", str(key), "-out", str(cert)),
    )
    return cert, key


def make_server_cert(directory: Path, ca: tuple[Path, Path]) -> tuple[Path, Path]:
    """A certificate for DNS:localhost signed by ``ca``, and its key."""
    cert, key, csr = directory / "c.pem", directory / "k.pem", directory / "req.csr"
    ext = directory / "ext.cnf"
    ext.write_text("subjectAltName=DNS:localhost\nbasicConstraints=critical,CA:FALSE\n")
    openssl(
        *("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=localhost"),
        *("-keyout", str(key), "-out", str(csr)),
    )
    openssl(
        *("x509", "-req", "-in", str(csr), "-CA", str(ca[0]), "-CAkey", str(ca[1])),
        *("-set_serial", "1", "-days", "1", "-extfile", str(ext), "-out", str(cert)),
    )
    return cert, key


def test_tls(spawned: list[ServerHandle], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With --tls-cert/--tls-key (a localhost certificate of a private CA) an https client
    trusting that CA (PEGAFLOW_TLS_CA_FILE) connects; a plain-text client and one trusting
    another CA fail."""
    ca = make_ca(tmp_path, "pegaflow-test-ca")
    other_ca, _ = make_ca(tmp_path, "other-ca")
    cert, key = make_server_cert(tmp_path, ca)
    grpc_port, http_port = free_port(), free_port()
    monkeypatch.setenv("PEGAFLOW_TLS_CA_FILE", str(ca[0]))
    secure = EngineClient(f"https://localhost:{grpc_port}", timeout_s=5.0)
    args = [
        "--addr",
        f"127.0.0.1:{grpc_port}",
        "--metrics-addr",
        f"127.0.0.1:{http_port}",
        "--tls-cert",
        str(cert),
        "--tls-key",
        str(key),
    ]
    spawn(spawned, tmp_path, args, grpc_port, http_port, secure)
    assert secure.health()["status"] == "ok"
    assert secure.list_instances() == []

    plain = EngineClient(f"http://127.0.0.1:{grpc_port}", timeout_s=3.0)
    with pytest.raises(PegaflowError):
        plain.health()
    monkeypatch.setenv("PEGAFLOW_TLS_CA_FILE", str(other_ca))
    untrusting = EngineClient(f"https://localhost:{grpc_port}", timeout_s=3.0)
    with pytest.raises(PegaflowError):
        untrusting.health()
    for client in (secure, plain, untrusting):
        client.close()
