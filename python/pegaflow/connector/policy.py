"""Pure decisions of the connector, testable without vLLM or a server.

Which block hashes a request may look up, how many of its blocks are ready to save,
the cache key of a vLLM block hash, the namespace of a KV layout, and the order of
attention layers.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Mapping, Sequence

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
    return [cache_key(block_hashes[i]) for i in range(step - 1, len(block_hashes), step)]


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


__all__ = [
    "HASH_BYTES",
    "block_keys",
    "blocks_full_after_step",
    "cache_key",
    "layer_order",
    "max_loadable_blocks",
    "namespace",
    "worth_loading",
]
