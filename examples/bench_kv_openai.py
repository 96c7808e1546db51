"""The TTFT passes of ``bench_kv_cache.py`` against a running OpenAI-compatible vLLM
server (``vllm serve``), whatever connector it was started with.

Each prompt is one streamed ``/v1/completions`` request of token ids with one output
token: TTFT is the time to its first streamed token. Passes:

- ``cold`` / ``warm-fresh``: the prompts as they are (``warm-fresh`` is the name for a
  run against a server restarted after a ``cold`` run);
- ``warm-reset``: first ``POST /reset_prefix_cache`` (the server needs
  ``VLLM_SERVER_DEV_MODE=1``), so vLLM's GPU prefix cache cannot serve them;
- ``warm-gpu``: the prompts again, without a reset.

Cached tokens are reported when the server runs with ``--enable-prompt-tokens-details``.
"""

from __future__ import annotations

import json
import statistics
import time
import urllib.error
import urllib.request
from typing import Any

from bench_kv_probe import ttft_summary

RESET_DEADLINE_S = 30.0


def _post(url: str, body: dict[str, Any], timeout_s: float) -> Any:
    request = urllib.request.Request(
        url,
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    return urllib.request.urlopen(request, timeout=timeout_s)


def served_model(base_url: str) -> str:
    """The first model the server serves."""
    with urllib.request.urlopen(f"{base_url}/v1/models", timeout=30) as resp:
        models = json.load(resp)["data"]
    if not models:
        raise SystemExit(f"{base_url} serves no model")
    return str(models[0]["id"])


def stream_one(base_url: str, model: str, tokens: list[int]) -> tuple[float, int | None]:
    """(TTFT in ms, cached prompt tokens or None) of one streamed completion."""
    body = {
        "model": model,
        "prompt": tokens,
        "max_tokens": 1,
        "temperature": 0.0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    t0 = time.perf_counter()
    ttft: float | None = None
    cached: int | None = None
    with _post(f"{base_url}/v1/completions", body, timeout_s=600) as resp:
        for raw in resp:
            line = raw.decode().strip()
            if not line.startswith("data:"):
                continue
            data = line[len("data:") :].strip()
            if data == "[DONE]":
                break
            chunk = json.loads(data)
            if ttft is None and chunk.get("choices"):
                ttft = (time.perf_counter() - t0) * 1e3
            details = (chunk.get("usage") or {}).get("prompt_tokens_details") or {}
            if details.get("cached_tokens") is not None:
                cached = int(details["cached_tokens"])
    if ttft is None:
        raise SystemExit(f"{base_url} streamed no token for a {len(tokens)}-token prompt")
    return ttft, cached


def reset_prefix_cache(base_url: str, model: str) -> None:
    """Empties vLLM's GPU prefix cache. vLLM refuses while finished requests still hold
    blocks (a connector's saves in flight): retry, with a one-token request between tries
    so the engine steps."""
    deadline = time.monotonic() + RESET_DEADLINE_S
    while True:
        try:
            with _post(f"{base_url}/reset_prefix_cache", {}, timeout_s=30) as resp:
                text = resp.read().decode()
        except urllib.error.HTTPError as e:
            if e.code == 404:
                raise SystemExit(
                    f"{base_url} has no /reset_prefix_cache: start it with VLLM_SERVER_DEV_MODE=1"
                ) from e
            raise
        # vLLM answers {"success": bool}; older versions an empty 200.
        if not text or json.loads(text).get("success", True):
            return
        if time.monotonic() > deadline:
            raise SystemExit(f"{base_url} did not reset its prefix cache within 30 s")
        stream_one(base_url, model, [5])
        time.sleep(0.1)


def run_pass(base_url: str, name: str, batch: list[list[int]]) -> dict[str, Any]:
    """One pass over ``batch``; the result line ``bench_kv_cache.py`` prints."""
    model = served_model(base_url)
    if name == "warm-reset":
        reset_prefix_cache(base_url, model)
    ttft: list[float] = []
    cached: list[int] = []
    for tokens in batch:
        ms, hit = stream_one(base_url, model, tokens)
        ttft.append(ms)
        if hit is not None:
            cached.append(hit)
    result: dict[str, Any] = {
        "connector": f"openai:{base_url}",
        "pass": name,
        "prompts": len(batch),
        "prompt_tokens": len(batch[0]) if batch else 0,
        **ttft_summary(ttft, batch),
        "engine_start_s": 0.0,
    }
    if len(cached) == len(batch):
        result["cached_tokens_mean"] = round(statistics.fmean(cached))
    return result


__all__ = ["reset_prefix_cache", "run_pass", "served_model", "stream_one"]
