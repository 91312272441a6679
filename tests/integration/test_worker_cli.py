"""``pdserve worker`` as a process: bad flags are one ``pdserve: error:`` line (no traceback, no
model load), a prefill worker listens on its bootstrap port, and a decode worker's shared-memory
KV pool exists while it runs and is gone after a graceful SIGTERM (exit status 0)."""

from __future__ import annotations

import glob
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from pdserve.decode_worker.testing import HOST, WorkerProcess, free_port, spawn_worker, stop_all

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]


def worker_cli(*args: str, timeout_s: float = 120.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pdserve", "--log-level=warning", "worker", *args],
        capture_output=True, text=True, timeout=timeout_s, check=False,
    )  # fmt: skip


@pytest.mark.parametrize(
    "case", ["missing_model", "tiny_pool", "nccl_on_cpu", "bad_block_size", "port_taken"]
)
def test_bad_flags_are_one_error_line(case: str, tmp_path: Path, default_model_dir: Path) -> None:
    model = ["--model", str(default_model_dir)]
    holder: socket.socket | None = None
    if case == "missing_model":
        args, want = ["--model", str(tmp_path / "nope")], "does not exist"
    elif case == "tiny_pool":
        args, want = [*model, "--num-blocks", "2", "--max-model-len", "1024"], "cannot hold one sequence"
    elif case == "nccl_on_cpu":
        args, want = [*model, "--role", "decode", "--transport", "nccl"], "nccl"
    elif case == "bad_block_size":
        args, want = [*model, "--block-size", "0"], "block_size"
    else:
        holder = socket.socket()
        holder.bind((HOST, 0))
        holder.listen()
        args, want = [*model, "--port", str(holder.getsockname()[1])], "cannot listen"
    try:
        proc = worker_cli("--host", HOST, *args)
    finally:
        if holder is not None:
            holder.close()
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert lines[-1].startswith("pdserve: error: ") and want in lines[-1], proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.fixture(scope="module")
def pair(
    default_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[WorkerProcess, WorkerProcess]]:
    logs = tmp_path_factory.mktemp("worker-cli-logs")
    args = ["--model", str(default_model_dir), "--num-blocks", "64", "--max-model-len", "512"]
    prefill = spawn_worker("prefill", logs, transport="shm", extra_args=args, bootstrap_port=free_port())
    decode = spawn_worker("decode", logs, transport="shm", extra_args=args)
    try:
        prefill.wait_ready(180.0)
        decode.wait_ready(180.0)
        yield prefill, decode
    finally:
        stop_all([prefill, decode])


def test_prefill_listens_on_its_bootstrap_port(pair: tuple[WorkerProcess, WorkerProcess]) -> None:
    prefill, _ = pair
    assert prefill.bootstrap_port is not None
    with socket.create_connection((HOST, prefill.bootstrap_port), timeout=5.0):
        pass  # what smg's probe does


def test_decode_shm_pool_is_unlinked_on_sigterm(pair: tuple[WorkerProcess, WorkerProcess]) -> None:
    prefill, decode = pair
    segments = glob.glob(f"/dev/shm/pdserve-kv-{decode.proc.pid}-*")
    assert len(segments) == 1, segments
    assert decode.stop() == 0
    assert prefill.stop() == 0
    assert not Path(segments[0]).exists()
    assert "Traceback" not in decode.log_path.read_text() + prefill.log_path.read_text()
