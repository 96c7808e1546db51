"""PegaKVConnector inside a real vLLM (CPU build), in-process engines.

Every scenario compares with a reference engine without the connector, and "warm" runs
use a fresh engine, so hits can only come from the server (never vLLM's own prefix
cache).
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import ServerHandle, StartServer, free_port, require_module
from vllm_helpers import (
    close_llm,
    full_blocks,
    generate,
    loaded_blocks,
    make_llm,
    on_finished_loads,
    one_engine_at_a_time,
    prompt_ids,
    record_saves,
    worker_side,
)

from pegaflow.connector.metadata import LoadJob, PegaConnectorMetadata
from pegaflow.connector.worker import WorkerSide
from pegaflow.testing import TINY_BLOCK_SIZE as BLOCK_SIZE

require_module("vllm")
torch = require_module("torch")

PROMPT = prompt_ids(1, 200)  # 6 full blocks of 32 tokens can come from the cache
SHARED = PROMPT[:128] + prompt_ids(2, 100)  # shares exactly 4 full blocks with PROMPT
OTHER = prompt_ids(3, 170)
LATER = prompt_ids(4, 230)
PROMPTS = {"prompt": PROMPT, "shared": SHARED, "other": OTHER, "later": LATER}
RECOMPUTE_BOUND_S = 20.0

Engines = Callable[..., Any]


@pytest.fixture(scope="module")
def reference(tiny_model: Path) -> dict[str, list[int]]:
    """Greedy tokens of every prompt from an engine without the connector."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        llm = make_llm(tiny_model, None)
        try:
            return {name: generate(llm, tokens)[0] for name, tokens in PROMPTS.items()}
        finally:
            close_llm(llm)


@pytest.fixture
def engines(tiny_model: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Engines]:
    """``engines(endpoint, **extra)``: an in-process engine with the connector; only one
    lives at a time (the previous one is closed first), all closed at teardown."""
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    with one_engine_at_a_time() as start:

        def make(
            endpoint: str | None, engine_args: dict[str, Any] | None = None, **extra: Any
        ) -> Any:
            return start(lambda: make_llm(tiny_model, endpoint, engine_args, **extra))

        yield make


def drain_saves() -> None:
    assert worker_side().drain(10.0), "saves still running after 10 s"


def test_warm_engine_loads_the_cold_kv_byte_for_byte(
    server: ServerHandle,
    engines: Engines,
    reference: dict[str, list[int]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    saved, save_order = record_saves(monkeypatch)
    cold = engines(server.endpoint)
    tokens, cached, _ = generate(cold, PROMPT)
    assert tokens == reference["prompt"]
    assert cached == 0
    drain_saves()
    assert len(save_order) >= full_blocks(len(PROMPT)) // 32

    loaded = loaded_blocks(monkeypatch)
    warm = engines(server.endpoint)
    tokens, cached, _ = generate(warm, PROMPT)
    assert cached == full_blocks(len(PROMPT)) == 192
    assert tokens == reference["prompt"]
    assert worker_side().stats()["loads_ok"] == 1
    # The loaded blocks hold exactly the cold engine's KV, block by block and in order
    # (output equality alone would not notice two swapped blocks).
    assert len(loaded) == 6
    for position, blocks in enumerate(loaded):
        expected = saved[save_order[position]]
        for layer, (got, want) in enumerate(zip(blocks, expected, strict=True)):
            assert torch.equal(got, want), f"block {position} layer {layer} differs"


def test_corrupted_loaded_blocks_change_the_output(
    server: ServerHandle,
    engines: Engines,
    reference: dict[str, list[int]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Proves the comparison above can fail: the engine really computes from the
    loaded bytes."""
    generate(engines(server.endpoint), PROMPT)
    drain_saves()

    generator = torch.Generator().manual_seed(7)

    def corrupt(worker: WorkerSide, job: LoadJob) -> None:
        for t in worker.kv_caches.values():
            for b in job.block_ids:
                t[b].copy_(torch.randn(t[b].shape, generator=generator) * 3)

    on_finished_loads(monkeypatch, corrupt)
    tokens, cached, _ = generate(engines(server.endpoint), PROMPT)
    assert cached == 192
    assert tokens != reference["prompt"]


def test_shared_prefix_hits_exactly_the_shared_blocks(
    server: ServerHandle, engines: Engines, reference: dict[str, list[int]]
) -> None:
    tokens, _, _ = generate(engines(server.endpoint), PROMPT)
    assert tokens == reference["prompt"]
    drain_saves()
    tokens, cached, _ = generate(engines(server.endpoint), SHARED)
    assert cached == 128  # 4 shared full blocks; the 5th differs
    assert tokens == reference["shared"]


def test_server_killed_between_lookup_and_load_is_recomputed(
    server: ServerHandle,
    engines: Engines,
    reference: dict[str, list[int]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    generate(engines(server.endpoint), PROMPT)
    drain_saves()
    original_load = WorkerSide.start_load_kv

    def kill_then_load(self: WorkerSide, meta: PegaConnectorMetadata) -> None:
        if meta.loads and server.is_running():
            server.stop(signal.SIGKILL)
        original_load(self, meta)

    monkeypatch.setattr(WorkerSide, "start_load_kv", kill_then_load)
    warm = engines(server.endpoint)
    tokens, _, seconds = generate(warm, PROMPT)
    assert not server.is_running()
    assert tokens == reference["prompt"]
    assert seconds < RECOMPUTE_BOUND_S
    stats = worker_side().stats()
    assert (stats["loads_ok"], stats["loads_failed"]) == (0, 1)
    # vLLM keeps serving with the server gone.
    tokens, cached, _ = generate(warm, OTHER)
    assert (tokens, cached) == (reference["other"], 0)


def test_server_gone_then_restarted(
    start_server: StartServer, engines: Engines, reference: dict[str, list[int]]
) -> None:
    server = start_server()
    generate(engines(server.endpoint), PROMPT)
    drain_saves()
    server.stop(signal.SIGKILL)

    # A new engine starts and serves without the server, recomputing everything.
    started = time.monotonic()
    llm = engines(server.endpoint)
    tokens, cached, seconds = generate(llm, PROMPT)
    assert time.monotonic() - started < 60.0
    assert (tokens, cached) == (reference["prompt"], 0)
    assert seconds < RECOMPUTE_BOUND_S
    assert not worker_side().stats()["registered"]

    # The server comes back (empty): the connector registers by itself...
    restarted = start_server(endpoint=server.endpoint)
    deadline = time.monotonic() + 10.0
    while not worker_side().stats()["registered"]:
        assert time.monotonic() < deadline, "connector did not register with the new server"
        time.sleep(0.05)
    # ...new saves land there, and a fresh engine hits them.
    assert generate(llm, LATER)[0] == reference["later"]
    drain_saves()
    assert restarted.metric("pegaflow_saved_blocks_total") >= 7
    tokens, cached, _ = generate(engines(server.endpoint), LATER)
    assert (tokens, cached) == (reference["later"], full_blocks(len(LATER)))


def test_engine_without_server_serves_from_the_first_request(
    engines: Engines, reference: dict[str, list[int]]
) -> None:
    llm = engines(f"127.0.0.1:{free_port()}", timeout_s=0.5, query_timeout_s=0.5)
    for name in ("prompt", "other"):
        tokens, cached, seconds = generate(llm, PROMPTS[name])
        assert (tokens, cached) == (reference[name], 0)
        assert seconds < RECOMPUTE_BOUND_S


def test_preemption_under_memory_pressure_keeps_outputs_exact(
    server: ServerHandle, engines: Engines, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Four requests that outgrow a 40-block KV cache: vLLM preempts some while their
    saves may be in flight. Outputs stay those of vLLM without the connector, and a fresh
    engine then loads every prompt's full blocks."""
    from vllm import SamplingParams

    small = {"max_model_len": 512, "kv_cache_memory_bytes": 40 * 32 * 1024}
    prompts = [{"prompt_token_ids": prompt_ids(20 + i, 200)} for i in range(4)]
    params = SamplingParams(max_tokens=150, temperature=0.0, ignore_eos=True)
    preempted: list[str] = []
    original = WorkerSide.handle_preemptions

    def count(self: WorkerSide, meta: PegaConnectorMetadata) -> None:
        preempted.extend(meta.preempted_req_ids)
        original(self, meta)

    monkeypatch.setattr(WorkerSide, "handle_preemptions", count)

    def run(endpoint: str | None) -> tuple[list[list[int]], list[int]]:
        outs = engines(endpoint, small).generate(prompts, params, use_tqdm=False)
        return [list(o.outputs[0].token_ids) for o in outs], [o.num_cached_tokens for o in outs]

    reference, _ = run(None)
    cold, cached = run(server.endpoint)
    assert preempted, "the scenario no longer preempts: shrink the cache"
    assert (cold, cached) == (reference, [0, 0, 0, 0])
    drain_saves()
    warm, cached = run(server.endpoint)
    assert warm == reference
    assert cached == [192] * 4


def test_a_restarted_server_gives_a_fresh_engine_the_prefix_from_its_ssd(
    start_server: StartServer,
    engines: Engines,
    reference: dict[str, list[int]],
    tmp_path: Path,
) -> None:
    ssd = ["--ssd-cache-path", str(tmp_path), "--ssd-cache-capacity", "64mb"]
    server = start_server(extra_args=ssd)
    generate(engines(server.endpoint), PROMPT)
    drain_saves()
    deadline = time.monotonic() + 20.0
    while server.metric("pegaflow_ssd_blocks") < full_blocks(len(PROMPT)) // BLOCK_SIZE:
        assert time.monotonic() < deadline, "blocks not written to the SSD"
        time.sleep(0.05)
    server.stop(signal.SIGKILL)  # RAM lost

    restarted = start_server(extra_args=ssd, endpoint=server.endpoint)
    while restarted.metric("pegaflow_ssd_recovering") != 0:
        assert time.monotonic() < deadline + 20.0, "SSD index not recovered"
        time.sleep(0.01)
    tokens, cached, _ = generate(engines(restarted.endpoint), PROMPT)
    assert (tokens, cached) == (reference["prompt"], full_blocks(len(PROMPT)))
    assert restarted.metric("pegaflow_ssd_promoted_blocks_total") >= 1
    assert restarted.metric('pegaflow_lookups_total{outcome="loading"}') >= 1
