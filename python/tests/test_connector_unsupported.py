"""What the connector refuses to serve says why (vLLM then serves without it)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from conftest import require_module

require_module("vllm")


def config(*, pp: int = 1, prefix: bool = True, mla: bool = False, device: str = "cpu") -> Any:
    return SimpleNamespace(
        parallel_config=SimpleNamespace(pipeline_parallel_size=pp),
        cache_config=SimpleNamespace(enable_prefix_caching=prefix),
        model_config=SimpleNamespace(use_mla=mla),
        device_config=SimpleNamespace(device_type=device),
    )


def kv_config(*spec_names: str) -> Any:
    specs = [type(name, (), {})() for name in spec_names]
    return SimpleNamespace(kv_cache_groups=[SimpleNamespace(kv_cache_spec=s) for s in specs])


def test_each_unsupported_case_names_its_reason() -> None:
    from pegaflow.connector.pega_connector import _unsupported_reason

    full = kv_config("FullAttentionSpec")
    assert _unsupported_reason(config(), full) is None
    assert _unsupported_reason(config(mla=True), kv_config("MLAAttentionSpec")) is None
    reason = _unsupported_reason(config(pp=2), full)
    assert reason is not None and "pipeline parallelism" in reason
    reason = _unsupported_reason(config(prefix=False), full)
    assert reason is not None and "prefix caching is disabled" in reason and "AMX" not in reason
    reason = _unsupported_reason(config(prefix=False, mla=True), full)
    assert reason is not None and "MLA" in reason and "AMX" in reason
    reason = _unsupported_reason(config(prefix=False, mla=True, device="cuda"), full)
    assert reason is not None and "AMX" not in reason
    reason = _unsupported_reason(config(), kv_config("FullAttentionSpec", "SlidingWindowSpec"))
    assert reason is not None and "2 KV cache groups" in reason
    reason = _unsupported_reason(config(), kv_config("MambaSpec"))
    assert reason is not None and "MambaSpec" in reason
    assert _unsupported_reason(config(), None) == "vLLM passed no KV cache config"
