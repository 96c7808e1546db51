"""docs/metrics.md, the Grafana dashboard and the Prometheus scrape config against a
live server: the document lists exactly what /metrics exports (names, types, labels),
the dashboard names only exported metrics, and a real Prometheus (Debian's package)
scrapes the server with the example configuration."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
import urllib.parse
from pathlib import Path
from typing import Any

import pytest
from conftest import KvFactory, ServerHandle, free_port, http_get
from e2e_helpers import random_hashes

from pegaflow import PegaflowInvalidArgument

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "metrics.md"
EXAMPLES = ROOT / "examples" / "metrics"
HISTOGRAM_SERIES = ("_bucket", "_sum", "_count")


def exported(server: ServerHandle) -> dict[str, tuple[str, frozenset[str]]]:
    """/metrics as {queried name: (type, label keys)}: counters with their `_total`."""
    status, _, body = http_get(server.metrics_url)
    assert status == 200, body
    types: dict[str, str] = {}
    labels: dict[str, set[str]] = {}
    for line in body.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ", 3)
            types[name] = kind
        elif line and not line.startswith("#"):
            sample = re.match(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(\{([^}]*)\})?", line)
            assert sample, line
            name, keys = sample.group(1), re.findall(r'([a-zA-Z_]+)="', sample.group(3) or "")
            for family in types:
                if name == family or (
                    name.startswith(family) and name[len(family) :] in ("_total", *HISTOGRAM_SERIES)
                ):
                    labels.setdefault(family, set()).update(k for k in keys if k != "le")
    out = {}
    for family, kind in types.items():
        queried = family + "_total" if kind == "counter" else family
        out[queried] = (kind, frozenset(labels.get(family, set())))
    return out


def documented() -> dict[str, tuple[str, frozenset[str]]]:
    """docs/metrics.md's tables as {name: (type, label keys)}."""
    out = {}
    for line in DOC.read_text().splitlines():
        row = re.match(r"\| `(pegaflow_[a-z_]+)` \| (\w+) \|([^|]*)\|", line)
        if row:
            keys = frozenset(re.findall(r"`([a-z_]+)`", row.group(3)))
            assert row.group(1) not in out, f"{row.group(1)} listed twice"
            out[row.group(1)] = (row.group(2), keys)
    assert len(out) > 20, "the document's tables were not found"
    return out


def exercise(server: ServerHandle, kv_cache: KvFactory) -> None:
    """One save, query and load, so every labelled series exists (RPC series appear
    with their first call)."""
    client = server.client()
    kv = kv_cache(num_blocks=8, seed=5)
    client.register_kv_layers("metrics", "ns", 0, 1, kv.layer_specs())
    hashes = random_hashes(4)
    client.save("metrics", 0, [0, 1, 2, 3], hashes)
    q = client.query("metrics", hashes)
    assert q.lease_id is not None
    client.release_lease(q.lease_id)
    with pytest.raises(PegaflowInvalidArgument):
        client.query("metrics", [b"short"])
    client.health()


def test_the_document_lists_exactly_the_exported_metrics(
    server: ServerHandle, kv_cache: KvFactory
) -> None:
    exercise(server, kv_cache)
    have, doc = exported(server), documented()
    assert sorted(set(have) - set(doc)) == [], "exported but not in docs/metrics.md"
    assert sorted(set(doc) - set(have)) == [], "in docs/metrics.md but not exported"
    for name, (kind, keys) in doc.items():
        assert have[name] == (kind, keys), (
            f"{name}: /metrics says {have[name]}, the document {(kind, keys)}"
        )
    metrics = server.metrics()
    rpc = "pegaflow_rpc_duration_seconds_count"
    assert metrics[f'{rpc}{{method="Save",code="OK"}}'] == 1
    assert metrics[f'{rpc}{{method="Query",code="InvalidArgument"}}'] == 1
    assert metrics['pegaflow_lookups_total{outcome="hit"}'] == 1
    assert metrics['pegaflow_lookup_blocks_total{tier="ram"}'] == 4
    assert metrics['pegaflow_admitted_blocks_total{tier="ram"}'] == 4
    assert metrics['pegaflow_transfer_bytes_count{direction="save",backend="host"}'] == 1


def test_the_dashboard_names_only_exported_metrics(
    server: ServerHandle, kv_cache: KvFactory
) -> None:
    exercise(server, kv_cache)
    have = exported(server)
    histograms = {n for n, (kind, _) in have.items() if kind == "histogram"}
    dashboard = json.loads((EXAMPLES / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    assert len(exprs) >= 10
    used = set()
    for expr in exprs:
        for name in re.findall(r"pegaflow_[a-z_]+", expr):
            base = next(
                (
                    name[: -len(s)]
                    for s in HISTOGRAM_SERIES
                    if name.endswith(s) and name[: -len(s)] in histograms
                ),
                name,
            )
            used.add(base)
    assert sorted(used - set(have)) == [], "the dashboard names metrics the server does not export"
    titles = " ".join(p["title"].lower() for p in dashboard["panels"])
    for topic in ("hit ratio", "gb/s", "p99", "pool", "evictions", "rejections"):
        assert topic in titles, f"no panel for {topic}"


def prometheus_get(base: str, path: str, **params: str) -> Any:
    """GET one of Prometheus' HTTP API endpoints; its `data` part."""
    status, _, body = http_get(f"{base}{path}?{urllib.parse.urlencode(params)}")
    assert status == 200, body
    reply: dict[str, Any] = json.loads(body)
    assert reply["status"] == "success", reply
    return reply["data"]


def test_a_real_prometheus_scrapes_the_server(server: ServerHandle, tmp_path: Path) -> None:
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.fail(
            "Prometheus is not installed: apt-get install prometheus (scripts/test.sh does)"
        )
    config = (EXAMPLES / "prometheus.yml").read_text()
    assert '"127.0.0.1:9091"' in config
    config = config.replace('"127.0.0.1:9091"', f'"{server.http_addr}"').replace("15s", "1s")
    (tmp_path / "prometheus.yml").write_text(config)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log = (tmp_path / "prometheus.log").open("w")
    proc = subprocess.Popen(
        [
            binary,
            f"--config.file={tmp_path / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp_path / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, (tmp_path / "prometheus.log").read_text()
            try:
                targets = prometheus_get(base, "/api/v1/targets")["activeTargets"]
                pool = prometheus_get(base, "/api/v1/query", query="pegaflow_pool_capacity_bytes")[
                    "result"
                ]
                if targets and targets[0]["health"] == "up" and pool:
                    break
            except OSError:
                pass  # not listening yet
            assert time.monotonic() < deadline, (
                f"target never up: {(tmp_path / 'prometheus.log').read_text()[-2000:]}"
            )
            time.sleep(0.5)
        assert targets[0]["labels"]["job"] == "pegaflow"
        assert targets[0]["scrapeUrl"] == server.metrics_url
        assert float(pool[0]["value"][1]) == server.metric("pegaflow_pool_capacity_bytes") > 0
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()
