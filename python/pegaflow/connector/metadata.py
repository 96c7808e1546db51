"""What crosses from the scheduler process to the workers each step, and nothing else.

vLLM pickles the metadata object into every worker (all TP ranks get the same one), so
these are plain dataclasses of ids, hashes and lists.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class LoadJob:
    """Copy the leased cached blocks of one request into its allocated blocks.

    ``block_ids[i]`` receives the lease's i-th block. The lease was taken by the
    scheduler's query; each rank loads its own part. An empty ``lease_id``: the cached
    blocks were lost before the load could be queued; the workers report ``block_ids``
    as failed loads, and vLLM recomputes them.
    """

    req_id: str
    lease_id: str
    block_ids: list[int]


@dataclass(frozen=True)
class SaveJob:
    """Save blocks that became full in this step: ``block_ids[i]`` holds the block whose
    hash is ``block_hashes[i]``. ``req_ids`` are the requests these blocks belong to:
    their blocks must stay allocated until the save is done. ``parent_hashes[i]`` is the
    block before block ``i`` in its request's prefix chain (``b""`` for the first); the
    server's eviction keeps chains whole with it. Empty when unknown."""

    block_ids: list[int]
    block_hashes: list[bytes]
    req_ids: list[str]
    parent_hashes: list[bytes] = field(default_factory=list)


@dataclass
class PegaConnectorMetadata:
    """One scheduler step's work for the workers."""

    loads: list[LoadJob] = field(default_factory=list)
    save: SaveJob | None = None
    preempted_req_ids: set[str] = field(default_factory=set)
    fence_block_ids: set[int] = field(default_factory=set)
    """Blocks this step hands out or overwrites (hybrid models only): saves still reading
    any of them finish before the step runs."""

    def is_empty(self) -> bool:
        return (
            not self.loads
            and self.save is None
            and not self.preempted_req_ids
            and not self.fence_block_ids
        )


__all__ = ["LoadJob", "PegaConnectorMetadata", "SaveJob"]
