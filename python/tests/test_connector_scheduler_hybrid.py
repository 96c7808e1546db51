"""The scheduler half with a hybrid model's KV cache groups (full attention, a sliding
window, a recurrent state) against a real server. No vLLM needed: requests and step
outputs are shaped like vLLM's."""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import pytest
from conftest import KvFactory, ServerHandle
from e2e_helpers import FakeRequest, random_hashes

from pegaflow import EngineClient
from pegaflow.connector.config import ConnectorConfig
from pegaflow.connector.policy import FULL_GROUP, CacheGroup, GroupKind, group_key
from pegaflow.connector.scheduler import SchedulerSide

BLOCK = 16
GROUPS = [FULL_GROUP, CacheGroup(GroupKind.SLIDING, window_blocks=2), CacheGroup(GroupKind.STATE)]
FULL, SLIDING, STATE = range(3)
BLOCKS = 8  # a request of 8 full blocks (+1 token): up to 8 blocks may be loaded


@dataclass
class FakeOutput:
    num_scheduled_tokens: dict[str, int]
    scheduled_new_reqs: list[Any] = field(default_factory=list)
    kv_connector_block_state: Any = None
    preempted_req_ids: set[str] | None = None


@dataclass
class Stored:
    client: EngineClient
    instance_id: str
    hashes: list[bytes]

    def save(self, group: int, positions: list[int], first_block_id: int = 0) -> None:
        keys = [group_key(self.hashes[p], group, len(GROUPS)) for p in positions]
        ids = [first_block_id + i for i in range(len(positions))]
        self.client.save(self.instance_id, 0, ids, keys)

    def key(self, group: int, position: int) -> bytes:
        return group_key(self.hashes[position], group, len(GROUPS))

    def save_all(self) -> None:
        """Every block of every group, under block ids 0.., 10.., 20.."""
        for group in (FULL, SLIDING, STATE):
            self.save(group, list(range(BLOCKS)), 10 * group)


@pytest.fixture
def stored(server: ServerHandle, kv_cache: KvFactory, instance_id: str) -> Stored:
    kv = kv_cache(num_layers=1, num_blocks=64, block_size=BLOCK)
    client = server.client()
    client.register_kv_layers(instance_id, "ns", 0, 1, kv.layer_specs())
    return Stored(client, instance_id, random_hashes(BLOCKS))


def side(server: ServerHandle, stored: Stored, blocks: Any = None) -> SchedulerSide:
    config = ConnectorConfig(instance_id=stored.instance_id, endpoint=server.endpoint)
    s = SchedulerSide(config, server.client(), BLOCK, BLOCK, groups=GROUPS)
    s.bind_block_ids(lambda req_id: blocks[req_id])
    return s


def request(stored: Stored) -> FakeRequest:
    return FakeRequest("r1", BLOCKS * BLOCK + 1, stored.hashes)


def test_a_hit_needs_every_group_and_a_missing_state_lowers_it(
    server: ServerHandle, stored: Stored
) -> None:
    stored.save(FULL, list(range(BLOCKS)))
    stored.save(SLIDING, list(range(BLOCKS)), 10)
    stored.save(STATE, [5], 20)  # only the state after block 5 was kept
    queries = server.metric_total("pegaflow_lookups_total")
    # Block 8 lacks its state, block 7 too; block 6 has full, window and state.
    assert side(server, stored).get_num_new_matched_tokens(request(stored), 0) == 6 * BLOCK
    assert server.metric_total("pegaflow_lookups_total") == queries + 3


def test_a_missing_window_block_lowers_the_hit_below_it(
    server: ServerHandle, stored: Stored
) -> None:
    stored.save(FULL, list(range(BLOCKS)))
    stored.save(SLIDING, [0, 1, 2, 3, 4, 5, 7], 10)  # block 6 of the window was evicted
    stored.save(STATE, list(range(BLOCKS)), 20)
    s = side(server, stored)
    assert s.get_num_new_matched_tokens(request(stored), 0) == 6 * BLOCK
    # With the local cache holding 5 blocks, one block of each group remains to load.
    assert s.get_num_new_matched_tokens(request(stored), 5 * BLOCK) == 1 * BLOCK


def test_nothing_without_the_full_prefix(server: ServerHandle, stored: Stored) -> None:
    stored.save(SLIDING, list(range(BLOCKS)), 10)
    stored.save(STATE, list(range(BLOCKS)), 20)
    assert side(server, stored).get_num_new_matched_tokens(request(stored), 0) == 0
    assert server.metric("pegaflow_leases") == 0


def allocation(start: int, window: int) -> tuple[list[int], ...]:
    """Block ids vLLM would allocate for a 9-block request: every full-attention block,
    ``window`` blocks of the sliding group before block 8, the state block at 7."""
    full = [100 + p for p in range(9)]
    sliding = [200 + p if p >= 8 - window else 0 for p in range(9)]
    state = [300 + p if p in (7, 8) else 0 for p in range(9)]
    return full, sliding, state


def test_the_load_fills_the_blocks_vllm_kept_per_group(
    server: ServerHandle, stored: Stored
) -> None:
    stored.save_all()
    req = request(stored)
    s = side(server, stored)
    assert s.get_num_new_matched_tokens(req, 0) == 8 * BLOCK
    queries = server.metric_total("pegaflow_lookups_total")
    s.update_state_after_alloc(req, allocation(0, 2), 8 * BLOCK)
    (job,) = s.build_connector_meta(FakeOutput({})).loads
    assert job.lease_id
    assert job.block_ids == [100 + p for p in range(8)] + [206, 207] + [307]
    assert server.metric_total("pegaflow_lookups_total") == queries  # the lookup's lease


def test_a_wider_allocated_window_is_leased_again_exactly(
    server: ServerHandle, stored: Stored
) -> None:
    stored.save_all()
    req = request(stored)
    s = side(server, stored)
    assert s.get_num_new_matched_tokens(req, 0) == 8 * BLOCK
    s.update_state_after_alloc(req, allocation(0, 3), 8 * BLOCK)
    (job,) = s.build_connector_meta(FakeOutput({})).loads
    assert job.lease_id
    assert job.block_ids == [100 + p for p in range(8)] + [205, 206, 207] + [307]
    assert server.metric("pegaflow_leases") == 1  # the lookup's lease was released


def test_an_allocated_block_no_longer_cached_fails_the_load(
    server: ServerHandle, stored: Stored
) -> None:
    stored.save(FULL, list(range(BLOCKS)))
    stored.save(SLIDING, [6, 7], 10)  # block 5 of a 3-block window is not cached
    stored.save(STATE, list(range(BLOCKS)), 20)
    req = request(stored)
    s = side(server, stored)
    assert s.get_num_new_matched_tokens(req, 0) == 8 * BLOCK
    s.update_state_after_alloc(req, allocation(0, 3), 8 * BLOCK)
    (job,) = s.build_connector_meta(FakeOutput({})).loads
    assert job.lease_id == ""  # the workers report these blocks failed: vLLM recomputes
    assert len(job.block_ids) == 12
    assert server.metric("pegaflow_leases") == 0


def test_saves_take_every_window_block_and_the_handed_over_states(
    server: ServerHandle, stored: Stored
) -> None:
    req = FakeRequest("r1", 4 * BLOCK, stored.hashes[:4])
    ids = ([100, 101, 102, 103], [0, 0, 202, 203], [0, 0, 0, 303])
    s = side(server, stored, {"r1": ids})
    s.on_new_request(req)
    handed = SimpleNamespace(boundary_state_offloads={"r1": [(STATE, 303, 4 * BLOCK)]})
    new = SimpleNamespace(block_ids=ids)
    meta = s.build_connector_meta(
        FakeOutput({"r1": 4 * BLOCK}, [new], kv_connector_block_state=handed)
    )
    job = meta.save
    assert job is not None and job.req_ids == ["r1"]
    saved = dict(zip(job.block_hashes, job.block_ids, strict=True))
    assert saved == {
        **{stored.key(FULL, p): 100 + p for p in range(4)},
        stored.key(SLIDING, 2): 202,  # blocks 0 and 1 left the window already
        stored.key(SLIDING, 3): 203,
        stored.key(STATE, 3): 303,  # only the state vLLM handed over
    }
    parents = dict(zip(job.block_hashes, job.parent_hashes, strict=True))
    assert parents[stored.key(FULL, 2)] == stored.key(FULL, 1)
    assert parents[stored.key(SLIDING, 2)] == stored.key(SLIDING, 1)
    assert parents[stored.key(STATE, 3)] == b""
    # Blocks handed out this step are fenced: saves reading them finish first.
    assert meta.fence_block_ids == {100, 101, 102, 103, 202, 203, 303}
    # A handed-over state that is not at a block boundary or not of a state group: none.
    bad = SimpleNamespace(boundary_state_offloads={"r1": [(STATE, 5, 7), (FULL, 6, BLOCK)]})
    assert s.build_connector_meta(FakeOutput({}, kv_connector_block_state=bad)).save is None
    assert s.request_finished(req)  # its saves hold its blocks
