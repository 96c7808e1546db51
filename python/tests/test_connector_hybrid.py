"""Hybrid models through vLLM's hybrid KV cache manager (the connector declares
``SupportsHMA``), in real vLLM CPU engines with tiny random models: Gemma-3 and gpt-oss
(sliding-window + full attention groups), Qwen3-Next (gated-delta-net linear attention
+ full attention) and Granite-4.0-H (Mamba2 + attention): recurrent states.

Each model: a reference engine without the connector, a cold engine that saves, then a
fresh engine that must give the reference's tokens for the same prompt and for a third
prompt sharing a prefix, with ``num_cached_tokens`` the prefix vLLM can reuse. Both hits
come from the server: the fresh engine's own cache holds, after the first prompt, only
the last blocks of each sliding window and the last recurrent state, none of which is
at the shared prefix's end.
"""

from __future__ import annotations

import signal
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from conftest import ServerHandle, require_module
from vllm_helpers import (
    close_llm,
    generate,
    make_llm,
    on_finished_loads,
    one_engine_at_a_time,
    prompt_ids,
    worker_side,
)

from pegaflow.connector.metadata import LoadJob, PegaConnectorMetadata
from pegaflow.connector.worker import WorkerSide

require_module("vllm")
require_module("transformers")
torch = require_module("torch")


@dataclass(frozen=True)
class Family:
    builder: str
    prompt_len: int
    shared_len: int
    engine_args: dict[str, Any]


SLIDING_ARGS = {"dtype": "float32", "block_size": 32, "enable_prefix_caching": True}
FAMILIES = {
    "gemma3": Family("build_tiny_gemma3", 300, 200, SLIDING_ARGS),
    "gpt-oss": Family("build_tiny_gpt_oss", 300, 200, {**SLIDING_ARGS, "dtype": "bfloat16"}),
    # Recurrent states exist only where a prefill step ends: chunks of one block, each
    # state kept (retention None), so a later prompt can resume at any block boundary.
    # (One-block chunks also keep vLLM's CPU Mamba2 kernel within what it supports.)
    "granite-4.0-h": Family(
        "build_tiny_granite_hybrid",
        300,
        200,
        {
            "dtype": "float32",
            "enable_prefix_caching": True,
            "max_num_batched_tokens": 96,
            "prefix_cache_retention_interval": None,
        },
    ),
    "qwen3-next": Family(
        "build_tiny_qwen3_next",
        1700,
        1133,
        {
            "dtype": "bfloat16",
            "enable_prefix_caching": True,
            "max_model_len": 4096,
            "max_num_batched_tokens": 544,
            "prefix_cache_retention_interval": None,
            "kv_cache_memory_bytes": 64 << 20,
        },
    ),
}


def full_blocks(tokens: int, block: int) -> int:
    return (tokens - 1) // block * block


@dataclass
class Setup:
    family: Family
    block: int
    """vLLM's block size for the model, read from the engine: for a recurrent state it
    raises the one asked for until a block's pages fit the state, by rules that change
    between releases of vLLM and its dependencies (Qwen3-Next got 544 with vLLM 0.32.0
    on 2026-12-01 and 288 with the same vLLM and newer packages a day later)."""
    model: Path
    prompt: list[int]
    shared: list[int]
    reference: dict[str, list[int]]


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def setup(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Setup:
    import pegaflow.testing

    family = FAMILIES[request.param]
    model = getattr(pegaflow.testing, family.builder)(tmp_path_factory.mktemp(request.param))
    prompt = prompt_ids(11, family.prompt_len)
    shared = prompt[: family.shared_len] + prompt_ids(12, family.prompt_len - family.shared_len)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        llm = make_llm(model, None, family.engine_args)
        try:
            block = int(llm.llm_engine.vllm_config.cache_config.block_size)
            reference = {"prompt": generate(llm, prompt)[0]}
            reference["shared"] = generate(llm, shared)[0]
        finally:
            close_llm(llm)
    return Setup(family, block, model, prompt, shared, reference)


Engines = Callable[[str | None], Any]


@pytest.fixture
def engines(setup: Setup, monkeypatch: pytest.MonkeyPatch) -> Iterator[Engines]:
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    with one_engine_at_a_time() as start:
        yield lambda endpoint: start(
            lambda: make_llm(setup.model, endpoint, setup.family.engine_args)
        )


def drain_saves() -> None:
    assert worker_side().drain(20.0), "saves still running after 20 s"


def test_fresh_engine_and_shared_prefix_hit_with_reference_outputs(
    server: ServerHandle, engines: Engines, setup: Setup
) -> None:
    block = setup.block
    cold = engines(server.endpoint)
    groups = cold.llm_engine.vllm_config.scheduler_config.disable_hybrid_kv_cache_manager
    assert not groups, "vLLM turned its hybrid KV cache manager off"
    assert generate(cold, setup.prompt)[:2] == (setup.reference["prompt"], 0)
    drain_saves()

    warm = engines(server.endpoint)
    tokens, cached, _ = generate(warm, setup.prompt)
    assert (tokens, cached) == (setup.reference["prompt"], full_blocks(len(setup.prompt), block))
    tokens, cached, _ = generate(warm, setup.shared)
    assert tokens == setup.reference["shared"]
    assert cached == setup.family.shared_len // block * block
    stats = worker_side().stats()
    assert (stats["loads_ok"], stats["loads_failed"]) == (2, 0)


def test_loaded_states_and_windows_are_what_the_engine_computes_from(
    server: ServerHandle, engines: Engines, setup: Setup, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Proves the comparison above can fail: the last three loaded blocks (the last of
    the sliding windows; Qwen3-Next: the recurrent states) are overwritten with noise."""
    generate(engines(server.endpoint), setup.prompt)
    drain_saves()
    generator = torch.Generator().manual_seed(3)

    def corrupt(worker: WorkerSide, job: LoadJob) -> None:
        for t in worker.kv_caches.values():
            for b in job.block_ids[-3:]:
                view = t[b].view(torch.int8) if t.dtype != torch.int8 else t[b]
                view.copy_(torch.randint(-100, 100, view.shape, generator=generator))

    on_finished_loads(monkeypatch, corrupt)
    tokens, cached, _ = generate(engines(server.endpoint), setup.prompt)
    assert cached == full_blocks(len(setup.prompt), setup.block)
    assert tokens != setup.reference["prompt"]


@pytest.fixture(scope="module")
def gemma(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from pegaflow.testing import build_tiny_gemma3

    return build_tiny_gemma3(tmp_path_factory.mktemp("gemma3-faults"))


def gemma_run(model: Path, endpoint: str | None, args: dict[str, Any], prompts: Any) -> Any:
    from vllm import SamplingParams

    llm = make_llm(model, endpoint, {**SLIDING_ARGS, **args})
    try:
        params = SamplingParams(max_tokens=150, temperature=0.0, ignore_eos=True)
        outs = llm.generate(prompts, params, use_tqdm=False)
        if endpoint is not None:
            drain_saves()
            stats = worker_side().stats()
        else:
            stats = {}
        tokens = [list(o.outputs[0].token_ids) for o in outs]
        return tokens, [o.num_cached_tokens for o in outs], stats
    finally:
        close_llm(llm)


def test_hybrid_preemption_under_memory_pressure_keeps_outputs_exact(
    server: ServerHandle, gemma: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Six requests that outgrow a 40-block KV cache shared by Gemma-3's four groups:
    vLLM preempts some while their saves (and sliding blocks freed mid-request) may be
    in flight. Outputs stay vLLM's own, and a fresh engine loads every prompt's prefix."""
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    small = {"max_model_len": 288, "kv_cache_memory_bytes": 40 * 16384}
    prompts = [{"prompt_token_ids": prompt_ids(20 + i, 120)} for i in range(6)]
    preempted: list[str] = []
    original = WorkerSide.handle_preemptions

    def count(self: WorkerSide, meta: PegaConnectorMetadata) -> None:
        preempted.extend(meta.preempted_req_ids)
        original(self, meta)

    monkeypatch.setattr(WorkerSide, "handle_preemptions", count)
    reference, _, _ = gemma_run(gemma, None, small, prompts)
    cold, cached, _ = gemma_run(gemma, server.endpoint, small, prompts)
    assert preempted, "the scenario no longer preempts: shrink the cache"
    assert (cold, cached) == (reference, [0] * 6)
    warm, cached, stats = gemma_run(gemma, server.endpoint, small, prompts)
    assert warm == reference
    assert cached == [96] * 6
    assert stats["loads_failed"] == 0


def test_hybrid_server_killed_between_lookup_and_load_is_recomputed(
    server: ServerHandle, gemma: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    prompt = [{"prompt_token_ids": prompt_ids(30, 300)}]
    reference, _, _ = gemma_run(gemma, None, {}, prompt)
    gemma_run(gemma, server.endpoint, {}, prompt)
    original_load = WorkerSide.start_load_kv

    def kill_then_load(self: WorkerSide, meta: PegaConnectorMetadata) -> None:
        if meta.loads and server.is_running():
            server.stop(signal.SIGKILL)
        original_load(self, meta)

    monkeypatch.setattr(WorkerSide, "start_load_kv", kill_then_load)
    tokens, _, stats = gemma_run(gemma, server.endpoint, {}, prompt)
    assert not server.is_running()
    assert tokens == reference
    assert (stats["loads_ok"], stats["loads_failed"]) == (0, 1)
