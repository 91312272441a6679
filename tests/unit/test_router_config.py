"""RouterConfig validation, YAML loading and the sglang-router-shaped command line."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from pdserve.errors import ConfigError
from pdserve.router.cli import add_router_arguments, config_from_args
from pdserve.router.config import DEFAULT_BOOTSTRAP_PORT, RouterConfig, WorkerSpec, normalize_url

pytestmark = pytest.mark.unit


def parse(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_router_arguments(p)
    return p.parse_args(list(argv))


@pytest.mark.parametrize(
    ("raw", "norm"),
    [("http://127.0.0.1:8000/", "http://127.0.0.1:8000"), ("localhost:9", "http://localhost:9"),
     ("http://[::1]:30000", "http://[::1]:30000")],
)
def test_normalize_url(raw: str, norm: str) -> None:
    assert normalize_url(raw) == norm


@pytest.mark.parametrize("bad", ["https://h:1", "http://h", "http://h:1/generate", "http://:80", "http://h:x"])
def test_bad_urls(bad: str) -> None:
    with pytest.raises(ConfigError):
        normalize_url(bad)


def test_worker_spec_bootstrap_rules() -> None:
    assert WorkerSpec(url="http://a:1", role="prefill").bootstrap_port == DEFAULT_BOOTSTRAP_PORT
    assert WorkerSpec(url="http://a:1", role="prefill", bootstrap_port=9000).bootstrap_port == 9000
    with pytest.raises(ValueError, match="only meaningful for prefill"):
        WorkerSpec(url="http://a:1", role="decode", bootstrap_port=9000)
    with pytest.raises(ValueError):
        WorkerSpec(url="http://a:1", role="router")  # type: ignore[arg-type]


def test_build_errors_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="listed twice"):
        RouterConfig.build(workers=[{"url": "http://a:1", "role": "decode"},
                                    {"url": "a:1", "role": "decode"}])
    with pytest.raises(ConfigError, match="nonsense: Extra inputs"):
        RouterConfig.build(nonsense=1)
    with pytest.raises(ConfigError, match=r"retry\.max_retries"):
        RouterConfig.build(retry={"max_retries": -1})
    with pytest.raises(ConfigError, match=r"policy\.prefill"):
        RouterConfig.build(policy={"prefill": "psychic"})


def test_from_yaml_with_router_section_and_overrides(tmp_path: Path) -> None:
    f = tmp_path / "r.yaml"
    f.write_text("router:\n  port: 9100\n  workers:\n"
                 "    - {url: 'http://p:1', role: prefill, bootstrap_port: 7}\n"
                 "  policy: {local_prefill_threshold: 128}\n")
    cfg = RouterConfig.from_yaml(f, host="0.0.0.0")
    assert cfg.port == 9100 and cfg.host == "0.0.0.0"
    assert cfg.workers[0].bootstrap_port == 7 and cfg.policy.local_prefill_threshold == 128
    (tmp_path / "bad.yaml").write_text("[1, 2")
    with pytest.raises(ConfigError, match="not valid YAML"):
        RouterConfig.from_yaml(tmp_path / "bad.yaml")
    with pytest.raises(ConfigError, match="cannot read"):
        RouterConfig.from_yaml(tmp_path / "missing.yaml")


def test_cli_sglang_router_shape(tmp_path: Path) -> None:
    args = parse("--prefill", "http://p1:30000", "9000", "--prefill", "http://p2:30000", "--prefill",
                 "http://p3:30000", "none", "--decode", "http://d:30001", "--worker", "http://c:30002",
                 "--port", "8100", "--policy", "round_robin", "--local-prefill-threshold", "64",
                 "--max-retries", "1", "--no-health-check")
    cfg = config_from_args(args)
    roles = [(w.url, w.role, w.bootstrap_port) for w in cfg.workers]
    assert roles == [
        ("http://p1:30000", "prefill", 9000), ("http://p2:30000", "prefill", DEFAULT_BOOTSTRAP_PORT),
        ("http://p3:30000", "prefill", DEFAULT_BOOTSTRAP_PORT), ("http://d:30001", "decode", None),
        ("http://c:30002", "both", None),
    ]
    assert cfg.port == 8100 and cfg.policy.prefill == "round_robin"
    assert cfg.policy.local_prefill_threshold == 64 and cfg.retry.max_retries == 1
    assert not cfg.health.enabled


def test_cli_merges_config_file(tmp_path: Path) -> None:
    f = tmp_path / "r.yaml"
    f.write_text("workers: [{url: 'http://d:1', role: decode}]\nretry: {max_retries: 5}\nport: 7000\n")
    cfg = config_from_args(parse("--config", str(f), "--prefill", "http://p:2", "--port", "7001"))
    assert [w.role for w in cfg.workers] == ["decode", "prefill"]
    assert cfg.retry.max_retries == 5 and cfg.port == 7001


def test_cli_bad_bootstrap_port() -> None:
    with pytest.raises(ConfigError, match="not a number"):
        config_from_args(parse("--prefill", "http://p:1", "eighty"))
    with pytest.raises(ConfigError, match="URL"):
        config_from_args(parse("--prefill", "http://p:1", "1", "2"))
