"""The real fleet (engine workers + router, tiny default model) on a local Ray cluster: what the
README's main command runs, driven with the stock openai client, then torn down."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from fleet_e2e import PdserveCli, free_port, wait_for

from pdserve.deploy.ray_cluster import LocalRayHead

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]

NAME = "real"


@pytest.fixture(scope="module")
def real_fleet(
    ray_cluster: LocalRayHead,
    pdserve_cli: PdserveCli,
    default_model_dir: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[dict[str, Any]]:
    port = free_port("127.0.0.1")
    config = tmp_path_factory.mktemp("real") / "fleet.yaml"
    config.write_text(
        f"""\
engine: {{model: {default_model_dir}, max_model_len: 1024, num_blocks: 256}}
kvtransfer: {{transport: tcp}}
router: {{port: {port}, served_model_name: tiny-glm}}
fleet:
  name: {NAME}
  timeouts: {{health_interval_s: 0.5, startup_s: 300}}
"""
    )
    proc = pdserve_cli(
        "up", "--config", str(config), "--address", ray_cluster.address, "--detach", timeout=600
    )
    info: dict[str, Any] = {"url": proc.stdout.strip().splitlines()[-1], "down": False}
    try:
        yield info
    finally:
        if not info["down"]:
            pdserve_cli("down", "--name", NAME, "--no-drain", check=False, timeout=300)


def test_openai_client_against_the_fleet(real_fleet: dict[str, Any]) -> None:
    client = openai.OpenAI(base_url=f"{real_fleet['url']}/v1", api_key="none", max_retries=0, timeout=120.0)
    assert [m.id for m in client.models.list().data] == ["tiny-glm"]
    chat = client.chat.completions.create(
        model="tiny-glm", messages=[{"role": "user", "content": "Hello!"}], max_tokens=8, temperature=0
    )
    assert chat.choices[0].finish_reason in {"length", "stop"}
    assert chat.usage is not None and chat.usage.completion_tokens >= 1 and chat.usage.prompt_tokens > 1
    again = client.chat.completions.create(
        model="tiny-glm", messages=[{"role": "user", "content": "Hello!"}], max_tokens=8, temperature=0
    )
    assert again.choices[0].message.content == chat.choices[0].message.content  # greedy: deterministic
    chunks = list(client.chat.completions.create(
        model="tiny-glm", messages=[{"role": "user", "content": "Tell me more"}], max_tokens=6,
        temperature=0, stream=True,
    ))
    assert chunks and chunks[-1].choices[0].finish_reason in {"length", "stop"}
    text = client.completions.create(model="tiny-glm", prompt="The capital of", max_tokens=5, temperature=0)
    assert text.usage is not None and text.usage.completion_tokens >= 1


def test_status_shows_load_kv_and_transport(real_fleet: dict[str, Any], pdserve_cli: PdserveCli) -> None:
    status = pdserve_cli.status("--name", NAME)
    assert status["ready"]
    for w in status["workers"]:
        assert w["state"] == "healthy" and w["registered"]
        assert w["load"]["transport"] == "tcp"
        assert 0.0 <= w["load"]["kv_usage"] <= 1.0
    table = pdserve_cli("status", "--name", NAME).stdout
    assert "real-prefill-0" in table and "real-decode-0" in table and "tcp" in table


def test_down_removes_the_real_fleet(real_fleet: dict[str, Any], pdserve_cli: PdserveCli) -> None:
    status = pdserve_cli.status("--name", NAME)
    pids = [status["router"]["pid"], *(w["pid"] for w in status["workers"])]
    pdserve_cli("down", "--name", NAME, timeout=300)
    real_fleet["down"] = True
    wait_for(lambda: not [p for p in pids if Path(f"/proc/{p}").exists()], timeout_s=60,
             what=f"fleet processes {pids} to exit")
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{real_fleet['url']}/health", timeout=2)
