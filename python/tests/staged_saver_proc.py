"""A worker that saves through its staging buffer round after round until it is killed
(the torn-block test kills it mid-save), and the KV content both it and the test rebuild
from one seed.

Usage: python staged_saver_proc.py ENDPOINT DEVICE SEED
Prints ``saved R`` once round R's save is done.
"""

from __future__ import annotations

import hashlib
import sys
from typing import Any

LAYERS, BLOCKS, BLOCK_ROW = 3, 96, 8192  # a block: 3 layers x 8192 float32 (96 KiB)
SAVE_BLOCKS = 48
"""Blocks a round saves: through 8-block staging chunks, one save is many RPCs."""
STAGING_BYTES = 32 * LAYERS * BLOCK_ROW * 4  # 32 slots: chunks of 8 blocks
MODEL = {"model": "torn-save-test"}


def caches(device: str, seed: int) -> dict[str, Any]:
    """The per-layer KV tensors, the same bytes in every process for one seed."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    return {
        f"model.layers.{i}.attn": torch.rand(BLOCKS, BLOCK_ROW, generator=generator).to(device)
        for i in range(LAYERS)
    }


def round_blocks(round_: int) -> list[int]:
    """The KV blocks round ``round_`` saves (a different run of blocks each round)."""
    return [(5 * i + 11 * round_) % BLOCKS for i in range(SAVE_BLOCKS)]


def round_hashes(seed: int, round_: int) -> list[bytes]:
    return [hashlib.sha256(f"{seed}/{round_}/{i}".encode()).digest() for i in range(SAVE_BLOCKS)]


def kill_mid_save_and_check(endpoint: str, device: str, seed: int) -> tuple[int, int]:
    """Runs this file as a saver, kills it with SIGKILL while it saves, then loads what
    the server returns for every round it may have saved into other blocks and checks
    each byte. Returns (the last round it reported done, blocks served of the next)."""
    import os
    import random
    import subprocess
    import time

    import torch

    from pegaflow.connector.config import ConnectorConfig
    from pegaflow.connector.metadata import LoadJob, PegaConnectorMetadata
    from pegaflow.connector.worker import WorkerSide

    proc = subprocess.Popen(
        [sys.executable, os.path.abspath(__file__), endpoint, device, str(seed)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    try:
        first = proc.stdout.readline()  # the first round done: the next one is running
        assert first == "saved 0\n", f"the saver did not get going: {first!r}"
        time.sleep(random.uniform(0.0, 0.005))
    finally:
        proc.kill()
        rest = proc.communicate(timeout=30)[0]
    done = max(
        [0] + [int(line.split()[1]) for line in rest.splitlines() if line.startswith("saved")]
    )

    expected = caches(device, seed)
    mine = {name: t.clone() for name, t in expected.items()}
    config = ConnectorConfig(instance_id=f"checker-{seed}", endpoint=endpoint, staging="off")
    worker = WorkerSide(config, 0, 1, MODEL)
    try:
        worker.register_kv_caches(mine, BLOCKS)
        client = worker.link.client if worker.link else None
        assert client is not None
        served_after = 0
        for round_ in range(done + 2):
            hit = client.query(config.instance_id, round_hashes(seed, round_))
            if round_ <= done:
                assert hit.hit_blocks == SAVE_BLOCKS, f"round {round_} was saved whole"
            if not hit.hit_blocks:
                continue
            assert hit.lease_id is not None
            src = round_blocks(round_)[: hit.hit_blocks]
            dst = [b for b in range(BLOCKS) if b not in set(round_blocks(round_))][: len(src)]
            for t in mine.values():
                t[dst] = 0
            worker.start_load_kv(PegaConnectorMetadata(loads=[LoadJob("check", hit.lease_id, dst)]))
            deadline = time.monotonic() + 30
            finished: set[str] = set()
            while not finished and time.monotonic() < deadline:
                finished = worker.get_finished(set())[1]
                time.sleep(0.002)
            assert finished == {"check"} and worker.take_load_errors() == set()
            if device == "cuda":
                torch.cuda.synchronize()
            for name, t in mine.items():
                assert torch.equal(t[dst], expected[name][src]), f"a torn block in round {round_}"
            for t, original in zip(mine.values(), expected.values(), strict=True):
                t[dst] = original[dst]
            if round_ > done:
                served_after = int(hit.hit_blocks)
        return done, served_after
    finally:
        worker.shutdown()


def main() -> None:
    from pegaflow.connector.config import ConnectorConfig
    from pegaflow.connector.metadata import PegaConnectorMetadata, SaveJob
    from pegaflow.connector.worker import WorkerSide

    endpoint, device, seed = sys.argv[1], sys.argv[2], int(sys.argv[3])
    config = ConnectorConfig(
        instance_id=f"saver-{seed}", endpoint=endpoint, staging="on", staging_bytes=STAGING_BYTES
    )
    worker = WorkerSide(config, 0, 1, MODEL)
    worker.register_kv_caches(caches(device, seed), BLOCKS)
    assert worker.staging is not None
    round_ = 0
    while True:
        job = SaveJob(round_blocks(round_), round_hashes(seed, round_), [f"r{round_}"])
        worker.wait_for_save(PegaConnectorMetadata(save=job))
        assert worker.drain(30.0)
        print(f"saved {round_}", flush=True)
        round_ += 1


if __name__ == "__main__":
    main()
