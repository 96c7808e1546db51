"""Pure decisions of the vLLM connector (no vLLM, no server)."""

from __future__ import annotations

import hashlib
from typing import Any

import pytest

from pegaflow.connector import policy


def test_cache_key_keeps_sha256_hashes_and_condenses_others() -> None:
    h32 = bytes(range(32))
    assert policy.cache_key(h32) == h32
    short = b"\x01" * 16
    assert policy.cache_key(short) == hashlib.sha256(short).digest()
    assert policy.cache_key(b"\x01" * 16) != policy.cache_key(b"\x02" * 16)
    assert len(policy.cache_key(b"")) == 32


def test_block_keys_take_the_last_hash_of_each_kv_block() -> None:
    hashes = [bytes([i]) * 32 for i in range(7)]
    assert policy.block_keys(hashes, 1) == hashes
    # 2 hash blocks per KV block: blocks end at hashes 1, 3, 5; hash 6 is a partial block.
    assert policy.block_keys(hashes, 2) == [hashes[1], hashes[3], hashes[5]]
    assert policy.block_keys(hashes[:1], 2) == []
    with pytest.raises(ValueError, match="blocks_per_hash_block"):
        policy.block_keys(hashes, 0)


def test_block_keys_condense_any_hash_that_is_not_32_bytes() -> None:
    class Digest(bytes):
        """A bytes subclass, as some hash functions return."""

    plain = [bytes([i]) * 32 for i in range(4)]
    mixed: list[Any] = [plain[0], b"\x07" * 8, Digest(plain[2]), bytearray(plain[3])]
    assert policy.block_keys(mixed, 1) == [
        plain[0],
        hashlib.sha256(b"\x07" * 8).digest(),
        plain[2],
        plain[3],
    ]
    assert all(type(k) is bytes for k in policy.block_keys(mixed, 1))
    # A tuple (any sequence) of sha256 hashes: the keys are the hashes themselves.
    assert policy.block_keys(tuple(plain), 2) == [plain[1], plain[3]]


@pytest.mark.parametrize(
    ("num_tokens", "block_size", "expected"),
    [(0, 16, 0), (1, 16, 0), (16, 16, 0), (17, 16, 1), (33, 16, 2), (64, 16, 3), (65, 16, 4)],
)
def test_max_loadable_blocks_leaves_the_last_token_to_compute(
    num_tokens: int, block_size: int, expected: int
) -> None:
    assert policy.max_loadable_blocks(num_tokens, block_size) == expected


def test_blocks_full_after_step_ignores_draft_tokens() -> None:
    assert policy.blocks_full_after_step(0, 100, 0, 32) == 3
    assert policy.blocks_full_after_step(95, 1, 0, 32) == 3
    assert policy.blocks_full_after_step(95, 2, 0, 32) == 3  # 97 tokens
    assert policy.blocks_full_after_step(90, 6, 0, 32) == 3  # exactly 96
    assert policy.blocks_full_after_step(90, 6, 2, 32) == 2  # drafts may be rejected
    assert policy.blocks_full_after_step(0, 1, 3, 32) == 0


def test_worth_loading() -> None:
    assert not policy.worth_loading(0, 1)
    assert policy.worth_loading(1, 1)
    assert not policy.worth_loading(2, 3)
    assert policy.worth_loading(1, 0)  # at least one block, whatever the setting


def test_namespace_is_stable_and_separates_any_difference() -> None:
    base = {"model": "m", "dtype": "float16", "layers": [{"shape": [2, 16, 128]}]}
    assert policy.namespace(base) == policy.namespace(dict(reversed(list(base.items()))))
    assert policy.namespace(base).startswith("vllm-")
    assert policy.namespace(base) != policy.namespace({**base, "dtype": "bfloat16"})
    assert policy.namespace(base) != policy.namespace({**base, "layers": [{"shape": [2, 16, 64]}]})


def test_layer_order_is_numeric() -> None:
    names = ["model.layers.10.attn", "model.layers.2.attn", "model.layers.1.attn"]
    assert policy.layer_order(names) == [
        "model.layers.1.attn",
        "model.layers.2.attn",
        "model.layers.10.attn",
    ]


def test_each_group_kind_needs_its_own_blocks_of_a_hit() -> None:
    full = policy.FULL_GROUP
    sliding = policy.CacheGroup(policy.GroupKind.SLIDING, window_blocks=2)
    state = policy.CacheGroup(policy.GroupKind.STATE)
    # Engine holds blocks [0, 1); a hit reaches block 5.
    assert list(full.needed(1, 5)) == [1, 2, 3, 4]
    assert list(sliding.needed(1, 5)) == [3, 4]
    assert list(sliding.needed(4, 5)) == [4]  # the engine holds the rest of the window
    assert list(state.needed(1, 5)) == [4]  # the state at the hit point only
    for group in (full, sliding, state):
        assert list(group.needed(3, 3)) == []
    with pytest.raises(ValueError, match="window_blocks"):
        policy.CacheGroup(policy.GroupKind.SLIDING)


def test_hit_plan_puts_full_prefixes_first_position_by_position() -> None:
    groups = [
        policy.FULL_GROUP,
        policy.CacheGroup(policy.GroupKind.SLIDING, 2),
        policy.FULL_GROUP,
        policy.CacheGroup(policy.GroupKind.STATE),
    ]
    assert policy.hit_plan(groups, 1, 4) == [
        (0, 1), (2, 1), (0, 2), (2, 2), (0, 3), (2, 3),  # full groups, position-major
        (1, 2), (1, 3),  # the window before block 4
        (3, 3),  # the recurrent state at block 4
    ]  # fmt: skip
    assert policy.hit_plan(groups, 4, 4) == []
    # The blocks an engine kept instead of the ones needed: same order.
    kept = {(1, 1), (1, 3), (3, 2)}
    assert policy.hit_plan(groups, 1, 4, kept=lambda g, p: (g, p) in kept) == [
        (0, 1), (2, 1), (0, 2), (2, 2), (0, 3), (2, 3),
        (1, 1), (1, 3),
        (3, 2),
    ]  # fmt: skip
    assert policy.hit_plan([policy.FULL_GROUP], 0, 3) == [(0, 0), (0, 1), (0, 2)]


def test_sliding_window_blocks_cover_what_the_next_token_reads() -> None:
    assert policy.sliding_window_blocks(64, 32) == 2  # reads 63 earlier tokens
    assert policy.sliding_window_blocks(65, 32) == 3
    assert policy.sliding_window_blocks(4096, 16) == 256
    assert policy.sliding_window_blocks(64, 32, extra_tokens=32) == 3
    assert policy.sliding_window_blocks(1, 16) == 1
    with pytest.raises(ValueError):
        policy.sliding_window_blocks(0, 16)


def test_group_keys_differ_per_group_and_one_group_keeps_the_plain_key() -> None:
    key = bytes(range(32))
    assert policy.group_key(key, 0, 1) == key
    keys = {policy.group_key(key, g, 3) for g in range(3)}
    assert len(keys) == 3 and key not in keys
    assert all(len(k) == 32 for k in keys)
    assert policy.group_key(key, 1, 3) == policy.group_key(key, 1, 3)
