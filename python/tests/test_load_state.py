"""``LoadState``: the shared-memory completion flag of a load."""

from __future__ import annotations

import gc

import pytest
from conftest import KvFactory
from e2e_helpers import assert_blocks_equal, random_hashes, snapshot, zero_blocks

from pegaflow import EngineClient, LoadState, PegaflowTimeout


def load_state_mappings() -> int:
    """Load-state memfds mapped by this process."""
    with open("/proc/self/maps") as maps:
        return sum("/memfd:pegaflow-load-state" in line for line in maps)


def test_fresh_state() -> None:
    state = LoadState()
    assert state.status() == "pending"
    assert not state.is_done()
    assert state.error is None


def test_memory_released_when_collected() -> None:
    gc.collect()  # earlier tests' states must not go away while this one counts
    before = load_state_mappings()
    states = [LoadState() for _ in range(20)]
    assert load_state_mappings() == before + 20
    del states
    gc.collect()
    assert load_state_mappings() == before


def test_wait_times_out_while_pending() -> None:
    state = LoadState()
    with pytest.raises(PegaflowTimeout):
        state.wait(0.05)
    with pytest.raises(TimeoutError):
        state.wait(0)
    assert state.status() == "pending"


def test_load_completes(client: EngineClient, kv_cache: KvFactory, instance_id: str) -> None:
    kv = kv_cache(num_layers=4, num_blocks=32, seed=61)
    client.register_kv_layers(instance_id, "ls", 0, 1, kv.layer_specs())
    hashes = random_hashes(8)
    originals = snapshot(kv, list(range(8)))
    client.save(instance_id, 0, list(range(8)), hashes)

    state = LoadState()
    for round_ in range(3):  # one state serves several loads via reset()
        q = client.query(instance_id, hashes)
        assert q.lease_id is not None
        dest = list(range(16, 24))
        zero_blocks(kv, dest)
        if round_:
            assert state.is_done()
            state.reset()
        assert state.status() == "pending"
        assert client.load(instance_id, 0, q.lease_id, dest, state) == 8
        state.wait(10)
        assert state.is_done()
        assert state.status() == "done"
        assert state.error is None
        assert_blocks_equal(kv, dest, originals, f"round {round_}")
