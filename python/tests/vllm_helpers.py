"""Helpers of the tests that run a real vLLM (CPU build): engines with and without the
connector (on :func:`pegaflow.testing.build_tiny_llama`), and access to the in-process
connector halves."""

from __future__ import annotations

import gc
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from pegaflow.testing import TINY_BLOCK_SIZE as BLOCK_SIZE
from pegaflow.testing import TINY_VOCAB as VOCAB

MAX_TOKENS = 8


def prompt_ids(seed: int, length: int) -> list[int]:
    """A deterministic prompt of ``length`` token ids (never the special ids 0..2)."""
    return [(seed * 7919 + i * 104729) % (VOCAB - 3) + 3 for i in range(length)]


def connector_config(endpoint: str, **extra: Any) -> Any:
    from vllm.config import KVTransferConfig

    return KVTransferConfig(
        kv_connector="PegaKVConnector",
        kv_role="kv_both",
        kv_connector_module_path="pegaflow.connector",
        kv_connector_extra_config={"endpoint": endpoint, "retry_interval_s": 0.2, **extra},
    )


def make_llm(
    model: Path, endpoint: str | None, engine_args: dict[str, Any] | None = None, **extra: Any
) -> Any:
    """An in-process vLLM engine on the CPU (with the connector if ``endpoint``);
    ``engine_args`` override the engine defaults below."""
    from vllm import LLM

    kwargs: dict[str, Any] = {
        "enforce_eager": True,
        "block_size": BLOCK_SIZE,
        "max_model_len": 1024,
        "dtype": "float32",
        "kv_cache_memory_bytes": 32 << 20,
        "seed": 0,
        **(engine_args or {}),
    }
    if endpoint is not None:
        kwargs["kv_transfer_config"] = connector_config(endpoint, **extra)
    return LLM(model=str(model), **kwargs)


def close_llm(llm: Any) -> None:
    llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()


@contextmanager
def one_engine_at_a_time() -> Iterator[Callable[[Callable[[], Any]], Any]]:
    """``start(build)``: closes the engine started before (two never live together in one
    process), then returns ``build()``; the last one is closed on exit."""
    live: list[Any] = []

    def start(build: Callable[[], Any]) -> Any:
        while live:
            close_llm(live.pop())
        live.append(build())
        return live[-1]

    try:
        yield start
    finally:
        while live:
            close_llm(live.pop())


def generate(llm: Any, tokens: list[int]) -> tuple[list[int], int, float]:
    """Greedy decode of ``MAX_TOKENS`` tokens: (token ids, cached prompt tokens, seconds)."""
    from vllm import SamplingParams

    start = time.monotonic()
    out = llm.generate(
        {"prompt_token_ids": tokens},
        SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True),
        use_tqdm=False,
    )[0]
    return list(out.outputs[0].token_ids), int(out.num_cached_tokens or 0), time.monotonic() - start


def full_blocks(num_tokens: int) -> int:
    """Tokens the cache may supply for a prompt of ``num_tokens`` (whole blocks, never
    the last token)."""
    return (num_tokens - 1) // BLOCK_SIZE * BLOCK_SIZE


def worker_side() -> Any:
    """The worker half of the connector of the (single) in-process engine."""
    from vllm.distributed.kv_transfer import get_kv_transfer_group

    worker = get_kv_transfer_group()._worker
    assert worker is not None, "the connector's worker half is disabled"
    return worker


def on_finished_loads(monkeypatch: pytest.MonkeyPatch, hook: Callable[[Any, Any], None]) -> None:
    """Calls ``hook(worker, job)`` for every load job as the worker reports it finished,
    before vLLM sees that report (so the blocks hold exactly what was loaded)."""
    from pegaflow.connector.worker import WorkerSide

    jobs: list[Any] = []
    original_load, original_finished = WorkerSide.start_load_kv, WorkerSide.get_finished

    def record_load(self: Any, meta: Any) -> None:
        jobs.extend(meta.loads)
        original_load(self, meta)

    def finished(self: Any, done: set[str]) -> tuple[set[str], set[str]]:
        sending, recving = original_finished(self, done)
        for job in jobs:
            if job.req_id in recving:
                hook(self, job)
        return sending, recving

    monkeypatch.setattr(WorkerSide, "start_load_kv", record_load)
    monkeypatch.setattr(WorkerSide, "get_finished", finished)


def record_saves(monkeypatch: pytest.MonkeyPatch) -> tuple[dict[bytes, list[Any]], list[bytes]]:
    """Records every block the worker saves: ({hash: its per-layer KV, cloned at save},
    hashes in save order)."""
    from pegaflow.connector.worker import WorkerSide

    saved: dict[bytes, list[Any]] = {}
    order: list[bytes] = []
    original_save = WorkerSide.wait_for_save

    def record_save(self: Any, meta: Any) -> None:
        original_save(self, meta)
        if meta.save is not None:
            for block_id, key in zip(meta.save.block_ids, meta.save.block_hashes, strict=True):
                saved[key] = [t[block_id].clone() for t in self.kv_caches.values()]
                order.append(key)

    monkeypatch.setattr(WorkerSide, "wait_for_save", record_save)
    return saved, order


def loaded_blocks(monkeypatch: pytest.MonkeyPatch) -> list[list[Any]]:
    """Records the per-layer KV of every block the worker loads, as loaded, in order."""
    loaded: list[list[Any]] = []

    def snapshot(worker: Any, job: Any) -> None:
        loaded.extend([t[b].clone() for t in worker.kv_caches.values()] for b in job.block_ids)

    on_finished_loads(monkeypatch, snapshot)
    return loaded
