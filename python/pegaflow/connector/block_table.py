"""Requests' block ids, mirrored from each step's scheduler output, for vLLM versions
that do not bind their KV cache manager to the connector (0.26)."""

from __future__ import annotations

from typing import Any


class BlockTable:
    """``{request: one block-id list per KV cache group}``, kept as vLLM hands blocks
    out: a new request's lists, then each step's new blocks appended (replaced for a
    request resumed after preemption)."""

    def __init__(self) -> None:
        self._blocks: dict[str, list[list[int]]] = {}

    def __call__(self, req_id: str) -> list[list[int]]:
        return self._blocks.get(req_id, [])

    def update(self, scheduler_output: Any) -> None:
        """Takes in the blocks this step allocated."""
        for new in getattr(scheduler_output, "scheduled_new_reqs", None) or ():
            self._blocks[new.req_id] = [list(ids) for ids in new.block_ids or ()]
        cached = getattr(scheduler_output, "scheduled_cached_reqs", None)
        if cached is None:
            return
        resumed = set(getattr(cached, "resumed_req_ids", None) or ())
        for req_id, groups in zip(cached.req_ids, cached.new_block_ids, strict=False):
            if groups is None:
                continue
            if req_id in resumed or req_id not in self._blocks:
                self._blocks[req_id] = [list(ids) for ids in groups]
            else:
                for mine, ids in zip(self._blocks[req_id], groups, strict=False):
                    mine.extend(ids)

    def forget(self, req_id: str) -> None:
        self._blocks.pop(req_id, None)


__all__ = ["BlockTable"]
