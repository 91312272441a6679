"""The static deployment artifacts: deploy/ray (``ray up``) and deploy/k8s (``kubectl apply``).

Schemas: Ray's own cluster-config schema (ray/autoscaler/ray-schema.json, plus Ray's validator),
kubernetes-validate (strict) for core objects and pod templates at a pinned Kubernetes version,
and the upstream CRD schemas stored in tests/data/crds (see its README) for KubeRay and the
Prometheus Operator. Semantics: the fleet config parses with pdserve's loader, every worker group
provides exactly the resources the fleet's placement groups ask for, ports and labels line up.
"""

from __future__ import annotations

import copy
import json
import re
import shlex
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from pdserve.config import PdserveConfig, load_config, parse_config
from pdserve.deploy import placement
from pdserve.deploy.config import ROLES

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
RAY_DIR = ROOT / "deploy" / "ray"
K8S_DIR = ROOT / "deploy" / "k8s"
CRD_DIR = ROOT / "tests" / "data" / "crds"
K8S_VERSION = "1.30.0"  # a widely deployed release kubernetes-validate ships schemas for
NCCL_VARS = ("NCCL_IB_HCA", "NCCL_SOCKET_IFNAME", "NCCL_IB_GID_INDEX", "NCCL_NET_GDR_LEVEL")


# -- Ray cluster launcher config -----------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster() -> dict[str, Any]:
    data = yaml.safe_load((RAY_DIR / "cluster.yaml").read_text())
    assert isinstance(data, dict)
    return data


@pytest.fixture(scope="module")
def ray_fleet() -> PdserveConfig:
    return load_config(RAY_DIR / "fleet.yaml")


def test_cluster_yaml_matches_rays_schema(cluster: dict[str, Any]) -> None:
    import ray

    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    errors = sorted(jsonschema.Draft7Validator(schema).iter_errors(cluster), key=lambda e: list(e.path))
    assert not errors, [f"{list(e.path)}: {e.message}" for e in errors]
    # Ray's own launcher checks on top (defaults merged as `ray up` does; no cloud calls).
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(copy.deepcopy(cluster)))


def test_cluster_yaml_node_types_are_consistent(cluster: dict[str, Any]) -> None:
    types = cluster["available_node_types"]
    assert cluster["head_node_type"] in types
    assert set(types) == {"head", "prefill_gpu", "decode_gpu"}
    assert "GPU" not in types["head"]["resources"], "no worker placement group may land on the head"
    for name, spec in types.items():
        if name == cluster["head_node_type"]:
            continue
        assert 0 <= spec["min_workers"] <= spec["max_workers"], name
    assert sum(t.get("min_workers", 0) for t in types.values()) <= cluster["max_workers"]
    assert sum(t.get("max_workers", 0) for n, t in types.items() if n != "head") <= cluster["max_workers"]


def _ray_nodes(cluster: dict[str, Any], count: str) -> dict[str, list[dict[str, float]]]:
    """Node type -> the Ray resources of each node of that type (``count``: min/max_workers)."""
    out: dict[str, list[dict[str, float]]] = {}
    for name, spec in cluster["available_node_types"].items():
        res = {k: float(v) for k, v in spec["resources"].items()}
        if name == cluster["head_node_type"]:
            res["node:__internal_head__"] = 1.0
            out[name] = [res]
        else:
            out[name] = [dict(res) for _ in range(spec[count])]
    return out


def _fits(bundle: dict[str, float], node: dict[str, float]) -> bool:
    return all(node.get(k, 0.0) >= v for k, v in bundle.items())


def test_fleet_yaml_places_each_role_on_its_own_node_type(
    cluster: dict[str, Any], ray_fleet: PdserveConfig
) -> None:
    fleet = ray_fleet.fleet
    assert ray_fleet.uses_gpu and ray_fleet.kvtransfer.transport == "nccl"
    nodes = _ray_nodes(cluster, "min_workers")
    for role in ROLES:
        group = fleet.group(role)
        bundle = group.bundle(gpu=True)
        homes = [name for name, ns in nodes.items() if ns and _fits(bundle, ns[0])]
        assert homes == [f"{role}_gpu"], f"a {role} worker must fit only on {role}_gpu nodes, fits on {homes}"
        node_res = cluster["available_node_types"][f"{role}_gpu"]["resources"]
        assert group.resources == {f"{role}_gpu": group.tp_size}, "marker resource == tp_size"
        assert node_res[f"{role}_gpu"] == node_res["GPU"] == group.tp_size, "one worker per node"
        assert cluster["available_node_types"][f"{role}_gpu"]["min_workers"] == group.replicas
    # The configured fleet fits the cluster at its minimum size (router pinned to the head).
    placement.check_fits(fleet, [n for ns in nodes.values() for n in ns], gpu=True)
    assert _fits(dict(fleet.router.resources), nodes["head"][0])


def _commands(cluster: dict[str, Any], *keys: str) -> list[str]:
    out = [c for k in keys for c in cluster.get(k) or []]
    for spec in cluster["available_node_types"].values():
        out += [c for k in keys for c in spec.get(k) or []]
    return out


def test_cluster_yaml_installs_pdserve_and_starts_the_fleet(cluster: dict[str, Any]) -> None:
    install = [c for c in cluster["setup_commands"] if "pip install" in c and "[gpu]" in c]
    assert len(install) == 1
    source = re.search(r'"(\S+)\[gpu\]"', install[0])
    assert source is not None, install
    assert cluster["file_mounts"][source.group(1)] == ".", "pdserve comes from this checkout"
    text = (RAY_DIR / "cluster.yaml").read_text()
    assert "PLACEHOLDER" in text and '"pdserve[gpu] @ ' in text, "the wheel/git alternative is marked"
    head_start = cluster["head_start_ray_commands"]
    up = [c for c in head_start if "pdserve up" in c]
    assert len(up) == 1 and head_start.index(up[0]) > 1, "pdserve up runs once, after `ray start --head`"
    argv = shlex.split(up[0].split("pdserve up", 1)[1].split("|")[0])
    assert argv[:2] == ["--address", "auto"] and "--detach" in argv
    config_path = argv[argv.index("--config") + 1]
    mounts = cluster["file_mounts"]
    assert mounts[config_path] == "deploy/ray/fleet.yaml", "the fleet config is mounted where up reads it"
    for dest, src in mounts.items():
        assert (ROOT / src).exists(), f"file_mounts {dest}: {src} does not exist in the repository"


def test_nccl_settings_reach_every_ray_start(cluster: dict[str, Any]) -> None:
    env_cmd = next(c for c in cluster["setup_commands"] if "nccl.env" in c)
    body = env_cmd.split("<<'EOF'", 1)[1].rsplit("EOF", 1)[0]
    assigned = dict(
        line.split("=", 1) for line in body.splitlines() if re.match(r"^[A-Z_]+=", line.strip())
    )
    for var in NCCL_VARS:
        assert re.search(rf"^\s*#?\s*{var}=", body, re.M), f"{var} is not documented in nccl.env"
        assert re.search(rf"#.*\n(#.*\n)*\s*#?\s*{var}=", body), f"{var} has no comment above it"
    assert {"NCCL_IB_HCA", "NCCL_SOCKET_IFNAME", "NCCL_NET_GDR_LEVEL"} <= set(assigned)
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        start = next(c for c in cluster[key] if "ray start" in c)
        assert start.index(". ~/pdserve/nccl.env") < start.index("ray start"), key


def test_prometheus_sd_file_matches_the_scrape_config(
    cluster: dict[str, Any], ray_fleet: PdserveConfig
) -> None:
    sd = ray_fleet.fleet.prometheus_sd_file
    assert sd is not None
    prom_dest = next(d for d, s in cluster["file_mounts"].items() if s == "deploy/prometheus")
    prom = yaml.safe_load((ROOT / "deploy" / "prometheus" / "prometheus.yml").read_text())
    patterns = [f for job in prom["scrape_configs"] for c in job["file_sd_configs"] for f in c["files"]]
    assert any(Path(sd).match(f"{prom_dest}/{p}") for p in patterns), (sd, patterns)
    assert any(f"--config.file={prom_dest}/prometheus.yml" in c for c in cluster["head_start_ray_commands"])


# -- Kubernetes manifests ------------------------------------------------------------------------


def _k8s_docs() -> list[tuple[str, dict[str, Any]]]:
    docs = []
    for path in sorted(K8S_DIR.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is not None:
                docs.append((path.name, doc))
    return docs


DOCS = _k8s_docs()
CUSTOM_GROUPS = ("ray.io/", "monitoring.coreos.com/")


def _one(kind: str) -> dict[str, Any]:
    found = [d for _, d in DOCS if d["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def test_manifest_set_is_complete() -> None:
    kinds = sorted(d["kind"] for _, d in DOCS)
    assert kinds == sorted(
        ["Namespace", "ConfigMap", "PersistentVolumeClaim", "RayCluster", "Service", "RayJob", "PodMonitor"]
    )
    ns = _one("Namespace")["metadata"]["name"]
    for _, doc in DOCS:
        if doc["kind"] != "Namespace":
            assert doc["metadata"]["namespace"] == ns, doc["metadata"]["name"]


@pytest.mark.parametrize(
    "name,doc",
    [(f"{f}:{d['kind']}", d) for f, d in DOCS if not d["apiVersion"].startswith(CUSTOM_GROUPS)],
)
def test_core_objects_validate_strictly(name: str, doc: dict[str, Any]) -> None:
    kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def openapi_to_jsonschema(node: Any) -> Any:
    """A CRD's structural OpenAPI v3 schema -> JSON Schema with Kubernetes' semantics."""
    if isinstance(node, list):
        return [openapi_to_jsonschema(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: openapi_to_jsonschema(v) for k, v in node.items()
           if not k.startswith("x-kubernetes-") and k not in {"description", "nullable", "format"}}
    if node.get("x-kubernetes-int-or-string") and "anyOf" not in out:
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    bounds = {"int32": (-(2**31), 2**31 - 1), "int64": (-(2**63), 2**63 - 1)}.get(node.get("format", ""))
    if bounds and node.get("type") == "integer":
        out.setdefault("minimum", bounds[0])
        out.setdefault("maximum", bounds[1])
    if node.get("type") == "object" and "properties" in node and "additionalProperties" not in node:
        out["additionalProperties"] = bool(node.get("x-kubernetes-preserve-unknown-fields"))
    if node.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    return out


def _crd_validator(api_version: str, kind: str, templates: list[Any]) -> jsonschema.Validator:
    group, version = api_version.split("/")
    crd = json.loads((CRD_DIR / f"{group}_{version}_{kind}.json").read_text())
    assert (crd["group"], crd["version"], crd["kind"]) == (group, version, kind)
    schema = openapi_to_jsonschema(crd["openAPIV3Schema"])

    def collect(_v: Any, enabled: Any, instance: Any, _s: Any) -> Iterator[jsonschema.ValidationError]:
        if enabled:
            templates.append(instance)
        return iter(())

    cls = jsonschema.validators.extend(jsonschema.Draft7Validator, {"x-pdserve-pod-template": collect})
    # The marker key survives translation only because it is ours (not x-kubernetes-*).
    return cls(schema)


def _validate_custom(doc: dict[str, Any]) -> list[str]:
    """Schema errors of a custom resource, its pod templates checked as core PodTemplates."""
    templates: list[Any] = []
    validator = _crd_validator(doc["apiVersion"], doc["kind"], templates)
    errors = [f"{'.'.join(map(str, e.path))}: {e.message}" for e in validator.iter_errors(doc)]
    for tpl in templates:
        wrapped = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"}, "template": tpl}
        try:
            kubernetes_validate.validate(wrapped, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            errors.append(f"pod template: {'.'.join(map(str, exc.path))}: {exc.message}")
    return errors


@pytest.mark.parametrize(
    "name,doc", [(f"{f}:{d['kind']}", d) for f, d in DOCS if d["apiVersion"].startswith(CUSTOM_GROUPS)]
)
def test_custom_resources_match_their_crd_schemas(name: str, doc: dict[str, Any]) -> None:
    assert _validate_custom(doc) == []


def test_crd_validation_is_not_vacuous() -> None:
    bad = copy.deepcopy(_one("RayCluster"))
    bad["spec"]["workerGroupSpecs"][0]["replica"] = 2  # typo of `replicas`
    bad["spec"]["workerGroupSpecs"][1]["rayStartParams"]["num-gpus"] = 8  # must be a string
    bad["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["volumeMount"] = []  # typo
    errors = _validate_custom(bad)
    assert any("replica" in e for e in errors) and any("num-gpus" in e for e in errors), errors
    assert any(e.startswith("pod template") for e in errors), errors
    monitor = copy.deepcopy(_one("PodMonitor"))
    monitor["spec"]["podMetricsEndpoints"][0]["interval"] = "15 seconds"
    del monitor["spec"]["selector"]
    assert len(_validate_custom(monitor)) == 2


def _k8s_fleet() -> PdserveConfig:
    cm = _one("ConfigMap")
    data = yaml.safe_load(cm["data"]["pdserve.yaml"])
    return parse_config(data, source="deploy/k8s/10-configmap.yaml")


def _group(role: str) -> dict[str, Any]:
    groups: dict[str, dict[str, Any]] = {
        g["groupName"]: g for g in _one("RayCluster")["spec"]["workerGroupSpecs"]
    }
    assert set(groups) == set(ROLES)
    return groups[role]


def _ports(template: dict[str, Any]) -> dict[str, int]:
    return {p["name"]: p["containerPort"] for c in template["spec"]["containers"] for p in c.get("ports", [])}


def _ray_resources(group: dict[str, Any]) -> dict[str, float]:
    params = group["rayStartParams"]
    raw = params["resources"]
    assert raw.startswith('"') and raw.endswith('"'), "KubeRay wants the JSON wrapped in double quotes"
    custom = json.loads(raw[1:-1].replace('\\"', '"'))
    container = group["template"]["spec"]["containers"][0]
    cpu = float(container["resources"]["limits"]["cpu"])
    return {"CPU": cpu, "GPU": float(params["num-gpus"]), **{k: float(v) for k, v in custom.items()}}


def test_configmap_fleet_config_matches_the_ray_cluster() -> None:
    cfg = _k8s_fleet()
    fleet = cfg.fleet
    rc = _one("RayCluster")
    head = rc["spec"]["headGroupSpec"]["template"]
    assert head["metadata"]["labels"]["pdserve.io/fleet"] == fleet.name
    head_ports = _ports(head)
    assert head_ports["router"] == cfg.router.port and cfg.router.host == "0.0.0.0"
    assert head_ports["fleet-metrics"] == fleet.metrics_port
    assert fleet.router.resources.get("node:__internal_head__"), "the router must run on the head pod"
    head_cpu = float(head["spec"]["containers"][0]["resources"]["limits"]["cpu"])
    nodes: list[dict[str, float]] = [{"CPU": head_cpu, "node:__internal_head__": 1.0}]
    for role in ROLES:
        group, wanted = _group(role), fleet.group(role)
        assert group["minReplicas"] <= group["replicas"] == wanted.replicas <= group["maxReplicas"]
        pod = group["template"]
        assert pod["metadata"]["labels"]["pdserve.io/fleet"] == fleet.name
        assert pod["metadata"]["labels"]["pdserve.io/component"] == role
        res = _ray_resources(group)
        bundle = wanted.bundle(gpu=cfg.uses_gpu)
        assert _fits(bundle, res), (role, bundle, res)
        other = _ray_resources(_group("decode" if role == "prefill" else "prefill"))
        assert not _fits(bundle, other), f"a {role} worker must not fit on the other group's pods"
        limits = pod["spec"]["containers"][0]["resources"]["limits"]
        assert int(limits["nvidia.com/gpu"]) == wanted.tp_size == res["GPU"] == res[f"{role}_gpu"]
        ports = _ports(pod)
        assert ports["worker-http"] == wanted.port
        if role == "prefill":
            assert ports["kv-bootstrap"] == wanted.bootstrap_port
        nodes += [res] * group["replicas"]
    placement.check_fits(fleet, nodes, gpu=cfg.uses_gpu)


def test_worker_pods_get_gpus_rdma_and_shm() -> None:
    for role in ROLES:
        spec = _group(role)["template"]["spec"]
        container = spec["containers"][0]
        limits = container["resources"]["limits"]
        assert container["resources"]["requests"] == limits, "guaranteed QoS for GPU pods"
        assert any(k.startswith("rdma/") for k in limits), f"{role}: no RDMA device requested"
        assert "IPC_LOCK" in container["securityContext"]["capabilities"]["add"]
        env = {e["name"] for e in container["env"]}
        assert {"NCCL_IB_HCA", "NCCL_SOCKET_IFNAME", "NCCL_NET_GDR_LEVEL"} <= env
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        volumes = {v["name"]: v for v in spec["volumes"]}
        shm = volumes[mounts["/dev/shm"]]
        assert shm["emptyDir"]["medium"] == "Memory"
    text = (K8S_DIR / "20-raycluster.yaml").read_text()
    assert "NCCL_IB_GID_INDEX" in text, "the RoCE GID index setting is documented"


def test_router_service_and_rayjob_point_at_the_head() -> None:
    head = _one("RayCluster")["spec"]["headGroupSpec"]["template"]
    svc = _one("Service")
    labels = head["metadata"]["labels"]
    assert all(labels.get(k) == v for k, v in svc["spec"]["selector"].items())
    assert svc["spec"]["ports"][0]["targetPort"] in _ports(head)
    job = _one("RayJob")
    assert job["spec"]["clusterSelector"] == {"ray.io/cluster": _one("RayCluster")["metadata"]["name"]}
    assert job["spec"]["shutdownAfterJobFinishes"] is False, "the job must not tear the cluster down"
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:2] == ["pdserve", "up"] and "--detach" in argv and "--address" in argv
    config = Path(argv[argv.index("--config") + 1])
    container = head["spec"]["containers"][0]
    mount = next(m for m in container["volumeMounts"] if m["mountPath"] == str(config.parent))
    volume = next(v for v in head["spec"]["volumes"] if v["name"] == mount["name"])
    cm = _one("ConfigMap")
    assert volume["configMap"]["name"] == cm["metadata"]["name"] and config.name in cm["data"]


def test_podmonitor_scrapes_every_component() -> None:
    pm = _one("PodMonitor")
    pods = [_one("RayCluster")["spec"]["headGroupSpec"]["template"]] + [_group(r)["template"] for r in ROLES]
    selector = pm["spec"]["selector"]["matchLabels"]
    assert all(all(p["metadata"]["labels"].get(k) == v for k, v in selector.items()) for p in pods)
    declared = {name for p in pods for name in _ports(p)}
    components: set[str] = set()
    for ep in pm["spec"]["podMetricsEndpoints"]:
        assert ep["port"] in declared and ep["path"] == "/metrics"
        targets = {r["targetLabel"]: r for r in ep["relabelings"]}
        assert {"fleet", "component"} <= set(targets)
        comp = targets["component"]
        if "replacement" in comp:
            components.add(comp["replacement"])
        else:
            assert comp["sourceLabels"] == ["__meta_kubernetes_pod_label_pdserve_io_component"]
            components |= set(ROLES)
    assert components == {"router", "controller", *ROLES}
