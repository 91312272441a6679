"""Routing policy: which worker(s) serve a request.

Decision order for one attempt (``RoutingPolicy.route``):

1. Conditional disaggregation (``local_prefill_threshold > 0``): if some decode or colocated
   worker already holds all but fewer than ``threshold`` tokens of the prompt (judged by its
   prefix index), that worker serves the request alone -- no bootstrap fields, no KV transfer.
   With no prefill worker left, every request is served this way.
2. PD: a decode worker is chosen by load (running requests and free KV blocks) and a prefill
   worker by cost = queued prefill tokens + uncached prompt tokens (cache-aware and load-aware).
   Colocated (``both``) workers mixed with PD pairs take the request instead when they are less
   loaded than the chosen decode worker.
3. Colocated only: the best ``both`` worker by the prefill cost.

Near-ties (cost within ``best * (1 + rel) + abs``) are broken by the power of two choices: two
are drawn at random and the one with fewer in-flight requests wins. Workers excluded for this
request (they failed an earlier attempt) are skipped unless nothing else is left.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

from pdserve.router.config import LoadConfig, PolicyConfig
from pdserve.router.errors import NoWorkerError
from pdserve.router.prefix_index import PromptKey
from pdserve.router.workers import Worker, WorkerRegistry

RouteMode = Literal["pd", "local", "colocated"]


@dataclass(slots=True)
class Route:
    mode: RouteMode
    target: Worker  # the worker whose response goes to the client (decode or colocated)
    prefill: Worker | None  # set in "pd" mode only
    matched_tokens: int  # prompt tokens already cached on the worker that prefills
    num_tokens: int

    @property
    def uncached_tokens(self) -> int:
        return max(0, self.num_tokens - self.matched_tokens)


def _candidates(workers: Sequence[Worker], exclude: set[str]) -> list[Worker]:
    ok = [w for w in workers if w.routable()]
    if exclude:
        kept = [w for w in ok if w.url not in exclude]
        return kept or ok
    return ok


class RoutingPolicy:
    def __init__(
        self,
        cfg: PolicyConfig,
        load_cfg: LoadConfig,
        *,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.cfg = cfg
        self.stale_after_s = load_cfg.stale_after_s
        self.rng = rng or random.Random()
        self.clock = clock
        self._rr = {"prefill": 0, "decode": 0, "both": 0}

    # ---- costs -------------------------------------------------------------------------------
    def prefill_cost(self, w: Worker, key: PromptKey, now: float, use_cache: bool) -> tuple[float, int]:
        matched = key.matched_tokens(w.index.match(key.hashes)) if use_cache and key.hashes else 0
        rep = w.fresh_load(now, self.stale_after_s)
        queued = max(rep.waiting_prefill_tokens if rep is not None else 0, w.inflight_prefill_tokens)
        return float(queued + key.num_tokens - matched), matched

    def decode_cost(self, w: Worker, now: float) -> float:
        running = w.inflight_requests
        free_frac = 1.0
        rep = w.fresh_load(now, self.stale_after_s)
        if rep is not None:
            running = max(running, rep.num_running_reqs + rep.num_waiting_reqs)
            if rep.total_kv_blocks and rep.free_kv_blocks is not None:
                free_frac = min(1.0, max(0.0, rep.free_kv_blocks / rep.total_kv_blocks))
        return running + self.cfg.decode_kv_weight * (1.0 - free_frac)

    # ---- choices -----------------------------------------------------------------------------
    def _two_choices(self, near: list[tuple[float, Worker, int]]) -> tuple[float, Worker, int]:
        if len(near) == 1:
            return near[0]
        a, b = self.rng.sample(near, 2)
        ka = (a[1].inflight_requests, a[0])
        kb = (b[1].inflight_requests, b[0])
        return a if ka <= kb else b

    def _simple(self, role: str, cands: list[Worker], how: str) -> Worker:
        if how == "random":
            return self.rng.choice(cands)
        i = self._rr[role] % len(cands)
        self._rr[role] = i + 1
        return cands[i]

    def choose_prefill(
        self, cands: list[Worker], key: PromptKey, role: str = "prefill"
    ) -> tuple[Worker, int]:
        how = self.cfg.prefill
        if how in ("random", "round_robin"):
            w = self._simple(role, cands, how)
            return w, key.matched_tokens(w.index.match(key.hashes)) if key.hashes else 0
        now = self.clock()
        use_cache = how == "cache_aware"
        scored = []
        for w in cands:
            cost, matched = self.prefill_cost(w, key, now, use_cache)
            scored.append((cost, w, matched))
        best = min(s[0] for s in scored)
        limit = best * (1.0 + self.cfg.prefill_tie_rel) + self.cfg.prefill_tie_abs_tokens
        near = [s for s in scored if s[0] <= limit]
        _, w, matched = self._two_choices(near)
        return w, matched

    def choose_decode(self, cands: list[Worker], role: str = "decode") -> tuple[Worker, float]:
        how = self.cfg.decode
        now = self.clock()
        if how in ("random", "round_robin"):
            w = self._simple(role, cands, how)
            return w, self.decode_cost(w, now)
        scored = [(self.decode_cost(w, now), w, 0) for w in cands]
        best = min(s[0] for s in scored)
        near = [s for s in scored if s[0] <= best + self.cfg.decode_tie_abs]
        cost, w, _ = self._two_choices(near)
        return w, cost

    def route(self, reg: WorkerRegistry, key: PromptKey, exclude: set[str] | None = None) -> Route:
        ex = exclude or set()
        prefills = _candidates(reg.prefill, ex)
        decodes = _candidates(reg.decode, ex)
        boths = _candidates(reg.both, ex)
        n = key.num_tokens
        thr = self.cfg.local_prefill_threshold
        if thr > 0 and (decodes or boths):
            local = decodes + boths
            eligible = []
            for w in local:
                matched = key.matched_tokens(w.index.match(key.hashes)) if key.hashes else 0
                if n - matched < thr:
                    eligible.append(w)
            if eligible or not prefills:
                pool = eligible or local
                w, _ = self.choose_decode(pool, "decode")
                matched = key.matched_tokens(w.index.match(key.hashes)) if key.hashes else 0
                return Route("local" if w.role == "decode" else "colocated", w, None, matched, n)
        if prefills and decodes:
            d, d_cost = self.choose_decode(decodes)
            if boths:
                b, b_cost = self.choose_decode(boths, "both")
                if b_cost < d_cost:
                    matched = key.matched_tokens(b.index.match(key.hashes)) if key.hashes else 0
                    return Route("colocated", b, None, matched, n)
            p, matched = self.choose_prefill(prefills, key)
            return Route("pd", d, p, matched, n)
        if boths:
            b, matched = self.choose_prefill(boths, key, "both")
            return Route("colocated", b, None, matched, n)
        missing = []
        if not prefills and reg.prefill:
            missing.append("prefill")
        if not decodes and reg.decode:
            missing.append("decode")
        what = " and ".join(missing) or ("prefill/decode pair or colocated" if len(reg) else "any")
        raise NoWorkerError(f"no healthy {what} worker available")
