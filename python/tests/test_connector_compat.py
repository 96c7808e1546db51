"""The connector's compatibility layer against the installed vLLM's real classes (CI runs
this file with vLLM 0.32, 0.29 and 0.26): each feature it detects is the one that
version has."""

from __future__ import annotations

from types import SimpleNamespace

from conftest import require_module

require_module("vllm")


def _version() -> tuple[int, int]:
    import vllm

    major, minor = vllm.__version__.split(".")[:2]
    return int(major), int(minor)


def test_features_match_the_installed_version() -> None:
    from vllm.distributed.kv_transfer.kv_connector.v1 import base

    from pegaflow.connector import compat

    version = _version()
    # 0.26-0.28: cross-layer blocks by preference; 0.29: by layout string, nothing else
    # yet; 0.30 on: the KV cache manager bound and failed loads taken per request.
    assert compat.CROSS_LAYER_BY_PREFERENCE is (version < (0, 29))
    assert compat.BINDS_KV_CACHE_MANAGER is (version >= (0, 30))
    assert compat.TAKES_FAILED_REQUESTS is (version >= (0, 30))
    if compat.TAKES_FAILED_REQUESTS:
        assert compat.TransferResults is base.KVConnectorTransferResults
    results = compat.TransferResults(failed_recving={"r"})
    assert (results.finished_sending, results.failed_recving) == (set(), {"r"})


def test_the_connector_implements_what_the_installed_base_class_calls() -> None:
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorBase_V1

    from pegaflow.connector.pega_connector import PegaKVConnector

    hooks = ["get_finished", "start_load_kv", "wait_for_save", "build_connector_meta"]
    if hasattr(KVConnectorBase_V1, "register_cross_layers_kv_cache"):
        hooks.append("register_cross_layers_kv_cache")
    if hasattr(KVConnectorBase_V1, "bind_kv_cache_manager"):
        hooks.append("bind_kv_cache_manager")
    for hook in hooks:
        assert getattr(PegaKVConnector, hook) is not getattr(KVConnectorBase_V1, hook), hook


def test_cross_layer_hint_only_where_v2_runner_ignores_the_preference() -> None:
    from pegaflow.connector import compat

    v2 = SimpleNamespace(use_v2_model_runner=True)
    v1 = SimpleNamespace(use_v2_model_runner=False)
    if compat.CROSS_LAYER_BY_PREFERENCE:
        hint = compat.cross_layer_hint(v2, 1)
        assert hint is not None and "VLLM_USE_V2_MODEL_RUNNER=0" in hint
    else:  # 0.29 on lay out cross-layer blocks by the layout string, in either runner
        assert compat.cross_layer_hint(v2, 1) is None
    assert compat.cross_layer_hint(v1, 1) is None
    assert compat.cross_layer_hint(v2, 2) is None  # several groups: never cross-layer
