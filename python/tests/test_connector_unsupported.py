"""Which KV cache groups the connector serves; what it refuses stops vLLM at startup
and says why."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from conftest import ServerHandle, require_module
from vllm_helpers import make_llm

require_module("vllm")


def config(*, pp: int = 1, prefix: bool = True, mla: bool = False, device: str = "cpu") -> Any:
    return SimpleNamespace(
        parallel_config=SimpleNamespace(pipeline_parallel_size=pp),
        cache_config=SimpleNamespace(enable_prefix_caching=prefix),
        model_config=SimpleNamespace(use_mla=mla),
        device_config=SimpleNamespace(device_type=device),
    )


def spec(name: str, block_size: int = 16, **fields: Any) -> Any:
    """An object of a class named like vLLM's KV cache spec ``name``."""
    obj = type(name, (), {})()
    obj.block_size = block_size
    for key, value in fields.items():
        setattr(obj, key, value)
    return obj


def kv_config(*specs: Any) -> Any:
    specs = tuple(spec(s) if isinstance(s, str) else s for s in specs)
    return SimpleNamespace(
        kv_cache_groups=[SimpleNamespace(kv_cache_spec=s, layer_names=["l"]) for s in specs]
    )


def test_each_unsupported_case_names_its_reason() -> None:
    from pegaflow.connector.pega_connector import _unsupported_reason

    full = kv_config("FullAttentionSpec")
    assert _unsupported_reason(config(), full) is None
    assert _unsupported_reason(config(mla=True), kv_config("MLAAttentionSpec")) is None
    assert _unsupported_reason(config(pp=2), full) is None  # stages are ranks of one instance
    reason = _unsupported_reason(config(prefix=False), full)
    assert reason is not None and "prefix caching is disabled" in reason and "AMX" not in reason
    reason = _unsupported_reason(config(prefix=False, mla=True), full)
    assert reason is not None and "MLA" in reason and "AMX" in reason
    reason = _unsupported_reason(config(prefix=False, mla=True, device="cuda"), full)
    assert reason is not None and "AMX" not in reason
    assert _unsupported_reason(config(), None) == "vLLM passed no KV cache config"


def test_hybrid_groups_are_served_and_what_is_not_says_why() -> None:
    from pegaflow.connector import compat
    from pegaflow.connector.groups import cache_groups
    from pegaflow.connector.pega_connector import _unsupported_reason
    from pegaflow.connector.policy import CacheGroup, GroupKind

    sliding = spec("SlidingWindowSpec", sliding_window=64, extra_retained_tokens=0)
    align = spec("MambaSpec", mamba_cache_mode="align")
    hybrid = kv_config("FullAttentionSpec", sliding, align)
    if compat.TAKES_FAILED_REQUESTS:
        assert _unsupported_reason(config(), hybrid) is None
    else:  # vLLM 0.26: a hybrid model's failed load could not be reported
        reason = _unsupported_reason(config(), hybrid)
        assert reason is not None and "need vLLM 0.30 or later" in reason
    groups, block_size = cache_groups(hybrid)
    assert block_size == 16
    assert groups == [
        CacheGroup(GroupKind.FULL),
        CacheGroup(GroupKind.SLIDING, 4),
        CacheGroup(GroupKind.STATE),
    ]
    reason = _unsupported_reason(config(), kv_config(spec("MambaSpec", mamba_cache_mode="none")))
    assert reason is not None and "mamba_cache_mode='none'" in reason and "align" in reason
    reason = _unsupported_reason(config(), kv_config("ChunkedLocalAttentionSpec"))
    assert reason is not None and "ChunkedLocalAttentionSpec" in reason
    mixed = kv_config("FullAttentionSpec", spec("FullAttentionSpec", block_size=32))
    reason = _unsupported_reason(config(), mixed)
    assert reason is not None and "different block sizes [16, 32]" in reason


def test_an_engine_the_connector_cannot_serve_does_not_start(
    tiny_model: Path, server: ServerHandle, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    with pytest.raises(Exception, match="PegaKVConnector cannot serve this engine: prefix"):
        make_llm(tiny_model, server.endpoint, {"enable_prefix_caching": False})
