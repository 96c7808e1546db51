"""MLA (a DeepSeek-shaped tiny model) through the connector in a real vLLM CPU engine.

vLLM's CPU build turns prefix caching off for MLA unless the CPU has AMX (its MLA
prefill then cannot start from cached context). These tests turn it back on (a
test-only patch of vLLM's CPU platform), so the engine asks the connector for hits. vLLM's
CPU MLA prefill computes a prefix-hit run differently from a cold run, so outputs are
compared with a prefix-hit run of vLLM's own cache, and the loaded KV bytes with the cold
run's, block by block.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import ServerHandle, require_module
from vllm_helpers import (
    generate,
    loaded_blocks,
    make_llm,
    one_engine_at_a_time,
    prompt_ids,
    record_saves,
    worker_side,
)

require_module("vllm")
torch = require_module("torch")

MLA_BLOCK = 16  # vLLM's CPU MLA kernels support this block size only
PROMPT = prompt_ids(5, 150)
FULL = (len(PROMPT) - 1) // MLA_BLOCK * MLA_BLOCK  # 144 tokens in 9 full blocks
LATENT = 576  # kv_lora_rank 512 + rope 64, one vector per token (no heads, no K/V split)


@pytest.fixture(scope="module")
def mla_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    require_module("transformers")
    from pegaflow.testing import build_tiny_deepseek

    return build_tiny_deepseek(tmp_path_factory.mktemp("tiny-deepseek"))


@pytest.fixture
def mla_engines(mla_model: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """``make(endpoint)``: an in-process MLA engine with prefix caching forced on; one
    lives at a time, all closed at teardown."""
    from vllm.platforms import cpu as cpu_platform

    from pegaflow.testing import cpu_check_keeping_mla_prefix_caching

    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    check = cpu_check_keeping_mla_prefix_caching()
    monkeypatch.setattr(cpu_platform.CpuPlatform, "check_and_update_config", check)
    # Two TP ranks on a 2-core machine: one core each, none held back.
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|1")
    monkeypatch.setenv("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    with one_engine_at_a_time() as start:

        def make(endpoint: str | None, tp: int = 1) -> Any:
            args = {
                "block_size": MLA_BLOCK,
                "enable_prefix_caching": True,
                "tensor_parallel_size": tp,
                # The reference CPU MLA kernels, also on CPUs with AMX (where vLLM would
                # pick its AMX backend, which takes bf16 weights only).
                "attention_backend": "CPU_MLA",
            }
            llm = start(lambda: make_llm(mla_model, endpoint, args))
            assert llm.llm_engine.vllm_config.cache_config.enable_prefix_caching
            return llm

        yield make


def test_a_fresh_mla_engine_loads_the_cold_latent_kv_stored_once(
    server: ServerHandle, mla_engines: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Reference: the same prompt twice in one engine without the connector; the second
    # run starts from vLLM's own prefix cache.
    own = mla_engines(None)
    own_cold, _, _ = generate(own, PROMPT)
    reference, cached, _ = generate(own, PROMPT)
    assert cached == FULL

    saved, order = record_saves(monkeypatch)
    cold = mla_engines(server.endpoint)
    cold_tokens, cached, _ = generate(cold, PROMPT)
    assert (cold_tokens, cached) == (own_cold, 0)
    worker = worker_side()
    assert worker.drain(10.0)
    assert all(t.shape[-1] == LATENT for t in worker.kv_caches.values()), "MLA latent caches"
    # What was saved is what vLLM's layers wrote (their own tensors were moved too).
    assert all(float(t.abs().sum()) > 0 for blocks in saved.values() for t in blocks)
    (info,) = server.client().list_instances()
    assert info["replicated_kv"] is True, "MLA registers one copy for all TP ranks"
    block_bytes = sum(t[0].numel() * t.element_size() for t in worker.kv_caches.values())
    assert server.metric('pegaflow_resident_bytes{tier="ram"}') == len(order) * block_bytes

    loaded = loaded_blocks(monkeypatch)
    warm = mla_engines(server.endpoint)
    tokens, cached, _ = generate(warm, PROMPT)
    assert cached == FULL, "a fresh engine hits every full block from the server"
    assert len(loaded) == FULL // MLA_BLOCK
    for position, blocks in enumerate(loaded):
        for layer, (got, want) in enumerate(zip(blocks, saved[order[position]], strict=True)):
            assert torch.equal(got, want), f"block {position} layer {layer} differs"
    assert tokens == reference, "the same output as a hit from vLLM's own cache"


def test_tp2_mla_ranks_share_one_stored_copy(server: ServerHandle, mla_engines: Any) -> None:
    """Two TP ranks (worker processes) of an MLA model: one copy per block on the server
    (half of what per-rank storage takes), loaded by both ranks of a fresh engine."""
    own = mla_engines(None, tp=2)
    generate(own, PROMPT)
    reference, cached, _ = generate(own, PROMPT)
    assert cached == FULL

    generate(mla_engines(server.endpoint, tp=2), PROMPT)
    blocks = FULL // MLA_BLOCK
    deadline = time.monotonic() + 30
    while server.metric("pegaflow_cache_sealed_blocks") < blocks:
        assert time.monotonic() < deadline, "the cold engine's saves never landed"
        time.sleep(0.1)
    (info,) = server.client().list_instances()
    assert info["replicated_kv"] is True and info["registered_ranks"] == [0, 1]
    one_rank = 2 * MLA_BLOCK * LATENT * 4  # two layers of float32 latent vectors
    resident = server.metric('pegaflow_resident_bytes{tier="ram"}')
    assert resident == blocks * one_rank, "half of what per-rank storage takes"
    assert server.metric("pegaflow_saved_blocks_total") == blocks, "the second rank copied nothing"

    tokens, cached, _ = generate(mla_engines(server.endpoint, tp=2), PROMPT)
    assert cached == FULL, "a fresh TP=2 engine hits every full block from the server"
    assert tokens == reference
    assert server.metric("pegaflow_loaded_blocks_total") == 2 * blocks, "both ranks loaded"
