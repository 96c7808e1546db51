"""Bad requests fail with the right error class and a useful message, the server stays
up, and nothing changes: saved blocks still hit and the cache holds the same blocks."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from conftest import KvFactory, ServerHandle, StartServer, free_port
from e2e_helpers import LLAMA_LAYERS, random_hashes

from pegaflow import (
    EngineClient,
    KvLayer,
    LoadState,
    PegaflowAlreadyExists,
    PegaflowError,
    PegaflowInvalidArgument,
    PegaflowNotFound,
    PegaflowPermissionDenied,
    PegaflowResourceExhausted,
    PegaflowTimeout,
    PegaflowUnavailable,
    SharedKvCache,
)

NUM_BLOCKS = 64
SAVED = 16


@dataclass
class Setup:
    server: ServerHandle
    client: EngineClient
    kv: SharedKvCache
    instance: str
    hashes: list[bytes]

    def assert_unchanged(self) -> None:
        """The server answers, the saved blocks still hit, the index is as it was."""
        assert self.client.health()["status"] == "ok"
        q = self.client.query(self.instance, self.hashes)
        assert q.hit_blocks == SAVED
        assert q.lease_id is not None
        self.client.release_lease(q.lease_id)
        metrics = self.server.metrics()
        assert metrics["pegaflow_cache_blocks"] == SAVED
        assert metrics["pegaflow_cache_sealed_blocks"] == SAVED
        assert metrics["pegaflow_instances"] == 1
        assert metrics["pegaflow_open_regions"] == 1
        assert metrics["pegaflow_leases"] == 0
        assert metrics['pegaflow_evicted_blocks_total{tier="ram",reason="capacity"}'] == 0


@pytest.fixture
def setup(
    server: ServerHandle, client: EngineClient, kv_cache: KvFactory, instance_id: str
) -> Iterator[Setup]:
    kv = kv_cache(num_blocks=NUM_BLOCKS, seed=21)
    client.register_kv_layers(instance_id, "bad-input", 0, 1, kv.layer_specs())
    hashes = random_hashes(SAVED)
    r = client.save(instance_id, 0, list(range(SAVED)), hashes)
    assert r.sealed_blocks == SAVED
    s = Setup(server, client, kv, instance_id, hashes)
    s.assert_unchanged()
    yield s
    s.assert_unchanged()


def lease(s: Setup, ttl_ms: int = 0) -> str:
    q = s.client.query(s.instance, s.hashes, lease_ttl_ms=ttl_ms)
    assert q.hit_blocks == SAVED and q.lease_id is not None
    return q.lease_id


def test_unknown_instance(setup: Setup) -> None:
    s = setup
    with pytest.raises(PegaflowNotFound, match="no-such-instance"):
        s.client.save("no-such-instance", 0, [0], [s.hashes[0]])
    with pytest.raises(PegaflowNotFound, match="no-such-instance"):
        s.client.query("no-such-instance", s.hashes)
    lease_id = lease(s)
    with pytest.raises(PegaflowNotFound, match="no-such-instance"):
        s.client.load("no-such-instance", 0, lease_id, [20], LoadState())
    # An unknown rank of a known instance.
    with pytest.raises(PegaflowNotFound, match="rank 3"):
        s.client.save(s.instance, 3, [0], [s.hashes[0]])
    with pytest.raises(PegaflowNotFound, match="rank 3"):
        s.client.load(s.instance, 3, lease_id, [20], LoadState())
    with pytest.raises(PegaflowNotFound, match="no-such-instance"):
        s.client.unregister_instance("no-such-instance")
    s.client.release_lease(lease_id)  # the failed loads did not consume it


def test_not_found_is_a_lookup_error(setup: Setup) -> None:
    with pytest.raises(LookupError):
        setup.client.query("no-such-instance", setup.hashes)


def test_mismatched_lengths(setup: Setup) -> None:
    s = setup
    new = random_hashes(3)
    with pytest.raises(PegaflowInvalidArgument, match=r"2 block ids but 3 block hashes"):
        s.client.save(s.instance, 0, [20, 21], new)
    with pytest.raises(PegaflowInvalidArgument, match=r"3 block ids but 2 block hashes"):
        s.client.save(s.instance, 0, [20, 21, 22], new[:2])
    assert s.client.query(s.instance, new).hit_blocks == 0


def test_block_id_out_of_range(setup: Setup) -> None:
    s = setup
    new = random_hashes(2)
    with pytest.raises(PegaflowInvalidArgument, match=rf"block id {NUM_BLOCKS}\b.*out of range"):
        s.client.save(s.instance, 0, [1, NUM_BLOCKS], new)
    with pytest.raises(PegaflowInvalidArgument, match="out of range"):
        s.client.save(s.instance, 0, [2**40], new[:1])
    assert s.client.query(s.instance, new[:1]).hit_blocks == 0, "a failed save stored a block"
    lease_id = lease(s)
    with pytest.raises(PegaflowInvalidArgument, match=rf"block id {NUM_BLOCKS}\b.*out of range"):
        s.client.load(s.instance, 0, lease_id, [20, NUM_BLOCKS], LoadState())
    # The lease survived the failed load.
    s.client.release_lease(lease_id)


@pytest.mark.parametrize("size", [0, 31, 33, 64])
def test_hash_of_wrong_size(setup: Setup, size: int) -> None:
    s = setup
    bad = os.urandom(size)
    with pytest.raises(PegaflowInvalidArgument, match=rf"{size} bytes, expected 32"):
        s.client.save(s.instance, 0, [20, 21], [os.urandom(32), bad])
    with pytest.raises(PegaflowInvalidArgument, match=rf"{size} bytes, expected 32"):
        s.client.query(s.instance, [*s.hashes, bad])


def test_bad_layer_selection(setup: Setup) -> None:
    s = setup
    new = random_hashes(1)
    with pytest.raises(PegaflowInvalidArgument, match=rf"layer {LLAMA_LAYERS}\b"):
        s.client.save(s.instance, 0, [20], new, layers=[0, LLAMA_LAYERS])
    with pytest.raises(PegaflowInvalidArgument, match="listed twice"):
        s.client.save(s.instance, 0, [20], new, layers=[1, 1])
    assert s.server.metric("pegaflow_cache_blocks") == SAVED


def _specs_with(kv: SharedKvCache, index: int, **changes: object) -> list[KvLayer]:
    """``kv``'s layer specs with the spec of layer ``index`` altered by ``changes``."""
    specs = kv.layer_specs()
    base = specs[index]
    fields: dict[str, object] = {
        "layer": base.layer,
        "host_fd": base.host_fd,
        "shape": list(base.shape),
        "stride": list(base.stride),
        "element_size": base.element_size,
        "block_dim": base.block_dim,
        "kv_dim": base.kv_dim,
        "byte_offset": base.byte_offset,
    }
    fields.update(changes)
    specs[index] = KvLayer(**fields)  # type: ignore[arg-type]
    return specs


def _bad_layouts(kv: SharedKvCache) -> dict[str, tuple[list[KvLayer], str]]:
    last = LLAMA_LAYERS - 1
    good = kv.layer_specs()[last]
    shape, stride = list(good.shape), list(good.stride)  # (2, 64, 16, 2, 32)
    overlapping = list(stride)
    overlapping[1] = stride[1] // 2  # blocks half a segment apart
    kv_aliased = list(stride)
    kv_aliased[0] = 0  # K and V at the same address
    kv3_shape = [3, *shape[1:]]
    kv3_stride = [NUM_BLOCKS * stride[1], *stride[1:]]
    non_dense = list(stride)
    non_dense[2] = stride[2] * 2  # a gap between the token rows of a block
    region = kv.region.size
    return {
        "overlapping strides": (_specs_with(kv, last, stride=overlapping), "overlap"),
        "K and V aliased": (_specs_with(kv, last, stride=kv_aliased), "overlap"),
        "kv_dim of size 3": (_specs_with(kv, last, shape=kv3_shape, stride=kv3_stride), "size 3"),
        "block_dim out of range": (_specs_with(kv, last, block_dim=5), "block_dim 5"),
        "kv_dim equals block_dim": (_specs_with(kv, last, kv_dim=1), "kv_dim 1"),
        "past the end of the file": (_specs_with(kv, last, byte_offset=region), "region holds"),
        "one byte past the end": (
            _specs_with(kv, last, byte_offset=good.byte_offset + 1),
            "region holds",
        ),
        "non-dense strides": (_specs_with(kv, last, stride=non_dense), "dense"),
        "shape/stride rank mismatch": (_specs_with(kv, last, stride=stride[:-1]), "stride"),
        "zero element size": (_specs_with(kv, last, element_size=0), "element size"),
        "zero-sized dimension": (
            _specs_with(kv, last, shape=[2, 0, *shape[2:]]),
            "size 0",
        ),
        "duplicate layer index": (_specs_with(kv, last, layer=0), "layer 0"),
        "layer index out of range": (_specs_with(kv, last, layer=LLAMA_LAYERS), "outside"),
    }


def test_impossible_layouts_are_rejected(setup: Setup, kv_cache: KvFactory) -> None:
    s = setup
    kv = kv_cache(num_blocks=NUM_BLOCKS, seed=None)
    for case, (specs, message) in _bad_layouts(kv).items():
        inst = f"{s.instance}-bad-layout"
        with pytest.raises(PegaflowInvalidArgument, match=message) as err:
            s.client.register_kv_layers(inst, "bad-input", 0, 1, specs)
        assert str(err.value), case
        ids = [i["instance_id"] for i in s.client.list_instances()]
        assert inst not in ids, f"{case}: instance registered after a failed registration"
        assert s.server.metric("pegaflow_open_regions") == 1, f"{case}: region left mapped"
    # The same file with a correct layout registers fine afterwards.
    s.client.register_kv_layers(f"{s.instance}-good", "bad-input", 0, 1, kv.layer_specs())
    s.client.unregister_instance(f"{s.instance}-good")


def test_layout_error_names_the_layer(setup: Setup, kv_cache: KvFactory) -> None:
    s = setup
    kv = kv_cache(num_blocks=NUM_BLOCKS, seed=None)
    specs = _specs_with(kv, 7, block_dim=9)
    with pytest.raises(PegaflowInvalidArgument, match=r"layer 7\b"):
        s.client.register_kv_layers(f"{s.instance}-x", "bad-input", 0, 1, specs)


def test_bad_registration_arguments(setup: Setup, kv_cache: KvFactory) -> None:
    s = setup
    kv = kv_cache(num_blocks=NUM_BLOCKS, seed=None)
    specs = kv.layer_specs()
    cases: list[tuple[str, str, int, int, list[KvLayer], str]] = [
        ("", "ns", 0, 1, specs, "instance_id"),
        ("x", "", 0, 1, specs, "namespace"),
        ("x", "ns", 1, 1, specs, "tp_rank 1"),
        ("x", "ns", 0, 0, specs, "tp_size 0"),
        ("x", "ns", 0, 1, [], "num_layers 0"),
        ("x" * 300, "ns", 0, 1, specs, "instance_id"),
    ]
    for inst, ns, rank, size, layers, message in cases:
        with pytest.raises(PegaflowInvalidArgument, match=message):
            s.client.register_kv_layers(inst, ns, rank, size, layers)
    assert [i["instance_id"] for i in s.client.list_instances()] == [s.instance]


def test_instance_settings_must_match(setup: Setup, kv_cache: KvFactory) -> None:
    s = setup
    kv = kv_cache(num_blocks=NUM_BLOCKS, seed=None)
    # Same instance, other namespace / tp_size: rejected, instance unchanged.
    with pytest.raises(PegaflowInvalidArgument, match="registered with namespace"):
        s.client.register_kv_layers(s.instance, "other", 0, 1, kv.layer_specs())
    with pytest.raises(PegaflowInvalidArgument, match="registered with namespace"):
        s.client.register_kv_layers(s.instance, "bad-input", 1, 2, kv.layer_specs())


def test_register_same_rank_twice(setup: Setup, kv_cache: KvFactory) -> None:
    s = setup
    kv = kv_cache(num_blocks=NUM_BLOCKS, seed=None)
    with pytest.raises(PegaflowAlreadyExists, match=r"rank 0.*already registered"):
        s.client.register_kv_layers(s.instance, "bad-input", 0, 1, kv.layer_specs())
    (info,) = s.client.list_instances()
    assert info["registered_ranks"] == [0]
    assert info["open_regions"] == 1


def test_unknown_and_expired_lease(setup: Setup) -> None:
    s = setup
    with pytest.raises(PegaflowNotFound, match="lease"):
        s.client.load(s.instance, 0, "no-such-lease", [20], LoadState())
    with pytest.raises(PegaflowNotFound, match="lease"):
        s.client.release_lease("no-such-lease")
    lease_id = lease(s, ttl_ms=50)
    time.sleep(0.3)
    state = LoadState()
    with pytest.raises(PegaflowNotFound, match="expired"):
        s.client.load(s.instance, 0, lease_id, [20], state)
    assert state.status() == "pending"
    with pytest.raises(PegaflowNotFound):
        s.client.release_lease(lease_id)


def test_lease_ttl_too_long(setup: Setup) -> None:
    with pytest.raises(PegaflowInvalidArgument, match="exceeds the maximum"):
        setup.client.query(setup.instance, setup.hashes, lease_ttl_ms=10**9)


def test_load_more_blocks_than_leased(setup: Setup) -> None:
    s = setup
    lease_id = lease(s)
    with pytest.raises(PegaflowInvalidArgument, match="destination blocks"):
        s.client.load(s.instance, 0, lease_id, list(range(20, 20 + SAVED + 1)), LoadState())
    with pytest.raises(PegaflowInvalidArgument, match="destination blocks"):
        s.client.load(s.instance, 0, lease_id, [], LoadState())
    s.client.release_lease(lease_id)


def test_save_larger_than_pool(start_server: StartServer, kv_cache: KvFactory) -> None:
    server = start_server(pool_size="8mb")
    client = server.client()
    kv = kv_cache(num_blocks=128, seed=31)  # 128 KiB per block: 64 fit in 8 MiB
    client.register_kv_layers("small-pool", "ns", 0, 1, kv.layer_specs())
    kept = random_hashes(16)
    client.save("small-pool", 0, list(range(16)), kept)
    before = server.metrics()
    assert before["pegaflow_cache_blocks"] == 16

    too_many = random_hashes(100)  # 12.5 MiB in one save
    with pytest.raises(PegaflowResourceExhausted, match=r"100 blocks.*pool holds 8388608"):
        client.save("small-pool", 0, list(range(16, 116)), too_many)

    after = server.metrics()
    assert client.health()["status"] == "ok"
    for name in (
        "pegaflow_cache_blocks",
        "pegaflow_cache_sealed_blocks",
        "pegaflow_pool_used_bytes",
        'pegaflow_evicted_blocks_total{tier="ram",reason="capacity"}',
        "pegaflow_saved_blocks_total",
    ):
        assert after[name] == before[name], name
    q = client.query("small-pool", kept)
    assert q.hit_blocks == 16, "a refused save evicted blocks"
    assert client.query("small-pool", too_many).hit_blocks == 0
    assert q.lease_id is not None
    client.release_lease(q.lease_id)
    # A save that fits still works.
    r = client.save("small-pool", 0, list(range(16, 48)), too_many[:32])
    assert r.sealed_blocks == 32


def test_unreachable_server() -> None:
    port = free_port()  # nothing listens there
    client = EngineClient(f"127.0.0.1:{port}", timeout_s=1.0)
    start = time.monotonic()
    with pytest.raises((PegaflowUnavailable, PegaflowTimeout)) as err:
        client.health()
    assert time.monotonic() - start < 3.0
    assert str(err.value)
    assert isinstance(err.value, PegaflowError)
    start = time.monotonic()
    with pytest.raises((PegaflowUnavailable, PegaflowTimeout)):
        client.query("x", [bytes(32)])
    assert time.monotonic() - start < 3.0


def test_bad_client_arguments() -> None:
    with pytest.raises(PegaflowInvalidArgument):
        EngineClient("127.0.0.1:1", timeout_s=0)
    with pytest.raises(PegaflowInvalidArgument):
        EngineClient("not a uri at all \x00", timeout_s=1)


def test_error_classes_carry_codes() -> None:
    assert issubclass(PegaflowInvalidArgument, ValueError)
    assert issubclass(PegaflowNotFound, LookupError)
    assert issubclass(PegaflowUnavailable, ConnectionError)
    assert issubclass(PegaflowTimeout, TimeoutError)
    assert issubclass(PegaflowPermissionDenied, PermissionError)
    for cls, code in [
        (PegaflowInvalidArgument, "INVALID_ARGUMENT"),
        (PegaflowNotFound, "NOT_FOUND"),
        (PegaflowAlreadyExists, "ALREADY_EXISTS"),
        (PegaflowPermissionDenied, "PERMISSION_DENIED"),
        (PegaflowResourceExhausted, "RESOURCE_EXHAUSTED"),
        (PegaflowUnavailable, "UNAVAILABLE"),
        (PegaflowTimeout, "DEADLINE_EXCEEDED"),
    ]:
        assert issubclass(cls, PegaflowError)
        assert cls.code == code


def test_clients_cannot_resize_registered_memory(
    start_server: StartServer, kv_cache: KvFactory
) -> None:
    """Registered memory is sealed: a client can neither shrink (which would SIGBUS the
    server's copies) nor grow it, even while a save copies from it; the server and its
    other clients carry on."""
    import threading

    server = start_server(pool_size="512mb")
    client = server.client()
    survivor = kv_cache(num_layers=4, num_blocks=16, seed=71)
    client.register_kv_layers("survivor", "ns", 0, 1, survivor.layer_specs())
    kept = random_hashes(4)
    client.save("survivor", 0, [0, 1, 2, 3], kept)

    kv = kv_cache(num_layers=32, num_blocks=512, seed=72)  # 64 MiB
    client.register_kv_layers("shrinker", "ns", 0, 1, kv.layer_specs())
    refused: list[int] = []
    saving = threading.Event()

    def resize() -> None:
        saving.wait(5)
        for size in (0, kv.region.size // 2, kv.region.size * 2) * 50:
            try:
                os.ftruncate(kv.region.fd, size)
            except PermissionError:
                refused.append(size)

    resizer = threading.Thread(target=resize)
    resizer.start()
    saving.set()
    for _ in range(4):
        client.save("shrinker", 0, list(range(512)), random_hashes(512))
    resizer.join()
    assert len(refused) == 150, "the kernel let a sealed memfd change size"
    assert server.is_running(), f"server died (exit code {server.proc.poll()})"
    assert client.health()["status"] == "ok"
    q = client.query("survivor", kept)
    assert q.hit_blocks == 4
