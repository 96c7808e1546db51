"""PegaFlow's vLLM v1 connector.

Enable it with::

    KVTransferConfig(
        kv_connector="PegaKVConnector",
        kv_role="kv_both",
        kv_connector_module_path="pegaflow.connector",
    )

(or just ``kv_connector="PegaKVConnector"``: the ``vllm.general_plugins`` entry point of
``pegaflow-llm`` registers the name). ``PegaKVConnector`` is imported on first use, so the
vLLM-free parts (:mod:`.policy`, :mod:`.config`, :mod:`.metadata`) import without vLLM.
"""

from __future__ import annotations

from typing import Any

__all__ = ["PegaKVConnector"]


def __getattr__(name: str) -> Any:
    if name == "PegaKVConnector":
        from pegaflow.connector.pega_connector import PegaKVConnector

        return PegaKVConnector
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
