"""Two vLLM engines in separate processes, each in vLLM's default multi-process mode with
tensor parallelism 2 (scheduler and two workers in different processes), share blocks
through one server. The connector is found by name through the entry point."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from conftest import ServerHandle, require_module
from vllm_helpers import full_blocks, prompt_ids

require_module("vllm")

HERE = Path(__file__).resolve().parent
PROMPT = prompt_ids(11, 300)
ENGINE_TIMEOUT_S = 300


def run_engine(model: Path, endpoint: str, tp: int) -> dict[str, Any]:
    proc = subprocess.run(
        [
            sys.executable,
            str(HERE / "vllm_engine_proc.py"),
            str(model),
            endpoint,
            str(tp),
            json.dumps(PROMPT),
        ],
        capture_output=True,
        text=True,
        timeout=ENGINE_TIMEOUT_S,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, (
        f"engine exited with {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    )
    result: dict[str, Any] = json.loads(lines[-1].removeprefix("RESULT "))
    return result


def test_two_tp2_engines_in_separate_processes_share_blocks(
    server: ServerHandle, tiny_model: Path
) -> None:
    cold = run_engine(tiny_model, server.endpoint, tp=2)
    assert cold["cached"] == 0
    # Each of the 9 full blocks was saved by both ranks before it could hit.
    assert server.metric("pegaflow_saved_blocks_total") >= 2 * 9
    warm = run_engine(tiny_model, server.endpoint, tp=2)
    assert warm["cached"] == full_blocks(len(PROMPT))
    assert warm["tokens"] == cold["tokens"]
    # Both engines are gone: their sessions closed and the server dropped them.
    deadline = time.monotonic() + 20.0
    while server.metric("pegaflow_instances") != 0:
        assert time.monotonic() < deadline, "instances of exited engines still registered"
        time.sleep(0.1)
