"""vLLM's KV cache groups → what the cache needs of each (:class:`~.policy.CacheGroup`).

Without vLLM's hybrid manager a model has one group; with it (the connector declares
``SupportsHMA``) every kind of layer gets its own groups: full attention (and MLA) reads
every earlier block, a sliding window only the last few, a recurrent layer (Mamba,
linear attention) only the state at a block boundary. A group the cache cannot serve
raises :class:`UnsupportedModel` with the reason.
"""

from __future__ import annotations

from typing import Any

from pegaflow.connector import policy
from pegaflow.connector.policy import CacheGroup, GroupKind

_FULL_SPECS = ("FullAttentionSpec", "MLAAttentionSpec")
_SLIDING_SPECS = ("SlidingWindowSpec", "SlidingWindowMLASpec")


class UnsupportedModel(ValueError):
    """The model's KV cache has something the connector cannot store and restore."""


def cache_group(spec: Any, block_size: int) -> CacheGroup:
    """What the cache needs of a group with vLLM KV cache spec ``spec``."""
    name = type(spec).__name__
    if name == "UniformTypeKVCacheSpecs":
        inner = {type(s).__name__ for s in spec.kv_cache_specs.values()}
        if inner <= set(_FULL_SPECS):
            return policy.FULL_GROUP
        raise UnsupportedModel(f"a KV cache group of mixed layer kinds {sorted(inner)}")
    if name in _FULL_SPECS:
        return policy.FULL_GROUP
    if name in _SLIDING_SPECS:
        window = int(spec.sliding_window)
        extra = int(getattr(spec, "extra_retained_tokens", 0) or 0)
        return CacheGroup(
            GroupKind.SLIDING, policy.sliding_window_blocks(window, block_size, extra)
        )
    if name == "MambaSpec":
        mode = getattr(spec, "mamba_cache_mode", None)
        if mode != "align":
            raise UnsupportedModel(
                f"recurrent (Mamba/linear attention) layers with mamba_cache_mode={mode!r}: "
                "only 'align' keeps the per-block states the cache stores"
            )
        return CacheGroup(GroupKind.STATE)
    raise UnsupportedModel(f"KV cache spec {name} (not full, sliding-window or recurrent)")


def cache_groups(kv_cache_config: Any) -> tuple[list[CacheGroup], int]:
    """The groups of ``kv_cache_config`` and their common block size (tokens)."""
    specs = [g.kv_cache_spec for g in kv_cache_config.kv_cache_groups]
    if not specs:
        raise UnsupportedModel("the model has no KV cache groups")
    sizes = {int(s.block_size) for s in specs}
    if len(sizes) != 1:
        raise UnsupportedModel(f"KV cache groups of different block sizes {sorted(sizes)}")
    block_size = sizes.pop()
    return [cache_group(s, block_size) for s in specs], block_size


def groups_factor(
    kv_cache_config: Any, groups: list[CacheGroup], *, layers: bool = True
) -> list[dict[str, object]]:
    """What a hybrid model's groups mean, for its namespace: the keys of group ``i``
    hold the bytes of these layers (``layers=False``: only the groups' kinds, for
    pipeline stages, which each see their own layers)."""
    factor: list[dict[str, object]] = []
    for group, spec_group in zip(groups, kv_cache_config.kv_cache_groups, strict=True):
        entry: dict[str, object] = {"kind": group.kind.value, "window_blocks": group.window_blocks}
        if layers:
            entry["layers"] = list(spec_group.layer_names)
        factor.append(entry)
    return factor


__all__ = ["UnsupportedModel", "cache_group", "cache_groups", "groups_factor"]
