"""``pdserve up`` with its own embedded Ray cluster (no ``--address``): in the foreground until
Ctrl-C, and ``--detach`` + ``pdserve down``. Either way nothing of the cluster may survive:
no process of the head's session, no state file, no temp dir. Stand-in apps keep it quick."""

from __future__ import annotations

import json
import signal
import subprocess
import threading
from pathlib import Path
from typing import Any

import openai
import pytest
from fleet_e2e import PdserveCli, assert_loopback_only, free_port, session_pids, standin_yaml, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]


class _Lines:
    """Collects a pipe's lines on a thread, so waiting for one is bounded."""

    def __init__(self, pipe: Any) -> None:
        self.lines: list[str] = []
        self._thread = threading.Thread(target=self._read, args=(pipe,), daemon=True)
        self._thread.start()

    def _read(self, pipe: Any) -> None:
        for line in pipe:
            self.lines.append(line.rstrip("\n"))

    def wait_for(self, text: str, timeout_s: float) -> None:
        wait_for(lambda: any(text in ln for ln in self.lines), timeout_s=timeout_s,
                 what=f"{text!r} in pdserve's output:\n" + "\n".join(self.lines), interval_s=0.2)


def _state(cli: PdserveCli, name: str) -> dict[str, Any]:
    return dict(json.loads((cli.state_dir / f"fleet-{name}.json").read_text()))


def _assert_all_gone(cli: PdserveCli, name: str, state: dict[str, Any]) -> None:
    wait_for(lambda: not session_pids(state["head_pid"]), timeout_s=60, what="the Ray session to end")
    assert not (cli.state_dir / f"fleet-{name}.json").exists()
    assert not Path(state["head_temp_dir"]).exists()


def _complete(url: str) -> str:
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=30.0)
    return client.completions.create(model="standin", prompt="hello", max_tokens=4).choices[0].text


def test_foreground_up_serves_until_ctrl_c_then_leaves_nothing(
    pdserve_cli: PdserveCli, tmp_path: Path
) -> None:
    port = free_port("127.0.0.1")
    config = standin_yaml(tmp_path / "fleet.yaml", router_port=port, name="fg")
    proc = pdserve_cli.popen("up", "--config", str(config))
    state: dict[str, Any] | None = None
    try:
        out = _Lines(proc.stderr)
        out.wait_for("serving; Ctrl-C to stop", timeout_s=240)
        assert any("fleet 'fg' ready" in ln for ln in out.lines)
        assert any("prefill 1/1 | decode 1/1" in ln for ln in out.lines)  # the progress display
        state = _state(pdserve_cli, "fg")
        assert state["router_url"] == f"http://127.0.0.1:{port}"
        assert_loopback_only(state["head_pid"])
        assert _complete(state["router_url"]).startswith(" decode:")
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=240) == 0, "\n".join(out.lines)
        assert any("stopping the fleet" in ln for ln in out.lines)
        _assert_all_gone(pdserve_cli, "fg", state)
    finally:
        _cleanup(proc, state)


def test_detached_up_then_down_stops_the_embedded_cluster(pdserve_cli: PdserveCli, tmp_path: Path) -> None:
    port = free_port("127.0.0.1")
    config = standin_yaml(tmp_path / "fleet.yaml", router_port=port, name="bg")
    state: dict[str, Any] | None = None
    try:
        up = pdserve_cli("up", "--config", str(config), "--detach", timeout=300)
        assert up.stdout.strip() == f"http://127.0.0.1:{port}"
        state = _state(pdserve_cli, "bg")
        assert session_pids(state["head_pid"])  # the cluster outlives `pdserve up --detach`
        assert _complete(state["router_url"]).startswith(" decode:")
        down = pdserve_cli("down", "--name", "bg", timeout=300)
        assert "down (2 workers removed) and its local Ray cluster" in down.stderr
        _assert_all_gone(pdserve_cli, "bg", state)
    finally:
        _cleanup(None, state)


def _cleanup(proc: subprocess.Popen[str] | None, state: dict[str, Any] | None) -> None:
    """On failure: stop what the test started (the CLI, then the head's session by pid)."""
    if proc is not None and proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=30)
    if state is not None and session_pids(state["head_pid"]):
        from pdserve.deploy.ray_cluster import LocalRayHead

        LocalRayHead(state["router_url"], state["head_pid"], state["head_temp_dir"], True).stop(timeout_s=60)
