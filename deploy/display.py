"""Text renderings of a fleet's status (pure functions; the CLI prints them)."""

from __future__ import annotations

from typing import Any

from pdserve.deploy.config import ROLES

COLUMNS = ("NAME", "ROLE", "STATE", "URL", "PID", "RESTARTS", "RUNNING", "WAITING", "KV", "TRANSPORT")


def _cell(value: Any) -> str:
    return "-" if value is None else str(value)


def status_rows(status: dict[str, Any]) -> list[tuple[str, ...]]:
    rows: list[tuple[str, ...]] = []
    router = status["router"]
    rows.append((
        router["name"], "router", router["state"], _cell(router["url"]), _cell(router["pid"]),
        str(router["restarts"]), "-", "-", "-", "-",
    ))
    for w in status["workers"]:
        load = w.get("load") or {}
        kv = load.get("kv_usage")
        state = w["state"] if w["registered"] or w["state"] != "healthy" else "healthy (unregistered)"
        rows.append((
            w["name"], w["role"], state, _cell(w["url"]), _cell(w["pid"]), str(w["restarts"]),
            _cell(load.get("running")), _cell(load.get("waiting")),
            "-" if kv is None else f"{100 * kv:.1f}%", _cell(load.get("transport")),
        ))
    return rows


def status_table(status: dict[str, Any]) -> str:
    rows = [COLUMNS, *status_rows(status)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(COLUMNS))]
    lines = ["  ".join(cell.ljust(widths[i]) for i, cell in enumerate(r)).rstrip() for r in rows]
    summary = (
        f"fleet {status['fleet']}: {'ready' if status['ready'] else 'NOT ready'}; desired "
        + ", ".join(f"{status['desired'][r]} {r}" for r in ROLES)
        + f"; controller metrics on port {status['controller']['metrics_port']}"
    )
    errors = [f"  {w['name']}: {w['error']}" for w in status["workers"] if w.get("error")]
    if status["router"].get("error"):
        errors.insert(0, f"  {status['router']['name']}: {status['router']['error']}")
    return "\n".join([summary, *lines, *(["errors:", *errors] if errors else [])])


def progress_line(status: dict[str, Any], elapsed_s: float) -> str:
    parts = [f"router {status['router']['state']}"]
    for role in ROLES:
        ws = [w for w in status["workers"] if w["role"] == role]
        ok = sum(1 for w in ws if w["state"] == "healthy" and w["registered"])
        busy = sorted({w["state"] for w in ws if not (w["state"] == "healthy" and w["registered"])})
        parts.append(f"{role} {ok}/{status['desired'][role]}" + (f" ({', '.join(busy)})" if busy else ""))
    return f"[{elapsed_s:5.1f}s] " + " | ".join(parts)
