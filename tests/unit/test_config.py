"""pdserve.config: YAML + env composition and one clear error line per bad field."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest

from pdserve.config import PdserveConfig, apply_env_overrides, dump_config, load_config, parse_config
from pdserve.errors import ConfigError

pytestmark = pytest.mark.unit


def _error(data: dict[str, object]) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        parse_config(data)
    return info.value


def test_no_file_is_the_default_fleet() -> None:
    cfg = load_config()
    assert (cfg.fleet.prefill.replicas, cfg.fleet.decode.replicas) == (1, 1)
    assert (cfg.router.host, cfg.router.port) == ("127.0.0.1", 8000)
    assert cfg.engine.model is None  # the tiny default model
    assert not cfg.uses_gpu


def test_yaml_sections_are_applied(tmp_path: Path) -> None:
    path = tmp_path / "fleet.yaml"
    path.write_text(
        "fleet:\n  prefill: {replicas: 2, num_cpus: 2}\n  decode:\n    replicas: 3\n"
        "router:\n  port: 9000\n  policy: {prefill: round_robin}\nkvtransfer:\n  transport: shm\n"
    )
    cfg = load_config(path)
    assert cfg.fleet.prefill.replicas == 2 and cfg.fleet.prefill.num_cpus == 2.0
    assert cfg.fleet.decode.replicas == 3
    assert cfg.router.port == 9000 and cfg.router.policy.prefill == "round_robin"
    assert cfg.kvtransfer.transport == "shm"


def test_empty_file_means_defaults(tmp_path: Path) -> None:
    path = tmp_path / "empty.yaml"
    path.write_text("# nothing\n")
    assert load_config(path) == load_config()


def test_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"nope.yaml.*does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_invalid_yaml_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("fleet:\n  prefill: {replicas: 2\n")
    with pytest.raises(ConfigError, match=r"not valid YAML at line \d+"):
        load_config(path)


def test_top_level_must_be_a_mapping(tmp_path: Path) -> None:
    path = tmp_path / "list.yaml"
    path.write_text("- fleet\n")
    with pytest.raises(ConfigError, match=r"must be a mapping of sections"):
        load_config(path)


def test_unknown_key_names_the_path_and_suggests() -> None:
    err = _error({"fleet": {"prefil": {"replicas": 2}}})
    assert "fleet.prefil: unknown key (did you mean 'prefill'?)" in str(err)
    assert "allowed keys:" in str(err) and "decode" in str(err)
    assert err.details["param"] == "fleet.prefil"


def test_unknown_section_is_named() -> None:
    err = _error({"flet": {}})
    assert "flet: unknown key (did you mean 'fleet'?)" in str(err)


def test_bad_value_names_field_and_value() -> None:
    err = _error({"fleet": {"decode": {"replicas": -1}}})
    assert "fleet.decode.replicas: Input should be greater than or equal to 0 (got -1)" in str(err)


def test_every_bad_field_is_reported_in_one_error() -> None:
    err = _error(
        {"fleet": {"decode": {"replicas": -1}, "prefill": {"num_cpus": "lots"}}, "router": {"port": 0.5}}
    )
    text = str(err)
    for path in ("fleet.decode.replicas", "fleet.prefill.num_cpus", "router.port"):
        assert path in text
    assert text.count("; ") >= 2


def test_section_validator_messages_are_relocated_to_the_field() -> None:
    err = _error({"fleet": {"decode": {"replicas": 0}}})
    assert str(err).startswith("invalid config (<dict>): fleet.decode.replicas: PD disaggregation needs")
    assert err.details["param"] == "fleet.decode.replicas"


def test_tensor_parallel_on_cpu_is_impossible() -> None:
    err = _error({"fleet": {"prefill": {"tp_size": 2}}})
    assert "fleet.prefill.tp_size: 2 tensor-parallel ranks need GPUs" in str(err)
    cfg = parse_config({"engine": {"device": "cuda"}, "fleet": {"prefill": {"tp_size": 2}}})
    assert cfg.uses_gpu and cfg.fleet.prefill.bundle(gpu=True)["GPU"] == 2.0


def test_worker_port_may_not_be_the_router_port() -> None:
    err = _error({"fleet": {"decode": {"port": 8000}}})
    assert "fleet.decode.port: 8000 is also router.port" in str(err)


def test_env_overrides_apply_once_with_types() -> None:
    env = {
        "PDSERVE_FLEET__PREFILL__REPLICAS": "3",
        "PDSERVE_ROUTER__PORT": "9100",
        "PDSERVE_FLEET__PREFILL__RESOURCES": "{prefill_node: 1}",
        "PDSERVE_KVTRANSFER__CHECKSUM": "true",
        "PDSERVE_LOG_LEVEL": "debug",  # no section path: not a config override
        "OTHER__THING": "x",
    }
    cfg = load_config(env=env)
    assert cfg.fleet.prefill.replicas == 3
    assert cfg.router.port == 9100
    assert cfg.fleet.prefill.resources == {"prefill_node": 1.0}
    assert cfg.kvtransfer.checksum is True


def test_env_overrides_beat_the_file(tmp_path: Path) -> None:
    path = tmp_path / "f.yaml"
    path.write_text("fleet: {decode: {replicas: 2, num_cpus: 2}}\n")
    cfg = load_config(path, env={"PDSERVE_FLEET__DECODE__REPLICAS": "5"})
    assert cfg.fleet.decode.replicas == 5 and cfg.fleet.decode.num_cpus == 2.0


def test_env_errors_name_the_variable() -> None:
    from_env = r"fleet.decode.replicas: .* \[from PDSERVE_FLEET__DECODE__REPLICAS\]"
    with pytest.raises(ConfigError, match=from_env):
        load_config(env={"PDSERVE_FLEET__DECODE__REPLICAS": "many"})
    with pytest.raises(ConfigError, match=r"PDSERVE_FLET__X: unknown section 'flet'"):
        load_config(env={"PDSERVE_FLET__X": "1"})
    with pytest.raises(ConfigError, match=r"empty path segment"):
        load_config(env={"PDSERVE_FLEET____X": "1"})


def test_env_path_through_a_scalar_is_refused() -> None:
    data: dict[str, object] = {"router": {"port": 1}}
    with pytest.raises(ConfigError, match=r"router.port is not a mapping"):
        apply_env_overrides(data, {"PDSERVE_ROUTER__PORT__X": "1"})


def test_no_env_is_read_unless_given(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PDSERVE_ROUTER__PORT", "9999")
    assert load_config().router.port == 8000


def test_dump_round_trips(tmp_path: Path) -> None:
    cfg = parse_config({"fleet": {"decode": {"replicas": 4, "resources": {"decode_node": 1}}}})
    path = tmp_path / "dump.yaml"
    path.write_text(dump_config(cfg))
    assert load_config(path) == cfg


def test_config_error_survives_pickling() -> None:
    err = _error({"fleet": {"decode": {"replicas": -1}}})
    back = pickle.loads(pickle.dumps(err))
    assert str(back) == str(err) and back.details == err.details


def test_sections_are_frozen() -> None:
    cfg = PdserveConfig()
    with pytest.raises(ValueError):
        cfg.fleet.prefill.replicas = 5  # type: ignore[misc]
