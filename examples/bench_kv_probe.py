"""What PegaFlow did during a pass of ``bench_kv_cache.py``, read in the engine's process
(the offline engine runs in-process there).

- :class:`Probe`: the worker's counters and the server's ``/metrics`` before and after,
  so a pass's TTFT splits into the load (as the worker saw it, and the server's copy)
  and the rest.
- :func:`percentile`, :func:`ttft_summary`: what every pass reports.
- :class:`Timeline`: timestamps of one request's way through the connector — the
  scheduler's lookup, the worker's load call, the poll that saw the load done — by
  wrapping those methods of the connector's two halves; the time after that poll is
  vLLM's (scheduling the request, its forward pass, sampling), to set beside the GPU-hit
  floor.
"""

from __future__ import annotations

import statistics
import sys
import time
import urllib.error
from typing import Any


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def ttft_summary(ttft_ms: list[float], batch: list[list[int]]) -> dict[str, Any]:
    """What every TTFT pass reports: mean / p50 / p99, prompt tokens per second, and each
    request's TTFT."""
    return {
        "ttft_mean_ms": round(statistics.fmean(ttft_ms), 2),
        "ttft_p50_ms": round(percentile(ttft_ms, 50), 2),
        "ttft_p99_ms": round(percentile(ttft_ms, 99), 2),
        "prompt_tokens_per_s": round(sum(map(len, batch)) / (sum(ttft_ms) / 1e3)),
        "ttft_ms": [round(t, 2) for t in ttft_ms],
    }


class Probe:
    """PegaFlow's side of a pass: the worker's counters and the server's metrics, read
    before and after it, so TTFT splits into load and the rest."""

    def __init__(self, pegaflow: bool, metrics_addr: str) -> None:
        self.pegaflow = pegaflow
        self.metrics_addr = metrics_addr

    def snapshot(self) -> dict[str, float]:
        if not self.pegaflow:
            return {}
        from vllm.distributed.kv_transfer import get_kv_transfer_group

        worker = get_kv_transfer_group()._worker  # in-process engine: its worker half
        stats = dict(worker.stats()) if worker is not None else {}
        if self.metrics_addr:
            from pegaflow.server import read_metrics

            try:
                metrics = read_metrics(self.metrics_addr)
            except (OSError, urllib.error.URLError) as e:
                print(f"server metrics unreadable: {e}", file=sys.stderr)
                metrics = {}
            for direction in ("load", "save"):
                for name in ("duration_seconds_sum", "duration_seconds_count", "bytes_sum"):
                    stats[f"{direction}_{name}"] = sum(
                        v
                        for k, v in metrics.items()
                        if k.startswith(f"pegaflow_transfer_{name}{{")
                        and f'direction="{direction}"' in k
                    )
            capacity = metrics.get("pegaflow_pool_capacity_bytes", 0.0)
            pinned = metrics.get("pegaflow_pool_dma_ready_bytes", 0.0)
            stats["pool_pinned"] = pinned / capacity if capacity else 0.0
        return stats

    @staticmethod
    def split(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
        if not after:
            return {}
        out: dict[str, Any] = {
            "kv_layout": "cross-layer"
            if after.get("cross_layer")
            else f"per-layer ({after.get('kv_tensors', 0)} tensors)"
            + (", staged" if after.get("staged") else ""),
        }
        loads = after["loads_ok"] - before["loads_ok"]
        out["loads"] = loads
        if loads:
            wait = after["load_wait_s"] - before["load_wait_s"]
            out["load_wait_ms_mean"] = round(wait / loads * 1e3, 2)
        for direction in ("load", "save"):
            count = after.get(f"{direction}_duration_seconds_count", 0) - before.get(
                f"{direction}_duration_seconds_count", 0
            )
            if count:
                seconds = (
                    after[f"{direction}_duration_seconds_sum"]
                    - before[f"{direction}_duration_seconds_sum"]
                )
                moved = after[f"{direction}_bytes_sum"] - before[f"{direction}_bytes_sum"]
                out[f"server_{direction}_ms_mean"] = round(seconds / count * 1e3, 2)
                out[f"server_{direction}_gb_per_s"] = round(moved / seconds / 1e9, 2)
        if "pool_pinned" in before:
            out["pool_pinned_at_start"] = round(before["pool_pinned"], 3)
        return out


class Timeline:
    """Marks of the connector's steps, for requests run one at a time."""

    def __init__(self) -> None:
        self.marks: list[tuple[str, float]] = []

    def install(self) -> None:
        """Wraps the scheduler's lookup and the worker's load call and poll (class-wide, in
        this process)."""
        from pegaflow.connector.scheduler import SchedulerSide
        from pegaflow.connector.worker import WorkerSide

        marks = self.marks
        lookup = SchedulerSide.get_num_new_matched_tokens
        start_load = WorkerSide.start_load_kv
        get_finished = WorkerSide.get_finished

        def timed_lookup(side: SchedulerSide, request: Any, num_computed_tokens: int) -> int | None:
            t0 = time.perf_counter()
            hit = lookup(side, request, num_computed_tokens)
            marks.append(("lookup", t0))
            marks.append(("lookup_end", time.perf_counter()))
            return hit

        def timed_start_load(side: WorkerSide, meta: Any) -> None:
            if meta.loads:
                marks.append(("load_issued", time.perf_counter()))
            start_load(side, meta)

        def timed_get_finished(
            side: WorkerSide, finished_req_ids: set[str]
        ) -> tuple[set[str], set[str]]:
            sending, recving = get_finished(side, finished_req_ids)
            if recving:
                marks.append(("load_seen", time.perf_counter()))
            return sending, recving

        for cls, name, wrapper in (
            (SchedulerSide, "get_num_new_matched_tokens", timed_lookup),
            (WorkerSide, "start_load_kv", timed_start_load),
            (WorkerSide, "get_finished", timed_get_finished),
        ):
            setattr(cls, name, wrapper)

    def request(self, t0: float, t_end: float) -> dict[str, float]:
        """The phases of the request that ran from ``t0`` to ``t_end``, in ms (only those
        it went through), and forgets its marks."""
        marks, self.marks[:] = list(self.marks), []
        first: dict[str, float] = {}
        lookup_s = 0.0
        opened = 0.0
        for name, t in marks:
            first.setdefault(name, t)
            if name == "lookup":
                opened = t
            elif name == "lookup_end":
                lookup_s += t - opened
        out = {"lookup_ms": lookup_s * 1e3}
        if "load_issued" in first and "load_seen" in first:
            out["before_load_ms"] = (first["load_issued"] - t0) * 1e3
            out["load_ms"] = (first["load_seen"] - first["load_issued"]) * 1e3
            out["after_load_ms"] = (t_end - first["load_seen"]) * 1e3
        return out

    @staticmethod
    def summary(phases: list[dict[str, float]]) -> dict[str, float]:
        """Per phase, the mean over the requests that went through it."""
        names = sorted({k for p in phases for k in p})
        return {
            f"{name}_mean": round(statistics.fmean(p[name] for p in phases if name in p), 2)
            for name in names
        }


__all__ = ["Probe", "Timeline", "percentile", "ttft_summary"]
