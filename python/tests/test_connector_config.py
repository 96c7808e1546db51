"""Connector settings from vLLM's extra config and the environment (no vLLM)."""

from __future__ import annotations

import pytest

from pegaflow.connector.config import DEFAULT_ENDPOINT, ConnectorConfig


def test_defaults_come_from_the_engine_id() -> None:
    cfg = ConnectorConfig.from_sources({}, env={}, engine_id="engine-1")
    assert cfg.instance_id == "engine-1"
    assert cfg.endpoint == DEFAULT_ENDPOINT == "127.0.0.1:50055"
    assert cfg.load_failure_policy == "recompute"
    assert cfg.namespace is None


def test_environment_then_extra_config_take_precedence() -> None:
    env = {"PEGAFLOW_ENGINE_ENDPOINT": "10.0.0.1:7000", "PEGAFLOW_INSTANCE_ID": "from-env"}
    cfg = ConnectorConfig.from_sources({}, env=env, engine_id="engine-1")
    assert (cfg.endpoint, cfg.instance_id) == ("10.0.0.1:7000", "from-env")
    cfg = ConnectorConfig.from_sources(
        {"endpoint": "10.0.0.2:7001", "instance_id": "from-extra"}, env=env, engine_id="e"
    )
    assert (cfg.endpoint, cfg.instance_id) == ("10.0.0.2:7001", "from-extra")


def test_values_are_converted_from_strings() -> None:
    cfg = ConnectorConfig.from_sources(
        {"timeout_s": "2.5", "lease_ttl_ms": "4000", "min_load_blocks": 2, "namespace": "shared"},
        env={},
        engine_id="e",
    )
    assert cfg.timeout_s == 2.5
    assert cfg.lease_ttl_ms == 4000
    assert cfg.min_load_blocks == 2
    assert cfg.namespace == "shared"


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"endpont": "x:1"}, "unknown PegaKVConnector option"),
        ({"timeout_s": "soon"}, "timeout_s: expected float"),
        ({"timeout_s": 0}, "timeout_s must be > 0"),
        ({"lease_ttl_ms": 1.5}, "lease_ttl_ms: expected int"),
        ({"lease_ttl_ms": -1}, "lease_ttl_ms must be in"),
        ({"lease_ttl_ms": 600_001}, "lease_ttl_ms must be in"),
        ({"min_load_blocks": 0}, "min_load_blocks must be >= 1"),
        ({"load_failure_policy": "ignore"}, "load_failure_policy must be"),
        ({"endpoint": 5}, "endpoint: expected str"),
        ({"endpoint": ""}, "endpoint must not be empty"),
    ],
)
def test_bad_options_are_refused_with_the_key(extra: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ConnectorConfig.from_sources(extra, env={}, engine_id="e")


def test_an_instance_id_is_required() -> None:
    with pytest.raises(ValueError, match="no instance id"):
        ConnectorConfig.from_sources({}, env={}, engine_id=None)
