"""The paced gather kernel (saves through the staging buffer on a GPU), run by Triton's
interpreter on the CPU: byte-exact against torch's indexing for every element width the
staging buffer uses, any number of programs, rows that are not a whole number of pieces,
and views into a wider buffer (nothing outside the rows is written)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

from conftest import require_module

torch = require_module("torch")
require_module("triton")

_CHECK = textwrap.dedent(
    """
    import torch
    from pegaflow.connector.paced_gather import PIECE_ELEMENTS, paced_gather

    generator = torch.Generator().manual_seed(7)
    cases = [
        (torch.int64, 3 * PIECE_ELEMENTS + 5, 3),  # rows of 3 pieces and a bit
        (torch.int32, PIECE_ELEMENTS, 1),  # one program does everything
        (torch.int16, 40, 8),  # fewer pieces than programs
        (torch.uint8, 777, 5),
    ]
    for dtype, row, programs in cases:
        src = torch.randint(-100, 100, (50, row), generator=generator).to(dtype)
        buffer = torch.zeros(12, row + 64, dtype=dtype)
        out = buffer[:, 32 : 32 + row]  # a column of the staging buffer, as registered
        index = torch.tensor([7, 3, 49, 0, 7, 12], dtype=torch.long)
        paced_gather(src, index, out, programs=programs)
        assert torch.equal(out[:6], src[index]), (dtype, row, programs)
        assert not buffer[:, :32].any() and not buffer[:, 32 + row :].any()
        assert not out[6:].any(), "slots past the index are left alone"
        paced_gather(src, index[:0], out, programs=programs)  # nothing to copy
    try:
        paced_gather(src, index, out[:, 1:])
    except ValueError as e:
        assert "cannot gather" in str(e)
    else:
        raise AssertionError("a narrower destination was accepted")
    print("ok")
    """
)


def test_paced_gather_copies_exactly_the_indexed_rows(tmp_path: Path) -> None:
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run(  # elsewhere than the source tree: the installed package
        [sys.executable, "-c", _CHECK],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "ok"


def test_paced_gathers_are_for_cuda_devices_only() -> None:
    from pegaflow.connector import paced_gather

    assert not paced_gather.available(torch.device("cpu"))
    assert paced_gather.available(torch.device("cuda", 0))
