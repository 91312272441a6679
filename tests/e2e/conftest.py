"""End-to-end fixtures: a local Ray cluster on 127.0.0.1 and the ``pdserve`` CLI against it.

``ray_cluster`` (module scope: Ray is heavy on 2 cores, so one cluster per test module) starts
a single-node head with every socket on loopback, and on teardown checks that stopping it left
no process of its session alive. The test process itself never becomes a Ray driver: everything
goes through ``python -m pdserve ...`` subprocesses, exactly as an operator would type it.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

from fleet_e2e import PdserveCli, session_pids

from pdserve.deploy.ray_cluster import LocalRayHead


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[LocalRayHead]:
    head = LocalRayHead.start(num_cpus=12, object_store_mb=128, timeout_s=180)
    try:
        yield head
    finally:
        clean = head.stop(timeout_s=60)
        assert clean, "processes of the Ray session outlived SIGTERM"
        assert not session_pids(head.pid)


@pytest.fixture(scope="module")
def pdserve_cli(tmp_path_factory: pytest.TempPathFactory) -> PdserveCli:
    return PdserveCli(tmp_path_factory.mktemp("pdserve-state"))
