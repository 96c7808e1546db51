"""Helpers of the tests that run a real vLLM (CPU build): engines with and without the
connector (on :func:`pegaflow.testing.build_tiny_llama`), and access to the in-process
connector halves."""

from __future__ import annotations

import gc
import time
from pathlib import Path
from typing import Any

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
