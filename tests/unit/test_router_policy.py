"""Routing policy: cache- and load-aware prefill choice, decode choice, power of two among near-ties,
conditional disaggregation, colocated workers, exclusion on retry, no-worker errors."""

from __future__ import annotations

import random
from collections import Counter
from typing import Any

import pytest

from pdserve.router.config import RouterConfig
from pdserve.router.errors import NoWorkerError
from pdserve.router.policy import RoutingPolicy
from pdserve.router.prefix_index import key_from_ids
from pdserve.router.workers import LoadReport, WorkerRegistry, parse_load

pytestmark = pytest.mark.unit

NOW = 500.0


def setup(np: int = 2, nd: int = 2, nb: int = 0, **policy: Any) -> tuple[WorkerRegistry, RoutingPolicy]:
    workers = [{"url": f"http://p{i}:1", "role": "prefill"} for i in range(np)]
    workers += [{"url": f"http://d{i}:1", "role": "decode"} for i in range(nd)]
    workers += [{"url": f"http://c{i}:1", "role": "both"} for i in range(nb)]
    cfg = RouterConfig.build(workers=workers, policy=policy)
    reg = WorkerRegistry(cfg)
    for spec in cfg.workers:
        reg.add(spec)
    return reg, RoutingPolicy(cfg.policy, cfg.load, rng=random.Random(7), clock=lambda: NOW)


def report(**kw: Any) -> LoadReport:
    return LoadReport(received_at=NOW - 0.1, **kw)


def test_cache_aware_prefers_the_worker_holding_the_prefix() -> None:
    reg, pol = setup()
    ids = list(range(512))
    key = key_from_ids(ids, 16)
    reg.prefill[1].index.insert(key.hashes)
    picks = Counter(pol.route(reg, key).prefill.url for _ in range(50))  # type: ignore[union-attr]
    assert picks == {"http://p1:1": 50}
    r = pol.route(reg, key)
    assert r.mode == "pd" and r.matched_tokens == 512 and r.uncached_tokens == 0


def test_load_beats_cache_when_the_cached_worker_is_swamped() -> None:
    reg, pol = setup()
    key = key_from_ids(list(range(512)), 16)
    reg.prefill[1].index.insert(key.hashes)
    reg.prefill[1].load = report(waiting_prefill_tokens=5000)
    assert pol.route(reg, key).prefill is reg.prefill[0]
    reg.prefill[1].load = report(waiting_prefill_tokens=0)
    reg.prefill[1].inflight_prefill_tokens = 4000  # the router's own accounting counts too
    assert pol.route(reg, key).prefill is reg.prefill[0]


def test_stale_load_reports_are_ignored() -> None:
    reg, pol = setup()
    key = key_from_ids(list(range(64)), 16)
    reg.prefill[0].load = LoadReport(waiting_prefill_tokens=10_000, received_at=NOW - 60)
    picks = Counter(pol.route(reg, key).prefill.url for _ in range(200))  # type: ignore[union-attr]
    assert set(picks) == {"http://p0:1", "http://p1:1"}, "stale report must not push traffic away"


def test_power_of_two_among_near_ties_spreads_and_prefers_less_inflight() -> None:
    reg, pol = setup(np=4)
    key = key_from_ids(list(range(64)), 16)
    picks = Counter(pol.route(reg, key).prefill.url for _ in range(400))  # type: ignore[union-attr]
    assert len(picks) == 4 and min(picks.values()) > 40
    for i, w in enumerate(reg.prefill):
        w.inflight_requests = 0 if i == 2 else 5
    picks = Counter(pol.route(reg, key).prefill.url for _ in range(400))  # type: ignore[union-attr]
    assert picks.most_common(1)[0][0] == "http://p2:1"
    assert picks["http://p2:1"] > 150  # wins every draw it takes part in (~half of them)


def test_decode_choice_by_running_requests_and_free_kv() -> None:
    reg, pol = setup(nd=3)
    key = key_from_ids([1, 2, 3], 16)
    reg.decode[0].load = report(num_running_reqs=20, free_kv_blocks=900, total_kv_blocks=1000)
    reg.decode[1].load = report(num_running_reqs=2, free_kv_blocks=10, total_kv_blocks=1000)
    reg.decode[2].load = report(num_running_reqs=3, free_kv_blocks=950, total_kv_blocks=1000)
    picks = Counter(pol.route(reg, key).target.url for _ in range(100))
    assert picks == {"http://d2:1": 100}


def test_round_robin_and_random_policies() -> None:
    reg, pol = setup(np=3, nd=2, prefill="round_robin", decode="round_robin")
    key = key_from_ids([1], 16)
    seq = [pol.route(reg, key) for _ in range(6)]
    assert [r.prefill.url for r in seq] == ["http://p0:1", "http://p1:1", "http://p2:1"] * 2  # type: ignore[union-attr]
    assert [r.target.url for r in seq] == ["http://d0:1", "http://d1:1"] * 3
    reg, pol = setup(np=3, prefill="random", decode="random")
    assert {pol.route(reg, key).prefill.url for _ in range(100)} == {  # type: ignore[union-attr]
        "http://p0:1", "http://p1:1", "http://p2:1"}


def test_conditional_disaggregation_short_or_cached_prompts_stay_local() -> None:
    reg, pol = setup(nd=1, local_prefill_threshold=64)
    short = key_from_ids(list(range(40)), 16)
    r = pol.route(reg, short)
    assert r.mode == "local" and r.prefill is None and r.target is reg.decode[0]
    long = key_from_ids(list(range(410)), 16)
    assert pol.route(reg, long).mode == "pd"
    reg.decode[0].index.insert(long.hashes)  # 410 tokens, 400 cached on the decode worker -> 10 uncached
    r = pol.route(reg, long)
    assert r.mode == "local" and r.matched_tokens == 400 and r.uncached_tokens == 10


def test_disabled_threshold_always_goes_pd() -> None:
    reg, pol = setup(nd=1)
    assert pol.route(reg, key_from_ids([1, 2], 16)).mode == "pd"


def test_no_prefill_left_falls_back_to_local_only_when_decode_can_prefill() -> None:
    reg, pol = setup(np=1, nd=1, local_prefill_threshold=8)
    reg.prefill[0].healthy = False
    assert pol.route(reg, key_from_ids(list(range(300)), 16)).mode == "local"
    reg, pol = setup(np=1, nd=1)
    reg.prefill[0].healthy = False
    with pytest.raises(NoWorkerError, match="prefill"):
        pol.route(reg, key_from_ids(list(range(300)), 16))


def test_colocated_workers_alone_and_mixed() -> None:
    reg, pol = setup(np=0, nd=0, nb=2)
    key = key_from_ids(list(range(64)), 16)
    reg.both[1].index.insert(key.hashes)
    r = pol.route(reg, key)
    assert r.mode == "colocated" and r.target is reg.both[1] and r.prefill is None
    reg, pol = setup(np=1, nd=1, nb=1)
    reg.both[0].inflight_requests = 10
    assert pol.route(reg, key).mode == "pd"
    reg.both[0].inflight_requests = 0
    reg.decode[0].inflight_requests = 10
    assert pol.route(reg, key).mode == "colocated"


def test_exclusion_on_retry_and_fallback_when_nothing_else() -> None:
    reg, pol = setup(np=2, nd=1)
    key = key_from_ids([1, 2, 3], 16)
    for _ in range(20):
        r = pol.route(reg, key, exclude={"http://p0:1", "http://d0:1"})
        assert r.prefill is reg.prefill[1] and r.target is reg.decode[0]


def test_breaker_and_health_gate_routing() -> None:
    reg, pol = setup(np=1, nd=2)
    key = key_from_ids([1], 16)
    reg.decode[0].healthy = False
    assert {pol.route(reg, key).target.url for _ in range(20)} == {"http://d1:1"}
    for _ in range(5):
        reg.decode[1].breaker.record_failure()
    with pytest.raises(NoWorkerError, match="decode"):
        pol.route(reg, key)
    reg2, pol2 = setup(np=0, nd=0)
    with pytest.raises(NoWorkerError):
        pol2.route(reg2, key)


def test_parse_load_shapes() -> None:
    sgl = [{"dp_rank": 0, "num_reqs": 5, "num_waiting_reqs": 2, "num_tokens": 100},
           {"dp_rank": 1, "num_reqs": 1, "num_waiting_reqs": 0, "num_tokens": 7}]
    rep = parse_load(sgl, 1.0)
    assert (rep.num_running_reqs, rep.num_waiting_reqs, rep.free_kv_blocks) == (4, 2, None)
    ours = {"num_waiting_reqs": 1, "num_running_reqs": 3, "waiting_prefill_tokens": 900,
            "free_kv_blocks": 10, "total_kv_blocks": 100}
    rep = parse_load(ours, 2.0)
    assert (rep.num_running_reqs, rep.waiting_prefill_tokens, rep.free_kv_blocks, rep.total_kv_blocks) == (
        3, 900, 10, 100)
    assert parse_load({"loads": [ours, ours]}, 3.0).waiting_prefill_tokens == 1800
    assert parse_load("garbage", 4.0).num_running_reqs == 0
