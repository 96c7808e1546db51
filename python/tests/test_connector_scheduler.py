"""The connector's scheduler half against a real server, with request objects shaped like
vLLM's (request_id, num_tokens, num_computed_tokens, block_hashes). No vLLM needed."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest
from conftest import KvFactory, ServerHandle
from e2e_helpers import FakeRequest, random_hashes

from pegaflow import EngineClient
from pegaflow.connector.config import ConnectorConfig
from pegaflow.connector.scheduler import SchedulerSide
from pegaflow.errors import PegaflowInternalError

BLOCK = 16


@dataclass
class FakeOutput:
    num_scheduled_tokens: dict[str, int]
    scheduled_spec_decode_tokens: dict[str, list[int]] = field(default_factory=dict)
    preempted_req_ids: set[str] | None = None


@pytest.fixture
def stored(server: ServerHandle, kv_cache: KvFactory, instance_id: str) -> list[bytes]:
    """An instance registered on ``server`` whose first 6 of 10 hashes are stored."""
    kv = kv_cache(num_layers=2, num_blocks=64, block_size=BLOCK)
    client = server.client()
    client.register_kv_layers(instance_id, "ns", 0, 1, kv.layer_specs())
    hashes = random_hashes(10)
    client.save(instance_id, 0, list(range(6)), hashes[:6])
    return hashes


def side(
    server: ServerHandle,
    instance_id: str,
    blocks: dict[str, list[int]] | None = None,
    **cfg: Any,
) -> SchedulerSide:
    config = ConnectorConfig(instance_id=instance_id, endpoint=server.endpoint, **cfg)
    s = SchedulerSide(config, server.client(), BLOCK, BLOCK)
    s.bind_block_ids(lambda req_id: ((blocks or {})[req_id],))
    return s


def test_hit_is_the_stored_prefix_and_memoised(
    server: ServerHandle, stored: list[bytes], instance_id: str
) -> None:
    s = side(server, instance_id)
    req = FakeRequest("r1", num_tokens=10 * BLOCK + 3, block_hashes=stored)
    assert s.get_num_new_matched_tokens(req, 0) == 6 * BLOCK
    queries = server.metric_total("pegaflow_lookups_total")
    # vLLM may ask again (e.g. no free blocks yet): answered from memory, lease kept.
    assert s.get_num_new_matched_tokens(req, 0) == 6 * BLOCK
    assert server.metric_total("pegaflow_lookups_total") == queries
    # A local prefix-cache hit of 2 blocks: only the 4 after it come from us.
    assert s.get_num_new_matched_tokens(req, 2 * BLOCK) == 4 * BLOCK
    assert server.metric_total("pegaflow_lookups_total") == queries + 1


def test_never_more_than_num_tokens_minus_one(
    server: ServerHandle, stored: list[bytes], instance_id: str
) -> None:
    s = side(server, instance_id)
    # Exactly 6 full blocks of prompt: the last token must be computed, so 5 blocks.
    req = FakeRequest("r1", num_tokens=6 * BLOCK, block_hashes=stored[:6])
    assert s.get_num_new_matched_tokens(req, 0) == 5 * BLOCK
    # Local cache already covers everything loadable: no lookup at all.
    req2 = FakeRequest("r2", num_tokens=3 * BLOCK + 1, block_hashes=stored[:3])
    queries = server.metric_total("pegaflow_lookups_total")
    assert s.get_num_new_matched_tokens(req2, 3 * BLOCK) == 0
    assert server.metric_total("pegaflow_lookups_total") == queries


def test_miss_and_min_load_blocks(
    server: ServerHandle, stored: list[bytes], instance_id: str
) -> None:
    s = side(server, instance_id, min_load_blocks=7)
    req = FakeRequest("r1", num_tokens=10 * BLOCK + 1, block_hashes=stored)
    assert s.get_num_new_matched_tokens(req, 0) == 0  # 6 blocks < 7
    other = FakeRequest("r2", num_tokens=5 * BLOCK + 1, block_hashes=random_hashes(5))
    assert side(server, instance_id).get_num_new_matched_tokens(other, 0) == 0


def test_alloc_queues_a_load_into_the_right_blocks(
    server: ServerHandle, stored: list[bytes], instance_id: str
) -> None:
    s = side(server, instance_id, blocks={"r1": list(range(100, 111))})
    req = FakeRequest("r1", num_tokens=10 * BLOCK + 1, block_hashes=stored)
    assert s.get_num_new_matched_tokens(req, 2 * BLOCK) == 4 * BLOCK
    s.update_state_after_alloc(req, [list(range(100, 111))], 4 * BLOCK)
    meta = s.build_connector_meta(FakeOutput(num_scheduled_tokens={}))
    assert len(meta.loads) == 1
    job = meta.loads[0]
    assert (job.req_id, job.block_ids) == ("r1", [102, 103, 104, 105])
    # The lease is live on the server: this rank can load it.
    assert job.lease_id
    # The next step carries no load again.
    assert s.build_connector_meta(FakeOutput(num_scheduled_tokens={})).loads == []


def test_a_load_into_unallocated_blocks_is_refused(
    server: ServerHandle, stored: list[bytes], instance_id: str
) -> None:
    s = side(server, instance_id)
    req = FakeRequest("r1", num_tokens=10 * BLOCK + 1, block_hashes=stored)
    assert s.get_num_new_matched_tokens(req, 0) == 6 * BLOCK
    # vLLM's null block 0, or too few blocks, would be a load into memory it never gave.
    with pytest.raises(RuntimeError, match="no block allocated"):
        s.update_state_after_alloc(req, [[100, 101, 0, 103, 104, 105]], 6 * BLOCK)
    assert s.get_num_new_matched_tokens(req, 0) == 6 * BLOCK
    with pytest.raises(RuntimeError, match="no block allocated"):
        s.update_state_after_alloc(req, [[100, 101]], 6 * BLOCK)
    assert s.get_num_new_matched_tokens(req, 0) == 6 * BLOCK
    with pytest.raises(RuntimeError, match="block-id groups"):
        s.update_state_after_alloc(req, [[100] * 6, [101] * 6], 6 * BLOCK)


def test_a_shorter_load_than_the_hit_uses_a_prefix_of_the_lease(
    server: ServerHandle, stored: list[bytes], instance_id: str
) -> None:
    s = side(server, instance_id)
    req = FakeRequest("r1", num_tokens=10 * BLOCK + 1, block_hashes=stored)
    assert s.get_num_new_matched_tokens(req, 0) == 6 * BLOCK
    queries = server.metric_total("pegaflow_lookups_total")
    s.update_state_after_alloc(req, [list(range(100, 111))], 3 * BLOCK)
    (job,) = s.build_connector_meta(FakeOutput(num_scheduled_tokens={})).loads
    assert job.block_ids == [100, 101, 102]
    assert server.metric_total("pegaflow_lookups_total") == queries  # no second lookup


def test_loaded_blocks_are_not_offered_for_saving_again(
    server: ServerHandle, stored: list[bytes], instance_id: str
) -> None:
    blocks = {"r1": list(range(100, 111)), "r2": list(range(120, 131))}
    s = side(server, instance_id, blocks=blocks)
    req = FakeRequest("r1", num_tokens=10 * BLOCK + 1, block_hashes=stored)
    assert s.get_num_new_matched_tokens(req, 0) == 6 * BLOCK
    s.update_state_after_alloc(req, [blocks["r1"]], 6 * BLOCK)
    s.build_connector_meta(FakeOutput({}))
    req.num_computed_tokens = 6 * BLOCK
    # The rest of the prompt: only blocks 6..9 are new to the cache.
    meta = s.build_connector_meta(FakeOutput({"r1": 4 * BLOCK + 1}))
    assert meta.save is not None
    assert meta.save.block_ids == blocks["r1"][6:10]
    assert meta.save.block_hashes == stored[6:10]
    # A local (vLLM) hit before the loaded blocks was not offered by this request: the
    # whole prefix still is (the server skips what it has).
    req2 = FakeRequest("r2", num_tokens=10 * BLOCK + 1, block_hashes=stored)
    assert s.get_num_new_matched_tokens(req2, 2 * BLOCK) == 4 * BLOCK
    s.update_state_after_alloc(req2, [blocks["r2"]], 4 * BLOCK)
    req2.num_computed_tokens = 6 * BLOCK
    meta = s.build_connector_meta(FakeOutput({"r2": 4 * BLOCK + 1}))
    assert meta.save is not None
    assert meta.save.block_ids == blocks["r2"][:10]


def test_declined_hit_releases_the_lease(
    server: ServerHandle, stored: list[bytes], instance_id: str
) -> None:
    s = side(server, instance_id)
    req = FakeRequest("r1", num_tokens=10 * BLOCK + 1, block_hashes=stored)
    assert s.get_num_new_matched_tokens(req, 0) == 6 * BLOCK
    assert server.metric("pegaflow_leases") == 1
    s.update_state_after_alloc(req, [list(range(11))], 0)
    assert server.metric("pegaflow_leases") == 0


def test_saves_follow_computed_tokens_and_finish_holds_blocks(
    server: ServerHandle, stored: list[bytes], instance_id: str
) -> None:
    blocks = {"r1": list(range(200, 211))}
    s = side(server, instance_id, blocks=blocks)
    req = FakeRequest("r1", num_tokens=10 * BLOCK + 5, block_hashes=stored)
    s.on_new_request(req)
    # Chunked prefill: 40 tokens → 2 full blocks.
    meta = s.build_connector_meta(FakeOutput({"r1": 40}))
    assert meta.save is not None
    assert meta.save.block_ids == [200, 201]
    assert meta.save.block_hashes == stored[:2]
    assert meta.save.req_ids == ["r1"]
    req.num_computed_tokens = 40
    # Next chunk of 100 tokens, 4 of them drafts: 136 → 8 full blocks, 2..7 are new.
    meta = s.build_connector_meta(
        FakeOutput({"r1": 100}, scheduled_spec_decode_tokens={"r1": [1, 2, 3, 4]})
    )
    assert meta.save is not None
    assert meta.save.block_ids == list(range(202, 208))
    req.num_computed_tokens = 136
    # Nothing new becomes full: no save job.
    assert s.build_connector_meta(FakeOutput({"r1": 1})).save is None
    assert s.request_finished(req) is True  # keep blocks until the saves are done
    other = FakeRequest("r2", num_tokens=5, block_hashes=[])
    s.on_new_request(other)
    assert s.request_finished(other) is False


def test_same_block_twice_in_one_step_is_saved_once(
    server: ServerHandle, stored: list[bytes], instance_id: str
) -> None:
    blocks = {"a": [1, 2, 3], "b": [4, 5, 6]}
    s = side(server, instance_id, blocks=blocks)
    for rid in ("a", "b"):
        s.on_new_request(FakeRequest(rid, num_tokens=3 * BLOCK + 1, block_hashes=stored[:3]))
    meta = s.build_connector_meta(FakeOutput({"a": 3 * BLOCK, "b": 3 * BLOCK}))
    assert meta.save is not None
    assert meta.save.block_ids == [1, 2, 3]
    assert meta.save.req_ids == ["a", "b"]


def test_preemption_is_passed_on_and_drops_the_lookup(
    server: ServerHandle, stored: list[bytes], instance_id: str
) -> None:
    s = side(server, instance_id)
    req = FakeRequest("r1", num_tokens=10 * BLOCK + 1, block_hashes=stored)
    assert s.get_num_new_matched_tokens(req, 0) == 6 * BLOCK
    meta = s.build_connector_meta(FakeOutput({}, preempted_req_ids={"r1"}))
    assert meta.preempted_req_ids == {"r1"}
    assert server.metric("pegaflow_leases") == 0


def test_preemption_forgets_earlier_saves(
    server: ServerHandle, stored: list[bytes], instance_id: str
) -> None:
    """The workers settle a preempted request's saves before its blocks are reused, so
    its end must not wait for them (vLLM would free its blocks twice)."""
    s = side(server, instance_id, blocks={"r1": list(range(10))})
    req = FakeRequest("r1", num_tokens=10 * BLOCK + 1, block_hashes=stored)
    s.on_new_request(req)
    assert s.build_connector_meta(FakeOutput({"r1": 2 * BLOCK})).save is not None
    s.build_connector_meta(FakeOutput({}, preempted_req_ids={"r1"}))
    # Resumed and recomputed: its blocks are offered again (a dropped save is redone).
    meta = s.build_connector_meta(FakeOutput({"r1": 2 * BLOCK}))
    assert meta.save is not None and meta.save.block_ids == [0, 1]
    s.build_connector_meta(FakeOutput({}, preempted_req_ids={"r1"}))
    assert s.request_finished(req) is False


def test_old_lookups_are_redone_before_their_lease_ends(
    server: ServerHandle, stored: list[bytes], instance_id: str
) -> None:
    now = [100.0]
    config = ConnectorConfig(instance_id=instance_id, endpoint=server.endpoint, lease_ttl_ms=4000)
    s = SchedulerSide(config, server.client(), BLOCK, BLOCK, clock=lambda: now[0])
    req = FakeRequest("r1", num_tokens=10 * BLOCK + 1, block_hashes=stored)
    assert s.get_num_new_matched_tokens(req, 0) == 6 * BLOCK
    queries = server.metric_total("pegaflow_lookups_total")
    now[0] += 1.9
    assert s.get_num_new_matched_tokens(req, 0) == 6 * BLOCK
    assert server.metric_total("pegaflow_lookups_total") == queries
    now[0] += 0.2  # past half the 4 s lease: ask again, with a fresh lease
    assert s.get_num_new_matched_tokens(req, 0) == 6 * BLOCK
    assert server.metric_total("pegaflow_lookups_total") == queries + 1
    assert server.metric("pegaflow_leases") == 1


def test_rewritten_hashes_are_rekeyed(
    server: ServerHandle, stored: list[bytes], instance_id: str
) -> None:
    """A streaming-input session can drop tokens: vLLM truncates the hash list and
    extends it with different hashes. Blocks whose content changed are saved again."""
    s = side(server, instance_id, blocks={"r1": list(range(20, 30))})
    req = FakeRequest("r1", num_tokens=4 * BLOCK, block_hashes=list(stored[:4]))
    s.on_new_request(req)
    meta = s.build_connector_meta(FakeOutput({"r1": 4 * BLOCK}))
    assert meta.save is not None and meta.save.block_hashes == stored[:4]
    req.num_computed_tokens = 3 * BLOCK
    req.block_hashes = [*stored[:3], stored[8]]  # block 3 now holds other tokens
    meta = s.build_connector_meta(FakeOutput({"r1": BLOCK}))
    assert meta.save is not None
    assert (meta.save.block_ids, meta.save.block_hashes) == ([23], [stored[8]])


def test_roles_gate_loads_and_saves(
    server: ServerHandle, stored: list[bytes], instance_id: str
) -> None:
    config = ConnectorConfig(instance_id=instance_id, endpoint=server.endpoint)
    producer = SchedulerSide(config, server.client(), BLOCK, BLOCK, loads=False)
    producer.bind_block_ids(lambda _: (list(range(10)),))
    req = FakeRequest("r1", num_tokens=10 * BLOCK + 1, block_hashes=stored)
    queries = server.metric_total("pegaflow_lookups_total")
    assert producer.get_num_new_matched_tokens(req, 0) == 0
    assert server.metric_total("pegaflow_lookups_total") == queries
    assert producer.build_connector_meta(FakeOutput({"r1": 3 * BLOCK})).save is not None
    consumer = SchedulerSide(config, server.client(), BLOCK, BLOCK, saves=False)
    consumer.bind_block_ids(lambda _: (list(range(10)),))
    consumer.on_new_request(req)
    assert consumer.build_connector_meta(FakeOutput({"r1": 3 * BLOCK})).save is None


class FailingClient:
    """A server that answers every call with an internal error."""

    calls = 0

    def query(self, instance_id: str, block_hashes: Sequence[bytes], lease_ttl_ms: int = 0) -> Any:
        self.calls += 1
        raise PegaflowInternalError("boom")

    def release_lease(self, lease_id: str) -> None:
        self.calls += 1
        raise PegaflowInternalError("boom")


def test_any_server_error_is_a_miss_with_backoff(instance_id: str) -> None:
    now = [0.0]
    config = ConnectorConfig(instance_id=instance_id, retry_interval_s=1.0)
    client = FailingClient()
    s = SchedulerSide(config, client, BLOCK, BLOCK, clock=lambda: now[0])
    for i in range(3):
        req = FakeRequest(f"r{i}", num_tokens=3 * BLOCK + 1, block_hashes=random_hashes(3))
        assert s.get_num_new_matched_tokens(req, 0) == 0
    assert client.calls == 1  # then quiet for 1 s
    now[0] += 1.1
    assert s.get_num_new_matched_tokens(FakeRequest("x", 3 * BLOCK + 1, random_hashes(3)), 0) == 0
    assert client.calls == 2
    now[0] += 1.1  # the pause doubled to 2 s
    assert s.get_num_new_matched_tokens(FakeRequest("y", 3 * BLOCK + 1, random_hashes(3)), 0) == 0
    assert client.calls == 2


def test_unreachable_server_is_a_miss_then_quiet(instance_id: str) -> None:
    from conftest import free_port

    config = ConnectorConfig(
        instance_id=instance_id,
        endpoint=f"127.0.0.1:{free_port()}",
        query_timeout_s=0.5,
        retry_interval_s=30.0,
    )
    s = SchedulerSide(config, EngineClient(config.endpoint, 0.5), BLOCK, BLOCK)
    req = FakeRequest("r1", num_tokens=10 * BLOCK + 1, block_hashes=random_hashes(10))
    start = time.monotonic()
    assert s.get_num_new_matched_tokens(req, 0) == 0
    # Within the quiet period no more calls are made: other requests cost nothing.
    for i in range(50):
        other = FakeRequest(f"x{i}", num_tokens=10 * BLOCK + 1, block_hashes=random_hashes(10))
        assert s.get_num_new_matched_tokens(other, 0) == 0
    assert time.monotonic() - start < 2.0


def test_unregistered_instance_is_a_miss(server: ServerHandle) -> None:
    s = side(server, "nobody")
    req = FakeRequest("r1", num_tokens=10 * BLOCK + 1, block_hashes=random_hashes(10))
    assert s.get_num_new_matched_tokens(req, 0) == 0
