"""The server trusts no client with its memory: host memory only arrives as a sealed memfd
handed over by descriptor (anything else is refused and left untouched), instances belong
to the sessions (and Unix users) that registered them, mappings are capped, and the server
keeps no descriptor per mapped region."""

from __future__ import annotations

import fcntl
import json
import os
import resource
import subprocess
import sys
import uuid
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from conftest import KvFactory, ServerHandle, StartServer
from e2e_helpers import random_hashes, wait_until

from pegaflow import (
    EngineClient,
    KvLayer,
    LoadState,
    PegaflowInvalidArgument,
    PegaflowNotFound,
    PegaflowPermissionDenied,
    PegaflowResourceExhausted,
    SharedKvCache,
)
from pegaflow.host import sealed_memfd

SMALL = {"num_layers": 2, "num_blocks": 16}


def instance_ids(client: EngineClient) -> list[str]:
    return sorted(str(i["instance_id"]) for i in client.list_instances())


def ranks_of(client: EngineClient, instance: str) -> object:
    return next(
        (i["registered_ranks"] for i in client.list_instances() if i["instance_id"] == instance),
        None,
    )


def with_fd(kv: SharedKvCache, fd: int) -> list[KvLayer]:
    """``kv``'s layer specs, all pointing at descriptor ``fd`` instead of ``kv``'s memfd."""
    return [
        KvLayer(
            s.layer,
            host_fd=fd,
            shape=list(s.shape),
            stride=list(s.stride),
            element_size=s.element_size,
            block_dim=s.block_dim,
            kv_dim=s.kv_dim,
            byte_offset=s.byte_offset,
        )
        for s in kv.layer_specs()
    ]


def on_tmpfs(path: Path) -> bool:
    out = subprocess.run(["stat", "-f", "-c", "%T", str(path)], capture_output=True, text=True)
    return out.stdout.strip() == "tmpfs"


@dataclass
class Foreign:
    """A descriptor the server must refuse; ``check_fd`` reads the bytes it must keep."""

    fd: int
    message: str
    check_fd: int | None


Maker = Callable[[Path, bytes, ExitStack], Foreign]


def _owned(fd: int, stack: ExitStack) -> int:
    stack.callback(os.close, fd)
    return fd


def _memfd(pattern: bytes, stack: ExitStack, seals: int) -> int:
    fd = _owned(os.memfd_create("foreign", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING), stack)
    os.ftruncate(fd, len(pattern))
    os.pwrite(fd, pattern, 0)
    if seals:
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
    return fd


def unsealed_memfd(tmp: Path, pattern: bytes, stack: ExitStack) -> Foreign:
    return Foreign(_memfd(pattern, stack, 0), "not sealed", None)


def grow_sealed_only(tmp: Path, pattern: bytes, stack: ExitStack) -> Foreign:
    fd = _memfd(pattern, stack, fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL)
    return Foreign(fd, "not sealed", fd)


def write_sealed(tmp: Path, pattern: bytes, stack: ExitStack) -> Foreign:
    seals = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE
    return Foreign(_memfd(pattern, stack, seals), "sealed against writing", None)


def regular_file(tmp: Path, pattern: bytes, stack: ExitStack) -> Foreign:
    (tmp / "foreign.bin").write_bytes(pattern)
    fd = _owned(os.open(tmp / "foreign.bin", os.O_RDWR), stack)
    return Foreign(fd, "not sealed" if on_tmpfs(tmp) else "not on tmpfs", fd)


def symlinked_file(tmp: Path, pattern: bytes, stack: ExitStack) -> Foreign:
    (tmp / "target.bin").write_bytes(pattern)
    (tmp / "link.bin").symlink_to(tmp / "target.bin")
    fd = _owned(os.open(tmp / "link.bin", os.O_RDWR), stack)
    return Foreign(fd, "not sealed" if on_tmpfs(tmp) else "not on tmpfs", fd)


def dev_shm_file(tmp: Path, pattern: bytes, stack: ExitStack) -> Foreign:
    path = Path("/dev/shm") / f"pegaflow-foreign-{uuid.uuid4().hex}"
    fd = _owned(os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600), stack)
    stack.callback(path.unlink)
    os.pwrite(fd, pattern, 0)
    return Foreign(fd, "not sealed", fd)


def read_only_memfd(tmp: Path, pattern: bytes, stack: ExitStack) -> Foreign:
    sealed = _owned(sealed_memfd(len(pattern), "read-only"), stack)
    os.pwrite(sealed, pattern, 0)
    ro = _owned(os.open(f"/proc/self/fd/{sealed}", os.O_RDONLY), stack)
    return Foreign(ro, "not open for reading and writing", sealed)


def pipe(tmp: Path, pattern: bytes, stack: ExitStack) -> Foreign:
    r, w = os.pipe()
    _owned(w, stack)
    return Foreign(_owned(r, stack), "not a memory file", None)


def directory(tmp: Path, pattern: bytes, stack: ExitStack) -> Foreign:
    fd = _owned(os.open(tmp, os.O_RDONLY | os.O_DIRECTORY), stack)
    return Foreign(fd, "not a memory file", None)


def closed_fd(tmp: Path, pattern: bytes, stack: ExitStack) -> Foreign:
    low = os.open(os.devnull, os.O_RDONLY)
    high = fcntl.fcntl(low, fcntl.F_DUPFD, 4000)  # far above numbers the process reuses
    os.close(low)
    os.close(high)
    return Foreign(high, "not an open descriptor", None)


FOREIGN: dict[str, Maker] = {
    "unsealed-memfd": unsealed_memfd,
    "grow-sealed-only": grow_sealed_only,
    "write-sealed": write_sealed,
    "regular-file": regular_file,
    "symlinked-file": symlinked_file,
    "dev-shm-file": dev_shm_file,
    "read-only-descriptor": read_only_memfd,
    "pipe": pipe,
    "directory": directory,
    "closed-fd": closed_fd,
}


@pytest.mark.parametrize("kind", list(FOREIGN))
def test_foreign_memory_is_refused_and_untouched(
    kind: str,
    server: ServerHandle,
    client: EngineClient,
    kv_cache: KvFactory,
    tmp_path: Path,
    instance_id: str,
) -> None:
    """Registering anything but a sealed, writable memfd fails with InvalidArgument and the
    reason; nothing is registered or mapped, saves/loads against the id find nothing, the
    foreign bytes are unchanged, and the server keeps serving (also a correct retry)."""
    anchor = kv_cache(**SMALL, seed=3)
    client.register_kv_layers("anchor", "ns", 0, 1, anchor.layer_specs())
    hashes = random_hashes(4)
    client.save("anchor", 0, [0, 1, 2, 3], hashes)
    before = server.metrics()
    template = kv_cache(**SMALL, seed=None)
    pattern = np.random.default_rng(5).bytes(template.region.size)

    with ExitStack() as stack:
        foreign = FOREIGN[kind](tmp_path, pattern, stack)
        with pytest.raises(PegaflowInvalidArgument, match=foreign.message):
            client.register_kv_layers(instance_id, "ns", 0, 1, with_fd(template, foreign.fd))

        assert server.is_running(), server.log()[-3000:]
        assert client.health()["status"] == "ok"
        assert instance_ids(client) == ["anchor"]
        after = server.metrics()
        for name in ("pegaflow_instances", "pegaflow_open_regions"):
            assert after[name] == before[name], name
        # (A previous round's load state is released by a one-way message: allow for it.)
        unchanged = before["pegaflow_client_mappings"]
        assert wait_until(lambda: server.metric("pegaflow_client_mappings") == unchanged, 5.0)
        with pytest.raises(PegaflowNotFound):
            client.save(instance_id, 0, [0, 1], random_hashes(2))
        q = client.query("anchor", hashes)
        assert q.hit_blocks == 4 and q.lease_id is not None
        with pytest.raises(PegaflowNotFound):
            client.load(instance_id, 0, q.lease_id, [0, 1, 2, 3], LoadState())
        client.release_lease(q.lease_id)
        if foreign.check_fd is not None:
            assert os.pread(foreign.check_fd, len(pattern) + 1, 0) == pattern

    client.register_kv_layers(instance_id, "ns", 0, 1, template.layer_specs())
    assert client.save(instance_id, 0, [0], random_hashes(1)).sealed_blocks == 1
    metrics = server.metrics()
    assert metrics["pegaflow_instances"] == before["pegaflow_instances"] + 1
    # The load states of the refused loads above are released by one-way messages.
    mappings = before["pegaflow_client_mappings"] + 1
    assert wait_until(lambda: server.metric("pegaflow_client_mappings") == mappings, 5.0)


OTHER_UID_CHILD = r"""
import json, os, sys
import numpy as np
from pegaflow import EngineClient, SharedKvCache

# Everything is imported as root (the interpreter lives under /root); from here on this
# process is uid/gid 65534, which is what the server sees when it connects.
os.setgroups([])
os.setgid(65534)
os.setuid(65534)
endpoint, instance = sys.argv[1:3]
results = {"uid": os.getuid()}
kv = SharedKvCache(2, (2, 16, 16, 2, 32), np.float16, block_dim=1, kv_dim=0)
client = EngineClient(endpoint, timeout_s=10.0)

def attempt(name, call):
    try:
        call()
        results[name] = "ok"
    except Exception as e:
        results[name] = f"{type(e).__name__}: {str(e)[:300]}"

own = instance + "-nobody"
attempt("own_register", lambda: client.register_kv_layers(own, "ns", 0, 1, kv.layer_specs()))
attempt("own_unregister", lambda: client.unregister_instance(own))
attempt("add_rank", lambda: client.register_kv_layers(instance, "ns", 1, 2, kv.layer_specs()))
attempt("unregister", lambda: client.unregister_instance(instance))
print(json.dumps(results), flush=True)
"""


def _other_uid_is_refused(server: ServerHandle, kv_cache: KvFactory, instance: str) -> None:
    """Root registers rank 0 over the Unix socket; uid 65534 can reach the socket and
    register its own instance, but can neither add a rank to root's instance nor drop it."""
    uds = str(server.client().health()["uds_path"])
    owner = EngineClient(f"unix:{uds}", timeout_s=10.0)
    try:
        kv0, kv1 = kv_cache(**SMALL, seed=11), kv_cache(**SMALL, seed=12)
        owner.register_kv_layers(instance, "ns", 0, 2, kv0.layer_specs())
        os.chmod(uds, 0o666)
        child = subprocess.run(
            [sys.executable, "-c", OTHER_UID_CHILD, f"unix:{uds}", instance],
            capture_output=True,
            text=True,
            timeout=60,
            cwd="/",
        )
        assert child.returncode == 0, child.stdout + child.stderr
        results = json.loads(child.stdout.strip().splitlines()[-1])
        assert results["uid"] == 65534, results
        assert results["own_register"] == "ok", results
        assert results["own_unregister"] == "ok", results
        assert results["add_rank"].startswith("PegaflowPermissionDenied"), results
        assert results["unregister"].startswith("PegaflowPermissionDenied"), results
        (info,) = [i for i in owner.list_instances() if i["instance_id"] == instance]
        assert info["registered_ranks"] == [0]
        # Rank 1 was free: its owner may add it.
        owner.register_kv_layers(instance, "ns", 1, 2, kv1.layer_specs())
        owner.unregister_instance(instance)
        assert instance not in instance_ids(owner)
    finally:
        owner.close()


def test_only_owning_sessions_unregister(
    server: ServerHandle, client: EngineClient, kv_cache: KvFactory, instance_id: str
) -> None:
    """Client B cannot unregister A's instance, and opening/closing a session of it drops
    nothing; B's own rank of it goes when B's session closes while A's rank stays; A's own
    unregister works. As root: another Unix user cannot add ranks to or drop A's instance."""
    kv_a, kv_b = kv_cache(**SMALL, seed=21), kv_cache(**SMALL, seed=22)
    a, b = client, server.client()
    a.register_kv_layers(instance_id, "ns", 0, 1, kv_a.layer_specs())
    hashes = random_hashes(4)

    with pytest.raises(PegaflowPermissionDenied):
        b.unregister_instance(instance_id)
    assert instance_id in instance_ids(a)
    assert a.save(instance_id, 0, [0, 1, 2, 3], hashes).sealed_blocks == 4
    q = a.query(instance_id, hashes)
    assert q.hit_blocks == 4 and q.lease_id is not None
    state = LoadState()
    a.load(instance_id, 0, q.lease_id, [8, 9, 10, 11], state)
    state.wait(20)
    assert state.status() == "done"
    for layer in kv_a.layers:
        assert np.array_equal(layer[:, 8:12].view(np.uint8), layer[:, 0:4].view(np.uint8))

    b.open_session(instance_id)
    b.close_session(instance_id)
    assert instance_id in instance_ids(a)
    assert a.save(instance_id, 0, [4], random_hashes(1)).sealed_blocks == 1

    # B's rank of a shared (tp_size=2) instance goes with B's session; A's rank stays.
    shared = f"{instance_id}-tp2"
    a.register_kv_layers(shared, "ns", 0, 2, kv_a.layer_specs())
    b.register_kv_layers(shared, "ns", 1, 2, kv_b.layer_specs())
    ranks = {i["instance_id"]: i["registered_ranks"] for i in a.list_instances()}
    assert ranks[shared] == [0, 1]
    b.close_session(shared)
    assert wait_until(lambda: ranks_of(a, shared) == [0], 5.0), a.list_instances()

    a.unregister_instance(instance_id)
    a.unregister_instance(shared)
    assert instance_ids(a) == []
    assert server.metric("pegaflow_open_regions") == 0

    if os.geteuid() == 0:
        _other_uid_is_refused(server, kv_cache, f"{instance_id}-uid")


def test_mapping_cap(start_server: StartServer, kv_cache: KvFactory) -> None:
    """With --max-client-mappings 3 the 4th region is refused (ResourceExhausted, counted,
    nothing registered); unregistering one makes room again."""
    server = start_server(pool_size="64mb", extra_args=["--max-client-mappings", "3"])
    client = server.client()
    caches = [kv_cache(**SMALL, seed=i) for i in range(4)]
    for i in range(3):
        client.register_kv_layers(f"m{i}", "ns", 0, 1, caches[i].layer_specs())
    metrics = server.metrics()
    assert metrics["pegaflow_client_mappings"] == 3
    refused = metrics["pegaflow_refused_mappings_total"]

    with pytest.raises(PegaflowResourceExhausted):
        client.register_kv_layers("m3", "ns", 0, 1, caches[3].layer_specs())
    metrics = server.metrics()
    assert metrics["pegaflow_refused_mappings_total"] == refused + 1
    assert metrics["pegaflow_client_mappings"] == 3
    assert instance_ids(client) == ["m0", "m1", "m2"]

    client.unregister_instance("m0")
    client.register_kv_layers("m3", "ns", 0, 1, caches[3].layer_specs())
    assert instance_ids(client) == ["m1", "m2", "m3"]
    assert server.metric("pegaflow_client_mappings") == 3


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def test_no_descriptor_per_region(start_server: StartServer, kv_cache: KvFactory) -> None:
    """Mapped regions keep no open descriptor in the server: its fd count stays flat over
    30 registered instances (which it does map) and after unregistering them."""
    server = start_server(pool_size="64mb")
    client = server.client()
    warm = kv_cache(**SMALL, seed=None)  # opens the gRPC and descriptor connections
    client.register_kv_layers("warm", "ns", 0, 1, warm.layer_specs())
    client.unregister_instance("warm")
    baseline = fd_count(server.pid)

    caches = [kv_cache(**SMALL, seed=None) for _ in range(30)]
    for i, kv in enumerate(caches):
        client.register_kv_layers(f"fd{i}", "ns", 0, 1, kv.layer_specs())
    assert server.metric("pegaflow_client_mappings") == 30
    maps = server.maps()
    assert all(f"/memfd:{kv.name} " in maps for kv in caches)
    registered = fd_count(server.pid)
    assert registered <= baseline + 3, f"{registered - baseline} more descriptors for 30 regions"

    for i in range(30):
        client.unregister_instance(f"fd{i}")
    assert wait_until(lambda: not any(f"/memfd:{kv.name} " in server.maps() for kv in caches))
    # The gauge is refreshed by the next engine event (at most the 0.5 s lease sweep).
    assert wait_until(lambda: server.metric("pegaflow_client_mappings") == 0, 2.0), (
        f"pegaflow_client_mappings = {server.metric('pegaflow_client_mappings')} "
        "after every region was unregistered and unmapped"
    )
    assert fd_count(server.pid) <= baseline + 3


def test_open_files_limit_raised(start_server: StartServer) -> None:
    """Started with a low soft RLIMIT_NOFILE, the server raises it to the hard limit and
    reports it as pegaflow_open_files_limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    low = 256
    assert hard == resource.RLIM_INFINITY or hard > low
    resource.setrlimit(resource.RLIMIT_NOFILE, (low, hard))
    try:
        server = start_server(pool_size="16mb")
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    (line,) = [
        ln
        for ln in Path(f"/proc/{server.pid}/limits").read_text().splitlines()
        if ln.startswith("Max open files")
    ]
    fields = line.split()
    server_soft, server_hard = fields[3], fields[4]
    assert server_soft == server_hard, line
    if server_hard != "unlimited":
        assert int(server_soft) > low
        assert server.metric("pegaflow_open_files_limit") == int(server_soft)


def test_only_the_registering_session_moves_a_ranks_bytes(
    server: ServerHandle, kv_cache: KvFactory, instance_id: str
) -> None:
    """Another client, with a session of its own for the instance or with none, can neither
    save from the owner's KV memory (reading it) nor load into it (writing it); a local
    client talks over the Unix socket, so the instance records its uid and pid."""
    owner, stranger = server.client(), server.client()
    kv = kv_cache(num_layers=4, num_blocks=32, seed=81)
    owner.register_kv_layers(instance_id, "ns", 0, 1, kv.layer_specs())
    (info,) = [i for i in owner.list_instances() if i["instance_id"] == instance_id]
    assert (info["owner_uid"], info["owner_pid"]) == (os.getuid(), os.getpid())
    hashes = random_hashes(4)
    owner.save(instance_id, 0, [0, 1, 2, 3], hashes)
    q = owner.query(instance_id, hashes)
    assert q.lease_id is not None
    before = [layer.view(np.uint8).copy() for layer in kv.layers]
    for with_session in (False, True):
        if with_session:
            stranger.open_session(instance_id)
        with pytest.raises(PegaflowPermissionDenied):
            stranger.save(instance_id, 0, [5, 6], random_hashes(2))
        with pytest.raises(PegaflowPermissionDenied):
            stranger.load(instance_id, 0, q.lease_id, [10, 11, 12, 13], LoadState())
    after = [layer.view(np.uint8) for layer in kv.layers]
    assert all(np.array_equal(a, b) for a, b in zip(before, after, strict=True))
    # The owner still loads with the same lease: the refused loads consumed nothing.
    state = LoadState()
    owner.load(instance_id, 0, q.lease_id, [10, 11, 12, 13], state)
    state.wait(10)
    raw = [layer.view(np.uint8) for layer in kv.layers]
    assert all(np.array_equal(r[:, 10:14], r[:, 0:4]) for r in raw)


def test_drop_cache_keeps_leased_blocks(
    server: ServerHandle, client: EngineClient, kv_cache: KvFactory, instance_id: str
) -> None:
    """The admin call drops every unleased block; this test's client runs as the server's
    user on its Unix socket, so it may."""
    kv = kv_cache(num_layers=4, num_blocks=32, seed=91)
    client.register_kv_layers(instance_id, "ns", 0, 1, kv.layer_specs())
    hashes = random_hashes(4)
    client.save(instance_id, 0, [0, 1, 2, 3], hashes)
    leased = client.query(instance_id, hashes[:1])
    assert leased.lease_id is not None
    assert client.drop_cache() == {"dropped_blocks": 3, "kept_blocks": 1}
    assert client.query(instance_id, hashes[1:]).hit_blocks == 0
    client.release_lease(leased.lease_id)
    assert server.metric("pegaflow_cache_blocks") == 1
