"""Cold vs warm prefill per model family on vLLM CPU with tiny random models.

For each family a fresh pegaflow-server, then two engines in turn: the first computes the
prompt (cold) and saves it; the second, fresh, gets the same prompt (warm: its full
blocks come from the server). Each engine first runs an unrelated prompt, so neither
time includes warm-up. Prefill time = one generated token. Also reports the server's
resident bytes for the prompt's blocks (MLA with two TP ranks stores one copy).

vLLM's CPU build turns prefix caching off for MLA unless the CPU has AMX; this script
turns it back on for MLA, as the tests do (``tests/test_connector_mla.py``).

    python scripts/bench_families_cpu.py
"""

from __future__ import annotations

import argparse
import gc
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "0|1")
os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")

from collections.abc import Callable
from typing import Any

from pegaflow.server import spawn_server
from pegaflow.testing import (
    TINY_BLOCK_SIZE,
    build_tiny_deepseek,
    build_tiny_gemma3,
    build_tiny_gpt_oss,
    build_tiny_granite_hybrid,
    build_tiny_llama,
    build_tiny_qwen3_next,
    cpu_check_keeping_mla_prefix_caching,
)

F32 = {"dtype": "float32", "block_size": TINY_BLOCK_SIZE}
FAMILIES: dict[str, tuple[Callable[[Path], Path], dict[str, Any]]] = {
    # name: (builder, engine arguments)
    "llama (full attention)": (build_tiny_llama, F32),
    "deepseek (MLA), TP=1": (build_tiny_deepseek, {**F32, "block_size": 16}),
    "deepseek (MLA), TP=2": (
        build_tiny_deepseek,
        {**F32, "block_size": 16, "tensor_parallel_size": 2},
    ),
    "gemma-3 (sliding window + full)": (build_tiny_gemma3, F32),
    "gpt-oss (sliding window + full)": (build_tiny_gpt_oss, {**F32, "dtype": "bfloat16"}),
    # vLLM raises the block size to fit a recurrent state (Granite: 96, Qwen3-Next: 544);
    # one-block prefill steps with every state kept store a state at each block boundary.
    "granite-4.0-h (mamba2 + attention)": (
        build_tiny_granite_hybrid,
        {
            "dtype": "float32",
            "block_size": TINY_BLOCK_SIZE,  # raised by vLLM to fit a state
            "max_num_batched_tokens": 96,
            "prefix_cache_retention_interval": None,
        },
    ),
    "qwen3-next (linear attention + full)": (
        build_tiny_qwen3_next,
        {
            "dtype": "bfloat16",
            "max_model_len": 4096,
            "block_size": TINY_BLOCK_SIZE,  # raised by vLLM to fit a state
            "max_num_batched_tokens": 544,
            "prefix_cache_retention_interval": None,
        },
    ),
}


def keep_mla_prefix_caching() -> None:
    from vllm.platforms.cpu import CpuPlatform

    CpuPlatform.check_and_update_config = cpu_check_keeping_mla_prefix_caching()


def prefill(
    model: Path, endpoint: str, engine_args: dict[str, Any], prompt: list[int]
) -> tuple[float, int]:
    """A fresh engine: warm-up prompt, then ``prompt`` timed; (seconds, cached tokens)."""
    from vllm import LLM, SamplingParams
    from vllm.config import KVTransferConfig

    args: dict[str, Any] = {
        "enforce_eager": True,
        "max_model_len": 2048,
        "kv_cache_memory_bytes": 64 << 20,
        "enable_prefix_caching": True,
        **engine_args,
    }
    llm = LLM(
        model=str(model),
        kv_transfer_config=KVTransferConfig(
            kv_connector="PegaKVConnector",
            kv_role="kv_both",
            kv_connector_module_path="pegaflow.connector",
            kv_connector_extra_config={"endpoint": endpoint},
        ),
        **args,
    )
    one = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    llm.generate(
        {"prompt_token_ids": [(i * 31) % 500 + 3 for i in range(len(prompt))]},
        one,
        use_tqdm=False,
    )
    start = time.perf_counter()
    out = llm.generate({"prompt_token_ids": prompt}, one, use_tqdm=False)[0]
    seconds = time.perf_counter() - start
    llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()
    return seconds, int(out.num_cached_tokens or 0)


def stored_bytes(endpoint: str) -> int:
    """Pool bytes the server's blocks hold."""
    from pegaflow import EngineClient

    return int(EngineClient(endpoint, timeout_s=5).health()["cache_bytes"])


def main(prompt_tokens: int, only: str | None) -> None:
    keep_mla_prefix_caching()
    prompt = [(i * 7919) % 500 + 3 for i in range(prompt_tokens)]
    for name, (build, engine_args) in FAMILIES.items():
        if only is not None and only not in name:
            continue
        with (
            tempfile.TemporaryDirectory() as tmp,
            spawn_server(pool_size="256mb") as endpoint,
        ):
            model = build(Path(tmp))
            cold_s, _ = prefill(model, endpoint, engine_args, prompt)
            stored = stored_bytes(endpoint)  # the engine finished its saves at shutdown
            warm_s, cached = prefill(model, endpoint, engine_args, prompt)
        print(
            f"{name}: prompt {prompt_tokens} tokens | cold prefill {cold_s * 1e3:.1f} ms | "
            f"warm prefill {warm_s * 1e3:.1f} ms ({cold_s / warm_s:.2f}x) | cached {cached} | "
            f"stored {stored} bytes"
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--prompt-tokens", type=int, default=1700)
    parser.add_argument("--only", help="run the families whose name contains this")
    options = parser.parse_args()
    main(options.prompt_tokens, options.only)
