"""Time to first token with vLLM's offline engine: PegaFlow, vLLM's own CPU offloading,
or no connector, on the same prompts and engine settings.

N prompts of L tokens (token ids; prompt i shares its first ``--shared-prefix`` tokens
with every other prompt), one output token each, one request at a time:

- ``cold``: a fresh engine, nothing cached (PegaFlow and offloading save meanwhile);
- ``warm-reset``: the same engine after ``reset_prefix_cache()``, so vLLM's GPU prefix
  cache is empty and every hit comes from the connector;
- ``warm-fresh``: a new engine in another process (PegaFlow only: vLLM's offloading
  keeps its cache inside the engine, so a fresh engine cannot see it);
- ``warm-gpu`` (no connector): the same engine again, served by vLLM's own GPU prefix
  cache without any copy: the floor every warm pass is compared with.

Each pass runs in its own Python process (the engine in-process there), so GPU memory
is free between engines. Prints one JSON line per pass (TTFT mean / p50 / p99 in ms,
prompt tokens per second, engine start seconds), then a table.

    python examples/bench_kv_cache.py --llama-8b-dummy --connector pegaflow --spawn-server
    python examples/bench_kv_cache.py --model PATH --connector offloading
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

LLAMA_8B = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "vocab_size": 128256,
    "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "rope_scaling": {
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
        "rope_type": "llama3",
    },
    "hidden_act": "silu",
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "bos_token_id": 128000,
    "eos_token_id": 128001,
}
"""Llama-3.1-8B's architecture: timing does not depend on weight values, so the engine
runs it with ``load_format="dummy"`` and no download."""


def write_llama_8b(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(LLAMA_8B))
    return directory


def prompts(count: int, length: int, shared: int, vocab: int) -> list[list[int]]:
    """``count`` prompts of ``length`` token ids; the first ``shared`` are common."""
    span = max(vocab - 10, 1)
    common = [(i * 7919) % span + 5 for i in range(shared)]
    return [
        common + [(p * 104729 + i * 7907 + 1) % span + 5 for i in range(length - shared)]
        for p in range(count)
    ]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def engine_kwargs(options: argparse.Namespace) -> dict[str, Any]:
    kwargs: dict[str, Any] = {
        "model": options.model,
        "dtype": options.dtype,
        "max_model_len": options.prompt_tokens + 16,
        "enable_prefix_caching": True,
        "enforce_eager": options.enforce_eager,
        "gpu_memory_utilization": options.gpu_memory_utilization,
        "seed": 0,
    }
    if options.kv_cache_gib:
        kwargs["kv_cache_memory_bytes"] = int(options.kv_cache_gib * (1 << 30))
    if options.dummy:
        kwargs["load_format"] = "dummy"
        kwargs["skip_tokenizer_init"] = True
    if options.connector == "pegaflow":
        from vllm.config import KVTransferConfig

        kwargs["kv_transfer_config"] = KVTransferConfig(
            kv_connector="PegaKVConnector",
            kv_role="kv_both",
            kv_connector_module_path="pegaflow.connector",
            kv_connector_extra_config={"endpoint": options.endpoint},
        )
    elif options.connector == "offloading":
        kwargs["kv_offloading_size"] = options.offloading_gib
    return kwargs


def run_passes(options: argparse.Namespace, passes: list[str]) -> None:
    """In this process: one engine, the given passes; one JSON line each."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_USE_FLASHINFER_SAMPLER", "0")
    from vllm import LLM, SamplingParams

    started = time.perf_counter()
    llm = LLM(**engine_kwargs(options))
    start_s = time.perf_counter() - started
    one = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    vocab = int(llm.llm_engine.model_config.get_vocab_size())
    batch = prompts(options.prompts, options.prompt_tokens, options.shared_prefix, vocab)
    # Warm-up on an unrelated prompt: CUDA graphs, kernels, the connector's registration.
    warmup = [(i * 31) % max(vocab - 10, 1) + 5 for i in range(options.prompt_tokens)]
    llm.generate({"prompt_token_ids": warmup}, one, use_tqdm=False)
    for name in passes:
        if name == "warm-reset":
            # vLLM refuses while finished requests still hold blocks (their saves are
            # reported done by engine steps, which the offline engine runs only while
            # it has requests): step the idle engine until it can.
            deadline = time.monotonic() + 30
            while llm.reset_prefix_cache() is False:
                if time.monotonic() > deadline:
                    raise SystemExit("vLLM did not reset its prefix cache within 30 s")
                llm.llm_engine.step()
                time.sleep(0.05)
        ttft: list[float] = []
        cached: list[int] = []
        for tokens in batch:
            t0 = time.perf_counter()
            out = llm.generate({"prompt_token_ids": tokens}, one, use_tqdm=False)[0]
            ttft.append((time.perf_counter() - t0) * 1e3)
            cached.append(int(out.num_cached_tokens or 0))
        if name == "cold":
            time.sleep(options.settle_s)  # let the last saves finish before the next pass
        result = {
            "connector": options.connector,
            "pass": name,
            "prompts": len(batch),
            "prompt_tokens": options.prompt_tokens,
            "enforce_eager": options.enforce_eager,
            "engine_start_s": round(start_s, 2),
            "ttft_mean_ms": round(statistics.fmean(ttft), 2),
            "ttft_p50_ms": round(percentile(ttft, 50), 2),
            "ttft_p99_ms": round(percentile(ttft, 99), 2),
            "prompt_tokens_per_s": round(sum(map(len, batch)) / (sum(ttft) / 1e3)),
            "cached_tokens_mean": round(statistics.fmean(cached)),
        }
        print("RESULT " + json.dumps(result), flush=True)


def child(options: argparse.Namespace, passes: list[str]) -> list[dict[str, Any]]:
    argv = [sys.executable, __file__, *options.forwarded, "--passes", ",".join(passes)]
    argv += ["--model", options.model, "--endpoint", options.endpoint or ""]
    # vLLM 0.26 seeds block hashes at random per process unless PYTHONHASHSEED is set:
    # the fresh engine must hash as the first did.
    env = {**os.environ, "PYTHONHASHSEED": os.environ.get("PYTHONHASHSEED", "0")}
    proc = subprocess.run(argv, capture_output=True, text=True, check=False, env=env)
    if options.log_dir:
        log = Path(options.log_dir) / f"{options.connector}-{'-'.join(passes)}.log"
        log.write_text(proc.stdout + proc.stderr)
    results = [
        json.loads(line[len("RESULT ") :])
        for line in proc.stdout.splitlines()
        if line.startswith("RESULT ")
    ]
    if proc.returncode != 0 or len(results) != len(passes):
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-8000:])
        raise SystemExit(f"engine process for {passes} failed ({proc.returncode})")
    return results


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", help="a model directory or name")
    parser.add_argument("--llama-8b-dummy", action="store_true", help="Llama-3.1-8B, dummy weights")
    parser.add_argument("--connector", choices=("pegaflow", "offloading", "none"), default="none")
    parser.add_argument("--prompts", type=int, default=10)
    parser.add_argument("--prompt-tokens", type=int, default=4096)
    parser.add_argument("--shared-prefix", type=int, default=0)
    parser.add_argument("--enforce-eager", action="store_true")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--kv-cache-gib", type=float, default=0.0, help="KV cache size")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.85)
    parser.add_argument("--endpoint", default="", help="pegaflow-server (else --spawn-server)")
    parser.add_argument("--spawn-server", action="store_true")
    parser.add_argument("--pool-size", default="32gb", help="pool of a spawned server")
    parser.add_argument("--offloading-gib", type=float, default=40.0)
    parser.add_argument("--settle-s", type=float, default=2.0)
    parser.add_argument("--log-dir", help="keep each engine process's output here")
    parser.add_argument("--passes", help=argparse.SUPPRESS)
    parser.add_argument("--dummy", action="store_true", help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.passes:  # an engine process started by main()
        run_passes(options, options.passes.split(","))
        return

    forwarded = [
        "--connector", options.connector,
        "--prompts", str(options.prompts),
        "--prompt-tokens", str(options.prompt_tokens),
        "--shared-prefix", str(options.shared_prefix),
        "--gpu-memory-utilization", str(options.gpu_memory_utilization),
        "--offloading-gib", str(options.offloading_gib),
        "--settle-s", str(options.settle_s),
        "--dtype", options.dtype,
        "--kv-cache-gib", str(options.kv_cache_gib),
    ]  # fmt: skip
    if options.enforce_eager:
        forwarded.append("--enforce-eager")
    with ExitStack() as stack:
        if options.llama_8b_dummy:
            tmp = Path(stack.enter_context(tempfile.TemporaryDirectory()))
            options.model = str(write_llama_8b(tmp / "llama-3.1-8b"))
            forwarded.append("--dummy")
        if not options.model:
            parser.error("give --model or --llama-8b-dummy")
        if options.connector == "pegaflow" and not options.endpoint:
            if not options.spawn_server:
                parser.error("--connector pegaflow needs --endpoint or --spawn-server")
            from pegaflow.server import spawn_server

            server = spawn_server(pool_size=options.pool_size, startup_timeout_s=120.0)
            options.endpoint = stack.enter_context(server)
        options.forwarded = forwarded
        passes = {
            "pegaflow": ["cold", "warm-reset"],
            "offloading": ["cold", "warm-reset"],
            "none": ["cold", "warm-gpu"],
        }
        results = child(options, passes[options.connector])
        if options.connector == "pegaflow":
            results += child(options, ["warm-fresh"])
    print(f"\n{'pass':<12} {'TTFT mean':>10} {'p50':>9} {'p99':>9} {'cached':>7} {'start':>7}")
    for r in results:
        print(
            f"{r['pass']:<12} {r['ttft_mean_ms']:>8.1f}ms {r['ttft_p50_ms']:>7.1f}ms "
            f"{r['ttft_p99_ms']:>7.1f}ms {r['cached_tokens_mean']:>7} {r['engine_start_s']:>6.1f}s"
        )


if __name__ == "__main__":
    main()
