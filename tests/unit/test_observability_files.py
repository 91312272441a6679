"""deploy/prometheus and deploy/grafana: structure, PromQL that parses, and metric names that exist.

Every dashboard query and rule expression is parsed by a small PromQL parser below (grammar and
operator precedence of Prometheus 2.x, plus argument types of the functions used), and every
metric it selects must be exported by pdserve: the names, types and label names come from the
``Counter/Gauge/Histogram(...)`` definitions found by scanning the source tree, so a renamed
metric or label breaks this test, not a dashboard in production. promtool's own checks and a live
Prometheus run are in tests/integration/test_prometheus_live.py.
"""

from __future__ import annotations

import ast
import functools
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
PROM_DIR = ROOT / "deploy" / "prometheus"
DASHBOARD = ROOT / "deploy" / "grafana" / "pdserve-dashboard.json"
TARGET_LABELS = {"component", "fleet", "instance", "job"}  # set by prometheus.yml / the PodMonitor
COMPONENTS = {"router", "prefill", "decode", "controller"}
GRAFANA_VARS = {"$__rate_interval": "1m", "$__interval": "15s", "$fleet": ".*"}
# Alert expressions are `<signal> <cmp> <literal number>` (possibly several joined by and/or);
# the live test strips these to query the signal. Keep in sync with test_prometheus_live.py.
THRESHOLD_RE = re.compile(r"\s*(?:==|!=|>=|<=|>|<)\s*(?:bool\s+)?-?[0-9.]+(?:e[+-]?[0-9]+)?(?=\s|\)|$)")


# -- metric definitions in the source tree -------------------------------------------------------


@dataclass
class MetricDef:
    name: str
    kind: str
    labels: set[str] | None  # None: not a literal list
    buckets: tuple[float, ...] | None = None
    exposed: set[str] = field(default_factory=set)


def _literal(node: ast.AST | None, consts: dict[str, Any]) -> Any:
    if node is None:
        return None
    if isinstance(node, ast.Name):
        return consts.get(node.id)
    try:
        return ast.literal_eval(node)
    except (ValueError, TypeError, SyntaxError):
        return None


KINDS = {"Counter": "counter", "CounterMetricFamily": "counter", "Gauge": "gauge",
         "GaugeMetricFamily": "gauge", "Histogram": "histogram", "HistogramMetricFamily": "histogram",
         "Summary": "summary", "SummaryMetricFamily": "summary", "Info": "info", "Enum": "gauge"}


def _loop_bindings(tree: ast.AST, consts: dict[str, Any]) -> dict[str, list[Any]]:
    """``for a, b in ((x, y), ...)`` over a literal tuple/list: name -> the values it takes
    (elements that are not literals, e.g. attributes, bind None)."""
    out: dict[str, list[Any]] = {}
    for node in ast.walk(tree):
        if not isinstance(node, ast.For) or not isinstance(node.iter, ast.Tuple | ast.List):
            continue
        for elt in node.iter.elts:
            if isinstance(node.target, ast.Name):
                out.setdefault(node.target.id, []).append(_literal(elt, consts))
            elif isinstance(node.target, ast.Tuple) and isinstance(elt, ast.Tuple | ast.List):
                for target, value in zip(node.target.elts, elt.elts, strict=False):
                    if isinstance(target, ast.Name):
                        out.setdefault(target.id, []).append(_literal(value, consts))
    return out


def scan_metrics() -> dict[str, MetricDef]:
    """Every ``pdserve:*`` metric defined in the package: prometheus_client metrics
    (``Counter(...)``...) and custom-collector families (``CounterMetricFamily(...)``...), with
    names given literally or by a loop over a literal tuple."""
    defs: dict[str, MetricDef] = {}
    for dirpath, _, files in os.walk(ROOT / "pdserve", followlinks=True):
        for fname in files:
            if not fname.endswith(".py"):
                continue
            tree = ast.parse(Path(dirpath, fname).read_text(encoding="utf-8"))
            consts: dict[str, Any] = {}
            for stmt in tree.body:
                target = stmt.targets[0] if isinstance(stmt, ast.Assign) else None
                if isinstance(stmt, ast.Assign) and isinstance(target, ast.Name):
                    consts[target.id] = _literal(stmt.value, consts)
            # Bucket bounds a histogram of this module may use: explicit `buckets=` or, for
            # collector-built families, the module's numeric tuple constants.
            module_bounds = tuple(float(x) for v in consts.values() if isinstance(v, tuple)
                                  and v and all(isinstance(x, int | float) for x in v) for x in v)
            loops = _loop_bindings(tree, consts)
            for node in ast.walk(tree):
                if not isinstance(node, ast.Call) or not node.args:
                    continue
                func = node.func.id if isinstance(node.func, ast.Name) else getattr(node.func, "attr", "")
                if func not in KINDS:
                    continue
                first = node.args[0]
                names = loops.get(first.id, []) if isinstance(first, ast.Name) and first.id in loops else [
                    _literal(first, consts)]
                kw = {k.arg: k.value for k in node.keywords}
                label_node = node.args[2] if len(node.args) > 2 else kw.get("labelnames", kw.get("labels"))
                labels = _literal(label_node, consts) if label_node is not None else []
                buckets = _literal(kw.get("buckets"), consts)
                for name in names:
                    if not isinstance(name, str) or not name.startswith("pdserve:"):
                        continue
                    kind = KINDS[func]
                    d = MetricDef(name, kind, set(labels) if isinstance(labels, list | tuple) else None,
                                  tuple(float(b) for b in buckets) if buckets else module_bounds or None)
                    base = name.removesuffix("_total")
                    d.exposed = {
                        "counter": {f"{base}_total"},
                        "gauge": {name},
                        "histogram": {f"{name}_bucket", f"{name}_sum", f"{name}_count"},
                        "summary": {name, f"{name}_sum", f"{name}_count"},
                        "info": {f"{name}_info"},
                    }[kind]
                    defs[name] = d
    return defs


METRICS = scan_metrics()
EXPOSED = {n: d for d in METRICS.values() for n in d.exposed}


@functools.cache
def recorded_names() -> frozenset[str]:
    rules = yaml.safe_load((PROM_DIR / "rules.yml").read_text())
    return frozenset(r["record"] for g in rules["groups"] for r in g["rules"] if "record" in r)


# -- a PromQL parser -----------------------------------------------------------------------------

AGGREGATIONS = {"sum", "avg", "count", "min", "max", "group", "stddev", "stdvar", "topk", "bottomk",
                "quantile", "count_values"}
V, S, M, STR = "vector", "scalar", "matrix", "string"
FUNCTIONS: dict[str, tuple[list[str], str]] = {  # argument types, result type
    **{f: ([M], V) for f in ("rate", "irate", "increase", "delta", "idelta", "deriv", "changes", "resets",
                             "avg_over_time", "sum_over_time", "min_over_time", "max_over_time",
                             "count_over_time", "last_over_time", "absent_over_time", "present_over_time")},
    **{f: ([V], V) for f in ("abs", "ceil", "floor", "exp", "ln", "log2", "log10", "sqrt", "absent",
                             "sort", "sort_desc", "timestamp")},
    "histogram_quantile": ([S, V], V), "quantile_over_time": ([S, M], V), "predict_linear": ([M, S], V),
    "clamp_min": ([V, S], V), "clamp_max": ([V, S], V), "clamp": ([V, S, S], V), "round": ([V, S], V),
    "vector": ([S], V), "scalar": ([V], S), "time": ([], S),
    "label_replace": ([V, STR, STR, STR, STR], V),
}
OPTIONAL_ARGS = {"round": 1}
PRECEDENCE = [("or",), ("and", "unless"), ("==", "!=", "<=", "<", ">=", ">"), ("+", "-"),
              ("*", "/", "%", "atan2"), ("^",)]
COMPARISONS = {"==", "!=", "<=", "<", ">=", ">"}
TOKEN_RE = re.compile(r"""
    (?P<ws>\s+) | (?P<comment>\#[^\n]*)
  | (?P<duration>[0-9]+(?:ms|[smhdwy])(?:[0-9]+(?:ms|[smhdwy]))*)
  | (?P<number>(?:[0-9]*\.[0-9]+|[0-9]+\.?)(?:[eE][+-]?[0-9]+)?|0x[0-9a-fA-F]+)
  | (?P<string>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|`[^`]*`)
  | (?P<ident>[a-zA-Z_][a-zA-Z0-9_:]*)
  | (?P<op>=~|!~|==|!=|<=|>=|[-+*/%^<>=(){}\[\],:@])
""", re.X)


class PromQLError(ValueError):
    pass


@dataclass
class Selector:
    metric: str | None
    matchers: list[tuple[str, str, str]]


class Parser:
    """Recursive descent over PromQL; ``parse()`` returns the result type, ``selectors`` lists
    every vector selector, ``top_ops`` the binary operators at the outermost level."""

    def __init__(self, text: str) -> None:
        self.toks: list[tuple[str, str]] = []
        pos = 0
        while pos < len(text):
            m = TOKEN_RE.match(text, pos)
            if m is None:
                raise PromQLError(f"unexpected character {text[pos]!r} at {pos}")
            pos = m.end()
            if m.lastgroup not in ("ws", "comment"):
                self.toks.append((str(m.lastgroup), m.group()))
        self.i = 0
        self.selectors: list[Selector] = []
        self.depth = 0
        self.top_ops: list[tuple[str, str]] = []  # (operator, kind of right operand)

    def peek(self, value: str | None = None) -> bool:
        return self.i < len(self.toks) and (value is None or self.toks[self.i][1] == value)

    def take(self, value: str | None = None, kind: str | None = None) -> str:
        if self.i >= len(self.toks):
            raise PromQLError(f"unexpected end, expected {value or kind}")
        k, v = self.toks[self.i]
        if (value is not None and v != value) or (kind is not None and k != kind):
            raise PromQLError(f"expected {value or kind}, got {v!r}")
        self.i += 1
        return v

    def parse(self) -> str:
        t = self.expr(0)
        if self.peek():
            raise PromQLError(f"trailing tokens from {self.toks[self.i][1]!r}")
        return t

    def expr(self, level: int) -> str:
        if level == len(PRECEDENCE):
            return self.unary()
        left = self.expr(level + 1)
        while self.peek() and self.toks[self.i][1] in PRECEDENCE[level]:
            op = self.take()
            is_bool = op in COMPARISONS and self.peek("bool") and bool(self.take())
            self.modifiers()
            right = self.expr(level if op == "^" else level + 1)  # ^ is right-associative
            if self.depth == 0:
                self.top_ops.append((op, right))
            if op in ("and", "or", "unless") and (left != V or right != V):
                raise PromQLError(f"{op!r} needs instant vectors on both sides")
            if M in (left, right) or STR in (left, right):
                raise PromQLError(f"{op!r} cannot take a range vector or string operand")
            left = S if left == right == S else (V if not is_bool or V in (left, right) else S)
        return left

    def modifiers(self) -> None:
        for words in (("on", "ignoring"), ("group_left", "group_right")):
            if self.peek() and self.toks[self.i][1] in words:
                self.take()
                if self.peek("("):
                    self.label_list()

    def label_list(self) -> list[str]:
        self.take("(")
        names = []
        while not self.peek(")"):
            names.append(self.take(kind="ident"))
            if not self.peek(")"):
                self.take(",")
        self.take(")")
        return names

    def unary(self) -> str:
        if self.peek("-") or self.peek("+"):
            self.take()
        t = self.postfix(self.primary())
        return t

    def postfix(self, t: str) -> str:
        while self.peek("["):
            self.take("[")
            self.take(kind="duration")
            if self.peek(":"):  # subquery
                self.take(":")
                if not self.peek("]"):
                    self.take(kind="duration")
                if t != V:
                    raise PromQLError("a subquery needs an instant vector")
            elif not self.last_was_selector:
                raise PromQLError("a range can only follow a vector selector")
            self.take("]")
            t = M
        while self.peek("offset") or self.peek("@"):
            self.take()
            self.take("-") if self.peek("-") else None
            self.take()
        return t

    def primary(self) -> str:
        self.last_was_selector = False
        kind, value = self.toks[self.i] if self.i < len(self.toks) else ("", "")
        if kind == "number":
            self.take()
            return S
        if kind == "string":
            self.take()
            return STR
        if value == "(":
            self.take("(")
            self.depth += 1
            t = self.expr(0)
            self.depth -= 1
            self.take(")")
            return t
        if value == "{":
            return self.selector(None)
        if kind != "ident":
            raise PromQLError(f"unexpected {value!r}")
        self.take()
        if value in AGGREGATIONS:
            return self.aggregation(value)
        if self.peek("("):
            return self.call(value)
        if value in ("by", "without", "bool", "on", "ignoring", "offset"):
            raise PromQLError(f"misplaced keyword {value!r}")
        return self.selector(value)

    def selector(self, metric: str | None) -> str:
        matchers: list[tuple[str, str, str]] = []
        if self.peek("{"):
            self.take("{")
            while not self.peek("}"):
                label = self.take(kind="ident")
                op = self.take()
                if op not in ("=", "!=", "=~", "!~"):
                    raise PromQLError(f"bad matcher operator {op!r}")
                raw = self.take(kind="string")
                if op in ("=~", "!~"):
                    re.compile(raw[1:-1])
                matchers.append((label, op, raw[1:-1]))
                if not self.peek("}"):
                    self.take(",")
            self.take("}")
        if metric is None and not any(op == "=" and v for _, op, v in matchers):
            raise PromQLError("a selector needs a metric name or a non-empty matcher")
        self.selectors.append(Selector(metric, matchers))
        self.last_was_selector = True
        return V

    def aggregation(self, op: str) -> str:
        if self.peek("by") or self.peek("without"):
            self.take()
            self.label_list()
        self.take("(")
        self.depth += 1
        if op in ("topk", "bottomk", "quantile", "count_values"):
            param = self.expr(0)
            if param != (STR if op == "count_values" else S):
                raise PromQLError(f"{op} needs a {S if op != 'count_values' else STR} parameter")
            self.take(",")
        if self.expr(0) != V:
            raise PromQLError(f"{op}() needs an instant vector")
        self.depth -= 1
        self.take(")")
        if self.peek("by") or self.peek("without"):
            self.take()
            self.label_list()
        return V

    def call(self, name: str) -> str:
        if name not in FUNCTIONS:
            raise PromQLError(f"unknown function {name}()")
        want, result = FUNCTIONS[name]
        self.take("(")
        self.depth += 1
        got: list[str] = []
        while not self.peek(")"):
            got.append(self.expr(0))
            if not self.peek(")"):
                self.take(",")
        self.depth -= 1
        self.take(")")
        if got != want[: max(len(got), len(want) - OPTIONAL_ARGS.get(name, 0))]:
            raise PromQLError(f"{name}() takes {want}, got {got}")
        return result


def parse(expr: str) -> Parser:
    p = Parser(expr)
    p.parse()
    return p


# -- the files under test ------------------------------------------------------------------------


def dashboard() -> dict[str, Any]:
    data = json.loads(DASHBOARD.read_text())
    assert isinstance(data, dict)
    return data


def dashboard_queries() -> list[tuple[str, str]]:
    out = []
    for panel in dashboard()["panels"]:
        for t in panel.get("targets", []):
            expr = t["expr"]
            for var, value in GRAFANA_VARS.items():
                expr = expr.replace(var, value)
            out.append((f"{panel['title']}/{t['refId']}", expr))
    return out


def rule_exprs() -> list[tuple[str, str]]:
    rules = yaml.safe_load((PROM_DIR / "rules.yml").read_text())
    return [(r.get("alert") or r["record"], r["expr"]) for g in rules["groups"] for r in g["rules"]]


def check_names(expr: str) -> list[str]:
    """Problems with the metrics and labels ``expr`` selects (empty: all exist)."""
    problems, recorded = [], recorded_names()
    for sel in parse(expr).selectors:
        if sel.metric is None:
            problems.append("selector without a metric name")
            continue
        if sel.metric == "up":
            labels: set[str] | None = set()
        elif sel.metric in recorded:
            labels = {"fleet"}
        elif sel.metric in EXPOSED:
            labels = EXPOSED[sel.metric].labels
            if labels is not None and sel.metric.endswith("_bucket"):
                labels = labels | {"le"}
        else:
            problems.append(f"{sel.metric} is not exported by pdserve (nor recorded in rules.yml)")
            continue
        for label, op, value in sel.matchers:
            if labels is not None and label not in labels | TARGET_LABELS:
                problems.append(f"{sel.metric} has no label {label!r}")
            if label == "component" and op == "=" and value not in COMPONENTS:
                problems.append(f"component={value!r} is not a scrape target role")
    return problems


# -- tests ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("expr", [
    'sum by (le) (rate(pdserve:x_bucket{fleet=~".*", le!="+Inf"}[5m]))',
    "histogram_quantile(0.99, sum without (instance) (rate(a[1m]))) > bool 2",
    "a / on (fleet) group_left (role) b * -2 ^ 3 ^ 2 or vector(0)",
    'max_over_time(rate(a[5m])[1h:1m]) unless a offset 1h and topk(3, b)',
    "clamp(a, 0, 1) - round(b) + round(b, 0.5)",
])
def test_parser_accepts_valid_promql(expr: str) -> None:
    parse(expr)


@pytest.mark.parametrize("expr,why", [
    ("rate(a)", "takes"), ("sum(a[5m])", "instant vector"), ("a[5m] + 1", "range vector"),
    ("(a + b", "expected )"), ("foo_bar(a)", "unknown function"), ('a{b=="c"}', "matcher"),
    ("histogram_quantile(a, b)", "takes"), ("1 and 2", "instant vectors"), ("a b", "trailing"),
    ('{le="1"}[5m:', "duration"), ("sum by (x (a)", "expected"), ('a{x=~"("}', "missing"),
])
def test_parser_rejects_invalid_promql(expr: str, why: str) -> None:
    with pytest.raises((PromQLError, re.error), match=re.escape(why)):
        parse(expr)


def test_source_scan_finds_every_component_family() -> None:
    for name in ("pdserve:router_requests_total", "pdserve:router_ttft_seconds_bucket",
                 "pdserve:kv_transfer_bytes_total", "pdserve:worker_kv_usage_ratio",
                 "pdserve:engine_step_duration_seconds_count", "pdserve:fleet_workers"):
        assert name in EXPOSED, name
    assert METRICS["pdserve:kv_transfer_failures"].labels == {"side", "transport", "phase", "reason"}
    assert check_names('pdserve:router_requests_total{outcom="x"}') == [
        "pdserve:router_requests_total has no label 'outcom'"]
    assert check_names("pdserve:router_requests") != [], "counters are exposed as *_total only"


@pytest.mark.parametrize("where,expr", dashboard_queries())
def test_dashboard_queries_parse_and_use_real_metrics(where: str, expr: str) -> None:
    assert check_names(expr) == [], where


@pytest.mark.parametrize("where,expr", rule_exprs())
def test_rule_expressions_parse_and_use_real_metrics(where: str, expr: str) -> None:
    assert check_names(expr) == [], where


def test_dashboard_layout_and_datasource() -> None:
    d = dashboard()
    assert d["uid"] and d["title"] and d["schemaVersion"] >= 36
    variables = {v["name"]: v for v in d["templating"]["list"]}
    assert (variables["datasource"]["type"], variables["datasource"]["query"]) == ("datasource", "prometheus")
    assert variables["fleet"]["datasource"]["uid"] == "${datasource}"
    parse(variables["fleet"]["query"]["query"].removeprefix("label_values(").rsplit(",", 1)[0])
    ids: set[int] = set()
    cells: set[tuple[int, int]] = set()
    for panel in d["panels"]:
        assert panel["id"] not in ids
        ids.add(panel["id"])
        g = panel["gridPos"]
        assert g["x"] >= 0 and g["w"] > 0 and g["x"] + g["w"] <= 24, panel["title"]
        cover = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not cover & cells, f"panel {panel['title']!r} overlaps another"
        cells |= cover
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        refs = [t["refId"] for t in panel["targets"]]
        assert refs and len(set(refs)) == len(refs)
        assert all(t["datasource"]["uid"] == "${datasource}" for t in panel["targets"])
    exprs = " ".join(e for _, e in dashboard_queries())
    for family in ("router_ttft_seconds", "router_inter_token_latency_seconds", "kv_transfer_bytes_total",
                   "kv_transfer_failures_total", "worker_queue_depth", "worker_kv_usage_ratio",
                   "router_routing_decisions_total", "router_worker_breaker_state"):
        assert f"pdserve:{family}" in exprs, f"the dashboard shows no {family}"


def test_rules_structure() -> None:
    rules = yaml.safe_load((PROM_DIR / "rules.yml").read_text())
    alerts = [r for g in rules["groups"] for r in g["rules"] if "alert" in r]
    names = [a["alert"] for a in alerts]
    assert len(names) == len(set(names))
    for a in alerts:
        assert a["labels"]["severity"] in {"critical", "warning", "info"}, a["alert"]
        assert a["annotations"]["summary"] and a["annotations"]["description"], a["alert"]
        if "for" in a:
            assert re.fullmatch(r"[0-9]+[smh]", a["for"]), a["alert"]
        stripped = THRESHOLD_RE.sub("", a["expr"])
        assert stripped != a["expr"], f"{a['alert']}: no literal threshold to strip"
        assert not {op for op, _ in parse(stripped).top_ops} & COMPARISONS, a["alert"]
    for r in recorded_names():
        assert r.count(":") == 2, f"recording rule {r} is not named level:metric:operations"
    assert {"PdserveWorkerDown", "PdserveKVTransferFailures", "PdserveBreakerOpen"} <= set(names)


def test_ttft_slo_uses_a_real_bucket_and_multiple_windows() -> None:
    ttft = METRICS["pdserve:router_ttft_seconds"]
    assert ttft.kind == "histogram" and ttft.buckets is not None
    rules = yaml.safe_load((PROM_DIR / "rules.yml").read_text())
    windows = set()
    for g in rules["groups"]:
        for r in g["rules"]:
            for le in re.findall(r'le="([^"]+)"', r["expr"]):
                assert float(le) in ttft.buckets, f"le={le} is not a bucket bound of router_ttft_seconds"
            if r.get("alert", "").startswith("PdserveTTFTBudgetBurn"):
                used = re.findall(r"ratio_rate(\w+)", r["expr"])
                assert len(used) >= 2 and len(set(used)) == len(used), r["alert"]
                windows |= set(used)
    assert {"5m", "1h", "30m", "6h"} <= windows


def test_prometheus_yml() -> None:
    cfg = yaml.safe_load((PROM_DIR / "prometheus.yml").read_text())
    for rule_file in cfg["rule_files"]:
        assert (PROM_DIR / rule_file).is_file()
    (job,) = cfg["scrape_configs"]
    assert job["file_sd_configs"][0]["files"] == ["targets/*.json"]
    relabel = job["relabel_configs"]
    keep = next(r for r in relabel if r.get("action") == "keep")
    assert set(keep["regex"].split("|")) == COMPONENTS
    assert any(r.get("target_label") == "component" and r["source_labels"] == ["role"] for r in relabel)
    assert any(r.get("action") == "labeldrop" and r["regex"] == "role" for r in relabel), (
        "the router's own `role` metric label must not be clobbered by the target label"
    )
