"""PegaFlow inside a real vLLM engine on a CUDA GPU (marker ``gpu``; skipped where torch,
vLLM or a GPU is missing; run on the GPU machine with vLLM 0.26, see
``scripts/stage_vllm_gpu.sh``): a cold engine saves, a fresh engine loads every whole
block of the prompt from the server and gives the same tokens — with the KV blocks moved
directly or through the worker's staging buffer, and across the two (a staged engine's
blocks load into a direct one and back)."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import ServerHandle
from vllm_helpers import close_llm, generate, make_llm, prompt_ids, worker_side

torch = pytest.importorskip("torch")
if not torch.cuda.is_available():
    pytest.skip("no CUDA device", allow_module_level=True)
pytest.importorskip("vllm")
pytest.importorskip("transformers")

pytestmark = pytest.mark.gpu

BLOCK = 16
GPU_ARGS = {
    "dtype": "bfloat16",
    "block_size": BLOCK,
    "kv_cache_memory_bytes": 1 << 30,
    "gpu_memory_utilization": 0.5,
}


@pytest.mark.parametrize(
    ("cold_staging", "warm_staging"), [("off", "off"), ("on", "on"), ("on", "off"), ("off", "on")]
)
def test_a_fresh_gpu_engine_loads_the_cold_engines_blocks(
    server: ServerHandle,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    cold_staging: str,
    warm_staging: str,
) -> None:
    from pegaflow.testing import build_tiny_llama

    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    monkeypatch.setenv("PYTHONHASHSEED", "0")  # vLLM 0.26: the same block hashes in both
    model = build_tiny_llama(tmp_path / "llama", head_dim=128)
    prompt = prompt_ids(7, 300)

    cold = make_llm(model, server.endpoint, GPU_ARGS, staging=cold_staging)
    try:
        tokens, cached, _ = generate(cold, prompt)
        assert cached == 0
        assert (worker_side().staging is not None) == (cold_staging == "on")
        assert worker_side().drain(20.0)
    finally:
        close_llm(cold)

    warm = make_llm(model, server.endpoint, GPU_ARGS, staging=warm_staging)
    try:
        again, cached, _ = generate(warm, prompt)
        assert cached == (len(prompt) - 1) // BLOCK * BLOCK
        assert again == tokens
        stats = worker_side().stats()
        assert (stats["loads_ok"], stats["loads_failed"]) == (1, 0)
    finally:
        close_llm(warm)
