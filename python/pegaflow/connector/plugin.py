"""``vllm.general_plugins`` entry point: makes ``kv_connector="PegaKVConnector"`` work
without ``kv_connector_module_path``.

vLLM calls :func:`register` in every process it starts, possibly more than once.
"""

from __future__ import annotations

import logging

logger = logging.getLogger(__name__)

CONNECTOR_NAME = "PegaKVConnector"


def register() -> None:
    """Registers ``PegaKVConnector`` with vLLM's connector factory (idempotent)."""
    try:
        from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory
    except ImportError:  # vLLM absent or too old: nothing to register with
        logger.debug("vLLM's KV connector factory not found; PegaKVConnector not registered")
        return
    if CONNECTOR_NAME in KVConnectorFactory._registry:
        return
    KVConnectorFactory.register_connector(CONNECTOR_NAME, "pegaflow.connector", CONNECTOR_NAME)
