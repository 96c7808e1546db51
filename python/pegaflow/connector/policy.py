"""Pure decisions of the connector, testable without vLLM or a server.

Which block hashes a request may look up, how many of its blocks are ready to save,
the cache key of a vLLM block hash, the namespace of a KV layout, the order of
attention layers, and which blocks of each KV cache group a hybrid model's hit needs.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import Enum

HASH_BYTES = 32


def cache_key(block_hash: bytes) -> bytes:
    """The server's 32-byte key of a vLLM block hash.

    vLLM's default ``sha256`` hashes are 32 bytes and used as they are; other hash
    algorithms (other lengths) are condensed with SHA-256, which keeps them distinct.
    """
    raw = bytes(block_hash)
    if len(raw) == HASH_BYTES:
        return raw
    return hashlib.sha256(raw).digest()


def block_keys(block_hashes: Sequence[bytes], blocks_per_hash_block: int) -> list[bytes]:
    """Cache keys of a request's full KV blocks.

    vLLM hashes every ``hash_block_size`` tokens; a KV block of ``block_size`` tokens is
    ``blocks_per_hash_block`` hash blocks, and the hash of its last one covers the whole
    prefix up to the block's end, so it identifies the block.
    """
    if blocks_per_hash_block < 1:
        raise ValueError(f"blocks_per_hash_block must be >= 1, got {blocks_per_hash_block}")
    step = blocks_per_hash_block
    picked = list(block_hashes)[step - 1 :: step]
    if set(map(type, picked)) <= {bytes} and set(map(len, picked)) <= {HASH_BYTES}:
        # vLLM's sha256 hashes are the keys themselves: no per-hash call (a 32K-token
        # prompt has 2,048 of them, looked up while vLLM schedules).
        return picked
    return [cache_key(h) for h in picked]


def max_loadable_blocks(num_tokens: int, block_size: int) -> int:
    """Blocks a request may load: vLLM must compute at least its last token itself, so
    at most ``num_tokens - 1`` tokens come from the cache."""
    return max(0, num_tokens - 1) // block_size


def blocks_full_after_step(
    num_computed_tokens: int, num_scheduled_tokens: int, num_draft_tokens: int, block_size: int
) -> int:
    """Blocks whose every slot holds final KV once this step has run.

    Draft (speculative) tokens may be rejected, so their slots do not count.
    """
    return max(0, num_computed_tokens + num_scheduled_tokens - num_draft_tokens) // block_size


def worth_loading(hit_blocks: int, min_load_blocks: int) -> bool:
    """Whether a hit is large enough to be worth an asynchronous load."""
    return hit_blocks >= max(1, min_load_blocks)


def namespace(factors: Mapping[str, object]) -> str:
    """A short stable name for everything that changes the bytes of a block.

    Two instances with equal factors share blocks; any difference separates them.
    """
    text = json.dumps(factors, sort_keys=True, default=str, separators=(",", ":"))
    return "vllm-" + hashlib.sha256(text.encode()).hexdigest()[:24]


def _natural_key(name: str) -> list[int | str]:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def layer_order(names: Iterable[str]) -> list[str]:
    """Attention layer names in model order (``layers.2`` before ``layers.10``)."""
    return sorted(names, key=_natural_key)


class GroupKind(Enum):
    """What a KV cache group's layers read back from earlier blocks."""

    FULL = "full"
    """Every block of the prefix (full attention, MLA)."""
    SLIDING = "sliding"
    """Only the last ``window_blocks`` blocks before the next token (sliding window)."""
    STATE = "state"
    """Only the recurrent state at the block boundary (Mamba, linear attention)."""


@dataclass(frozen=True)
class CacheGroup:
    """One of vLLM's KV cache groups, as the cache sees it."""

    kind: GroupKind
    window_blocks: int = 0
    """SLIDING: how many blocks before a hit point the next token reads."""

    def __post_init__(self) -> None:
        if self.kind is GroupKind.SLIDING and self.window_blocks < 1:
            raise ValueError(f"a sliding group needs window_blocks >= 1, got {self.window_blocks}")

    def needed(self, local_blocks: int, hit_blocks: int) -> range:
        """Positions of the blocks this group must load for a hit ending at block
        ``hit_blocks`` when the engine already holds the first ``local_blocks``."""
        if hit_blocks <= local_blocks:
            return range(0)
        if self.kind is GroupKind.FULL:
            return range(local_blocks, hit_blocks)
        if self.kind is GroupKind.SLIDING:
            return range(max(local_blocks, hit_blocks - self.window_blocks), hit_blocks)
        return range(hit_blocks - 1, hit_blocks)


FULL_GROUP = CacheGroup(GroupKind.FULL)


def sliding_window_blocks(window_tokens: int, block_size: int, extra_tokens: int = 0) -> int:
    """Blocks a sliding-window group needs before a block-aligned hit point: the next
    token reads the ``window_tokens - 1`` tokens before it plus any ``extra_tokens`` the
    engine retains; like vLLM, at least the window's own block count."""
    if window_tokens < 1 or block_size < 1:
        raise ValueError(f"window {window_tokens} and block size {block_size} must be >= 1")
    reach = window_tokens - 1 + max(0, extra_tokens)
    return max(-(-window_tokens // block_size), -(-reach // block_size))


def hit_plan(
    groups: Sequence[CacheGroup],
    local_blocks: int,
    hit_blocks: int,
    kept: Callable[[int, int], bool] | None = None,
) -> list[tuple[int, int]]:
    """The (group, position) blocks a hybrid hit ending at ``hit_blocks`` loads, in the
    order they are looked up and loaded: positions of the full-attention groups first
    (position by position, so the first miss names the longest full prefix), then each
    windowed group's last blocks and each recurrent group's boundary state. With
    ``kept(group, position)``, the other groups' blocks are those it accepts in the hit
    (the blocks the engine actually allocated) instead of the ones they need."""
    plan: list[tuple[int, int]] = []
    full = [g for g, group in enumerate(groups) if group.kind is GroupKind.FULL]
    for position in range(local_blocks, max(local_blocks, hit_blocks)):
        plan.extend((g, position) for g in full)
    for g, group in enumerate(groups):
        if group.kind is GroupKind.FULL:
            continue
        if kept is None:
            plan.extend((g, position) for position in group.needed(local_blocks, hit_blocks))
        else:
            plan.extend((g, p) for p in range(local_blocks, hit_blocks) if kept(g, p))
    return plan


def group_key(key: bytes, group: int, num_groups: int) -> bytes:
    """The cache key of group ``group``'s block whose (vLLM) key is ``key``: the groups of
    a hybrid model hold different bytes at one position. A one-group model keeps the
    plain key."""
    if num_groups == 1:
        return key
    return hashlib.sha256(b"pegaflow-group" + group.to_bytes(2, "little") + key).digest()


__all__ = [
    "FULL_GROUP",
    "HASH_BYTES",
    "CacheGroup",
    "GroupKind",
    "block_keys",
    "blocks_full_after_step",
    "cache_key",
    "group_key",
    "hit_plan",
    "layer_order",
    "max_loadable_blocks",
    "namespace",
    "sliding_window_blocks",
    "worth_loading",
]
