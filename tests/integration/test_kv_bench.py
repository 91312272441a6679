"""`pdserve bench kv` runs end to end on a tiny layout and ends with the JSON line it promises."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]


def test_bench_kv_smoke() -> None:
    cmd = [
        sys.executable,
        "-m",
        "pdserve",
        "--log-level=warning",
        "bench",
        "kv",
        "--tokens",
        "32,64",
        "--layers",
        "2",
        "--kv-heads",
        "2",
        "--head-dim",
        "32",
        "--repeat",
        "1",
        "--layer-ms",
        "1",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=170, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.strip().splitlines()
    result = json.loads(lines[-1])
    assert set(result["ratio_vs_limit"]) == {"shm", "tcp"}
    assert all(r > 0 for r in result["ratio_vs_limit"].values())
    assert result["limits"] == {"shm": "memcpy", "tcp": "raw_socket"}
    assert set(result["streaming"]) == {"shm", "tcp"}
    assert any("ratio" in line for line in lines[:-1])
