"""``pdserve up/status/scale/down`` refuse broken input with one clear line naming the field,
before any Ray process starts (in-process ``main``; nothing here opens a socket)."""

from __future__ import annotations

from pathlib import Path

import pytest

from pdserve.cli import main
from pdserve.deploy.ray_cluster import FleetState, state_path

pytestmark = pytest.mark.unit


@pytest.fixture(autouse=True)
def _state_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    state = tmp_path / "state"
    monkeypatch.setenv("PDSERVE_STATE_DIR", str(state))
    for name in ("PDSERVE_FLEET__PREFILL__REPLICAS", "PDSERVE_ROUTER__PORT"):
        monkeypatch.delenv(name, raising=False)
    return state


def _up_error(tmp_path: Path, yaml_text: str, capsys: pytest.CaptureFixture[str]) -> str:
    path = tmp_path / "fleet.yaml"
    path.write_text(yaml_text)
    assert main(["up", "--config", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_unknown_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    line = _up_error(tmp_path, "fleet:\n  decode:\n    replica: 2\n", capsys)
    assert line.startswith("pdserve: error: invalid config (")
    assert "fleet.decode.replica: unknown key (did you mean 'replicas'?)" in line


def test_impossible_resources(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    line = _up_error(tmp_path, "fleet:\n  decode:\n    resources: {decode_gpu_node: 1}\n", capsys)
    want = "fleet.decode.resources.decode_gpu_node: a decode worker needs 1 decode_gpu_node on one node"
    assert want in line
    line = _up_error(tmp_path, "fleet:\n  ray: {num_cpus: 2}\n  prefill: {num_cpus: 4}\n", capsys)
    assert "fleet.prefill.num_cpus: a prefill worker needs 4 CPU on one node" in line


def test_missing_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    line = _up_error(tmp_path, f"engine:\n  model: {tmp_path / 'no-such-model'}\n", capsys)
    assert "engine.model: " in line and "is not a directory" in line


def test_env_override_error_names_the_variable(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PDSERVE_FLEET__PREFILL__REPLICAS", "-2")
    line = _up_error(tmp_path, "", capsys)
    assert "fleet.prefill.replicas: " in line and "[from PDSERVE_FLEET__PREFILL__REPLICAS]" in line


def test_up_refuses_a_second_fleet_of_the_same_name(
    tmp_path: Path, _state_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    FleetState(name="pdserve", address="10.0.0.1:6379", namespace="pdserve",
               router_url="http://10.0.0.1:8000").save(state_path(_state_dir, "pdserve"))
    assert main(["up"]) == 2
    assert "fleet 'pdserve' is already up" in capsys.readouterr().err


def test_commands_without_a_known_fleet(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["status"], ["down"], ["scale", "--decode", "2"]):
        assert main(argv) == 2
        assert "no fleet 'pdserve' known here" in capsys.readouterr().err
    assert main(["scale"]) == 2
    assert "give --prefill N and/or --decode M" in capsys.readouterr().err


def test_state_file_round_trip(tmp_path: Path) -> None:
    path = state_path(tmp_path, "x")
    state = FleetState(name="x", address="127.0.0.1:1", namespace="pdserve", router_url="http://127.0.0.1:8000",
                       head_pid=123, head_temp_dir="/tmp/t", head_owns_temp_dir=True, created_at=1.0)
    state.save(path)
    assert FleetState.load(path) == state
    head = state.head()
    assert head is not None and (head.pid, head.address) == (123, "127.0.0.1:1")
    assert FleetState.load(tmp_path / "missing.json") is None
    path.write_text("{not json")
    with pytest.raises(Exception, match="unreadable"):
        FleetState.load(path)
