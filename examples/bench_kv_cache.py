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

With ``--decode``, one engine instead streams ``--decode-requests`` long generations and
lets the N prompts arrive meanwhile (their prefills run, and are saved, while the others
decode): ``decode`` reports inter-token latency, over all steps and over the steps
without a prefill, so a connector's saves show as slower decode steps.

Engines run one per Python process (in-process there), so GPU memory is free between
them. Prints one JSON line per pass (TTFT mean / p50 / p99 in ms, prompt tokens per
second, engine start seconds; for PegaFlow also the KV layout it registered, the mean
load time from the load call until the engine saw it done, and — with the server's
metrics — the server's copy time), then a table.

    python examples/bench_kv_cache.py --llama-8b-dummy --connector pegaflow --spawn-server
    python examples/bench_kv_cache.py --model PATH --connector offloading
    python examples/bench_kv_cache.py --llama-8b-dummy --connector none --decode
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

from bench_kv_probe import Probe, Timeline, percentile, ttft_summary

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


def prompts(count: int, length: int, shared: int, vocab: int, salt: int = 0) -> list[list[int]]:
    """``count`` prompts of ``length`` token ids; the first ``shared`` are common
    (another ``salt``: other prompts)."""
    span = max(vocab - 10, 1)
    common = [(i * 7919 + salt) % span + 5 for i in range(shared)]
    return [
        common
        + [(p * 104729 + i * 7907 + 1 + salt * 31) % span + 5 for i in range(length - shared)]
        for p in range(count)
    ]


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
            kv_connector_extra_config={
                "endpoint": options.endpoint,
                "staging": options.staging,
                **({"staging_bytes": options.staging_mib << 20} if options.staging_mib else {}),
            },
        )
    elif options.connector == "offloading":
        kwargs["kv_offloading_size"] = options.offloading_gib
    return kwargs


def reset_gpu_prefix_cache(llm: Any) -> None:
    """vLLM refuses while finished requests still hold blocks (their saves are reported
    done by engine steps, which the offline engine runs only while it has requests):
    step the idle engine until it can."""
    deadline = time.monotonic() + 30
    while llm.reset_prefix_cache() is False:
        if time.monotonic() > deadline:
            raise SystemExit("vLLM did not reset its prefix cache within 30 s")
        llm.llm_engine.step()
        time.sleep(0.05)


def ttft_pass(
    llm: Any, batch: list[list[int]], one: Any, probe: Probe, timeline: Timeline
) -> dict[str, Any]:
    ttft: list[float] = []
    cached: list[int] = []
    waits: list[float] = []
    copies: list[float] = []
    phases: list[dict[str, float]] = []
    for tokens in batch:
        before = probe.snapshot()
        timeline.marks.clear()
        t0 = time.perf_counter()
        out = llm.generate({"prompt_token_ids": tokens}, one, use_tqdm=False)[0]
        t_end = time.perf_counter()
        ttft.append((t_end - t0) * 1e3)
        phases.append(timeline.request(t0, t_end))
        cached.append(int(out.num_cached_tokens or 0))
        split = probe.split(before, probe.snapshot())
        waits.append(split.get("load_wait_ms_mean", 0.0))
        copies.append(split.get("server_load_ms_mean", 0.0))
    result = {**ttft_summary(ttft, batch), "cached_tokens_mean": round(statistics.fmean(cached))}
    if any(waits):
        result["load_wait_ms"] = waits
    if any(copies):
        result["server_load_ms"] = copies
    if probe.pegaflow:
        result["phases"] = Timeline.summary(phases)
    return result


def decode_pass(
    llm: Any, options: argparse.Namespace, arrivals: list[list[int]], vocab: int
) -> dict[str, Any]:
    """Streams long generations while ``arrivals`` come in one every ``--arrival-steps``
    engine steps; inter-token latency of the generations, in ms."""
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    def params(max_tokens: int) -> Any:
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=0.0,
            ignore_eos=True,
            output_kind=RequestOutputKind.DELTA,
        )

    engine = llm.llm_engine
    streams = prompts(options.decode_requests, 256, 0, vocab, salt=977)
    for i, tokens in enumerate(streams):
        request = {"prompt_token_ids": tokens}
        engine.add_request(f"decode-{i}", request, params(options.decode_tokens))
    pending = list(enumerate(arrivals))
    last: dict[str, float] = {}
    gaps: list[float] = []
    quiet_gaps: list[float] = []  # steps that ran no prefill of an arrival
    step = 0
    prefilling: set[str] = set()
    while engine.has_unfinished_requests():
        if pending and step % options.arrival_steps == 0 and step > 0:
            i, tokens = pending.pop(0)
            engine.add_request(f"arrival-{i}", {"prompt_token_ids": tokens}, params(1))
            prefilling.add(f"arrival-{i}")
        outputs = engine.step()
        now = time.perf_counter()
        prefill_done = {o.request_id for o in outputs if o.request_id in prefilling}
        prefilling -= prefill_done
        for out in outputs:
            rid = out.request_id
            if not rid.startswith("decode-") or not out.outputs or not out.outputs[0].token_ids:
                continue
            if rid in last:
                gap = (now - last[rid]) * 1e3
                gaps.append(gap)
                if not prefill_done and not prefilling:
                    quiet_gaps.append(gap)
            last[rid] = now
        step += 1
    return {
        "decode_requests": options.decode_requests,
        "decode_tokens": options.decode_tokens,
        "arrivals": len(arrivals),
        "itl_mean_ms": round(statistics.fmean(gaps), 3),
        "itl_p50_ms": round(percentile(gaps, 50), 3),
        "itl_p99_ms": round(percentile(gaps, 99), 3),
        "itl_no_prefill_p50_ms": round(percentile(quiet_gaps, 50), 3),
        "itl_no_prefill_p99_ms": round(percentile(quiet_gaps, 99), 3),
    }


def run_passes(options: argparse.Namespace, passes: list[str]) -> None:
    """In this process: one engine, the given passes; one JSON line each."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_USE_FLASHINFER_SAMPLER", "0")
    if options.model_runner != "default":
        os.environ["VLLM_USE_V2_MODEL_RUNNER"] = "1" if options.model_runner == "v2" else "0"
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
    probe = Probe(options.connector == "pegaflow", options.server_metrics)
    timeline = Timeline()
    if probe.pegaflow:
        timeline.install()
    for name in passes:
        if name == "warm-reset":
            reset_gpu_prefix_cache(llm)
        before = probe.snapshot()
        if name == "decode":
            measured = decode_pass(llm, options, batch, vocab)
        else:
            measured = ttft_pass(llm, batch, one, probe, timeline)
        if name == "cold":
            time.sleep(options.settle_s)  # let the last saves finish before the next pass
        result = {
            "connector": options.connector,
            "pass": name,
            "prompts": len(batch),
            "prompt_tokens": options.prompt_tokens,
            "enforce_eager": options.enforce_eager,
            "model_runner": options.model_runner,
            "staging": options.staging,
            "engine_start_s": round(start_s, 2),
            **measured,
            **probe.split(before, probe.snapshot()),
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
    parser.add_argument(
        "--staging",
        choices=("off", "auto", "on"),
        default="auto",
        help="PegaFlow's staging buffer for per-layer KV tensors (connector config staging)",
    )
    parser.add_argument(
        "--staging-mib", type=int, default=0, help="staging buffer size (default: connector's)"
    )
    parser.add_argument(
        "--model-runner",
        choices=("default", "v1", "v2"),
        default="default",
        help="vLLM's model runner (VLLM_USE_V2_MODEL_RUNNER); default: vLLM's choice",
    )
    parser.add_argument(
        "--server-metrics",
        default="",
        help="HOST:PORT of the server's /metrics (a spawned server gets one), to split TTFT",
    )
    parser.add_argument("--decode", action="store_true", help="inter-token latency instead")
    parser.add_argument(
        "--openai-url",
        default="",
        help="time a running vLLM OpenAI server (http://HOST:PORT) instead of an offline engine",
    )
    parser.add_argument(
        "--openai-passes",
        default="cold,warm-reset",
        help="passes against --openai-url: cold, warm-reset, warm-gpu, warm-fresh",
    )
    parser.add_argument(
        "--vocab-size", type=int, default=32000, help="token ids stay below it (--openai-url)"
    )
    parser.add_argument(
        "--expect-hits",
        action="store_true",
        help="fail unless every warm pass had cached tokens (smoke tests)",
    )
    parser.add_argument("--decode-requests", type=int, default=8)
    parser.add_argument("--decode-tokens", type=int, default=256)
    parser.add_argument("--arrival-steps", type=int, default=20, help="steps between arrivals")
    parser.add_argument("--passes", help=argparse.SUPPRESS)
    parser.add_argument("--dummy", action="store_true", help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.passes:  # an engine process started by main()
        run_passes(options, options.passes.split(","))
        return
    if options.openai_url:
        from bench_kv_openai import run_pass

        url = options.openai_url.rstrip("/")
        batch = prompts(
            options.prompts, options.prompt_tokens, options.shared_prefix, options.vocab_size
        )
        results = [run_pass(url, name, batch) for name in options.openai_passes.split(",")]
        print_table(results)
        check_hits(options, results)
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
        "--model-runner", options.model_runner,
        "--staging", options.staging,
        "--staging-mib", str(options.staging_mib),
        "--decode-requests", str(options.decode_requests),
        "--decode-tokens", str(options.decode_tokens),
        "--arrival-steps", str(options.arrival_steps),
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
            from pegaflow.server import free_port, spawn_server

            if not options.server_metrics:
                options.server_metrics = f"127.0.0.1:{free_port()}"
            server = spawn_server(
                pool_size=options.pool_size,
                startup_timeout_s=120.0,
                metrics_addr=options.server_metrics,
            )
            options.endpoint = stack.enter_context(server)
        forwarded += ["--server-metrics", options.server_metrics]
        options.forwarded = forwarded
        passes = {
            "pegaflow": ["cold", "warm-reset"],
            "offloading": ["cold", "warm-reset"],
            "none": ["cold", "warm-gpu"],
        }
        if options.decode:
            results = child(options, ["decode"])
        else:
            results = child(options, passes[options.connector])
            if options.connector == "pegaflow":
                results += child(options, ["warm-fresh"])
    print_table(results)
    check_hits(options, results)


def check_hits(options: argparse.Namespace, results: list[dict[str, Any]]) -> None:
    if not options.expect_hits:
        return
    missed = [
        r["pass"]
        for r in results
        if r["pass"].startswith("warm") and not r.get("cached_tokens_mean")
    ]
    if missed:
        raise SystemExit(f"no cached tokens in {', '.join(missed)}")


def print_table(results: list[dict[str, Any]]) -> None:
    for r in results:
        print(json.dumps(r))
    if results and results[0]["pass"] == "decode":
        print(f"\n{'ITL (ms)':<10} {'mean':>8} {'p50':>8} {'p99':>8} {'quiet p50':>10} {'p99':>8}")
        for r in results:
            print(
                f"{r['connector']:<10} {r['itl_mean_ms']:>8.2f} {r['itl_p50_ms']:>8.2f} "
                f"{r['itl_p99_ms']:>8.2f} {r['itl_no_prefill_p50_ms']:>10.2f} "
                f"{r['itl_no_prefill_p99_ms']:>8.2f}"
            )
        return
    print(
        f"\n{'pass':<12} {'TTFT mean':>10} {'p50':>9} {'p99':>9} {'cached':>7} {'start':>7}"
        f" {'lookup':>7} {'load wait':>10} {'server copy':>12} {'after load':>11}"
    )

    def ms(value: float | None) -> str:
        return "-" if value is None else f"{value:.1f}ms"

    for r in results:
        phases = r.get("phases", {})
        print(
            f"{r['pass']:<12} {r['ttft_mean_ms']:>8.1f}ms {r['ttft_p50_ms']:>7.1f}ms "
            f"{r['ttft_p99_ms']:>7.1f}ms {r.get('cached_tokens_mean', '-'):>7}"
            f" {r['engine_start_s']:>6.1f}s"
            f" {ms(phases.get('lookup_ms_mean')):>7} {ms(r.get('load_wait_ms_mean')):>10}"
            f" {ms(r.get('server_load_ms_mean')):>12} {ms(phases.get('after_load_ms_mean')):>11}"
        )
    layouts = {r["kv_layout"] for r in results if "kv_layout" in r}
    if layouts:
        print(f"PegaFlow registered vLLM's KV cache as: {', '.join(sorted(layouts))}")


if __name__ == "__main__":
    main()
