"""FleetConfig, resource bundles and the placement pre-flight checks."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from pdserve.config import parse_config
from pdserve.deploy.config import AppConfig, FleetConfig, WorkerGroupConfig
from pdserve.deploy.placement import (
    actor_error_summary,
    alive_node_resources,
    check_fits,
    check_model,
    local_cluster_cpus,
)
from pdserve.errors import ConfigError

pytestmark = pytest.mark.unit

CPU_NODE = {"CPU": 8.0, "memory": 16 * 1024.0**3, "node:127.0.0.1": 1.0}


def fleet(**data: object) -> FleetConfig:
    return parse_config({"fleet": data}).fleet


def test_bundle_per_worker() -> None:
    g = WorkerGroupConfig(num_cpus=4, tp_size=8, memory_gb=64, resources={"decode_node": 1})
    assert g.bundle(gpu=True) == {"CPU": 4.0, "GPU": 8.0, "memory": 64 * 1024.0**3, "decode_node": 1.0}
    cpu = WorkerGroupConfig(num_cpus=0)
    assert cpu.bundle(gpu=False) == {}  # zero amounts are left out


@pytest.mark.parametrize("name", ["CPU", "GPU", "memory"])
def test_reserved_resource_names_are_refused(name: str) -> None:
    with pytest.raises(ValidationError, match=r"is set by num_cpus/tp_size/memory_gb"):
        WorkerGroupConfig(resources={name: 1})


def test_resource_amounts_must_be_positive() -> None:
    with pytest.raises(ValidationError, match=r"positive amount"):
        WorkerGroupConfig(resources={"x": 0})


def test_app_factory_import_string() -> None:
    assert AppConfig(factory="pdserve.deploy.standin:build_worker_app").factory.endswith(":build_worker_app")
    for bad in ("pdserve.deploy.standin", "a:b:c", ":x", "mod:1x"):
        with pytest.raises(ValidationError, match=r"package.module:function"):
            AppConfig(factory=bad)
    with pytest.raises(ValidationError, match=r"set by the fleet"):
        AppConfig(factory="m:f", kwargs={"port": 1})


def test_app_for_prefers_the_role_override() -> None:
    f = fleet(decode={"app": {"factory": "m:decode_app"}}, router={"app": {"factory": "m:router_app"}})
    assert f.app_for("decode").factory == "m:decode_app"
    assert f.app_for("prefill").factory == "pdserve.deploy.apps:build_worker_app"
    assert f.app_for("router").factory == "m:router_app"
    with pytest.raises(ValueError, match=r"unknown role"):
        f.group("router")


def test_fits_on_one_cpu_node() -> None:
    check_fits(fleet(), [CPU_NODE])


def test_gpu_bundle_without_gpus_names_tp_size() -> None:
    cfg = parse_config({"engine": {"device": "cuda"}, "fleet": {"decode": {"tp_size": 4}}})
    with pytest.raises(ConfigError) as info:
        check_fits(cfg.fleet, [CPU_NODE], gpu=cfg.uses_gpu)
    assert str(info.value).startswith("fleet.prefill.tp_size: a prefill worker needs 1 GPU on one node")
    with pytest.raises(ConfigError, match=r"fleet.decode.tp_size: a decode worker needs 4 GPU"):
        check_fits(cfg.fleet, [{**CPU_NODE, "GPU": 2.0}], gpu=True)
    check_fits(cfg.fleet, [{**CPU_NODE, "GPU": 8.0}], gpu=True)


def test_missing_custom_resource_names_it() -> None:
    f = fleet(prefill={"resources": {"prefill_node": 1}})
    with pytest.raises(ConfigError, match=r"fleet.prefill.resources.prefill_node: .* has 0 prefill_node"):
        check_fits(f, [CPU_NODE])


def test_too_big_for_any_node_names_num_cpus() -> None:
    with pytest.raises(ConfigError, match=r"fleet.decode.num_cpus: a decode worker needs 16 CPU"):
        check_fits(fleet(decode={"num_cpus": 16}), [CPU_NODE, CPU_NODE])


def test_whole_fleet_over_cluster_totals_names_replicas() -> None:
    f = fleet(prefill={"replicas": 4, "num_cpus": 2}, decode={"replicas": 4, "num_cpus": 2})
    fields = r"fleet.prefill.replicas/fleet.decode.replicas: the fleet needs 17 CPU"
    with pytest.raises(ConfigError, match=fields):
        check_fits(f, [CPU_NODE])
    check_fits(f, [CPU_NODE, CPU_NODE, CPU_NODE])
    # scale asks with other counts than the config's
    with pytest.raises(ConfigError, match=r"needs 41 CPU"):
        check_fits(f, [CPU_NODE, CPU_NODE], replicas={"decode": 16})


def test_no_alive_node() -> None:
    nodes = alive_node_resources([{"Alive": False, "Resources": CPU_NODE}])
    with pytest.raises(ConfigError, match=r"no alive node"):
        check_fits(fleet(), nodes)


def test_local_cluster_cpus_leaves_room_to_scale() -> None:
    assert local_cluster_cpus(fleet()) == 8
    assert local_cluster_cpus(fleet(prefill={"replicas": 4, "num_cpus": 2}, decode={"replicas": 4})) == 28


def test_check_model(tmp_path: Path) -> None:
    check_model(None)
    with pytest.raises(ConfigError, match=r"engine.model: .* is not a directory"):
        check_model(str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match=r"engine.model: .* has no config.json"):
        check_model(str(tmp_path))
    (tmp_path / "config.json").write_text("{}")
    check_model(str(tmp_path))


def test_actor_error_summary_keeps_the_cause_line() -> None:
    text = (
        "The actor died because of an error raised in its creation task\n  File \"x.py\", line 1\n"
        "pdserve.errors.ConfigError: app factory 'm:f': cannot import 'm'\n"
    )
    assert actor_error_summary(RuntimeError(text)) == "ConfigError: app factory 'm:f': cannot import 'm'"
    assert actor_error_summary(TimeoutError()) == "TimeoutError"
