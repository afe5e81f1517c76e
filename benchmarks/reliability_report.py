"""The reliability table: one row per fault or bad input that tests/reliability tried.

Each reliability test writes artifacts/reliability/<name>.json (requests sent, statuses seen, what
was lost); this prints them as one markdown table, plus the soak figures when a soak.json is given.

    .venv/bin/pytest tests/reliability                 # writes the artifacts
    .venv/bin/python -m benchmarks.reliability_report [--dir DIR] [--soak runs/soak/<time>/soak.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
ORDER = ["redis fault", "bad bundle", "bad input", "concurrency", "security"]


def _statuses(counts: dict[str, int]) -> str:
    return ", ".join(f"{status}: {n}" for status, n in counts.items()) or "-"


def _detail(doc: dict[str, Any]) -> str:
    parts = []
    if "events" in doc:
        e = doc["events"]
        acked = e.get("acked_events", e.get("sent"))
        parts.append(f"events acked {acked}, lost {e['lost']}, duplicated {e['duplicated']}")
        if "unknown_outcome_events" in e:
            parts.append(
                f"unknown outcome {e['unknown_outcome_events']} ({e['unknown_outcome_applied']} applied)"
            )
    if "latency_ms" in doc:
        lat = doc["latency_ms"]
        bound = f" (bound {doc['bound_ms']:.0f})" if "bound_ms" in doc else ""
        parts.append(f"p99 {lat['p99']} ms, max {lat['max']} ms{bound}")
    if "ready_again_after_s" in doc:
        parts.append(f"ready again {doc['ready_again_after_s']} s after Redis")
    if "attempts" in doc:
        parts.append(f"{len(doc['attempts'])} bad versions refused")
    if "mixed" in doc:
        parts.append(f"answers mixing versions: {doc['mixed']}")
    if "server_errors" in doc:
        parts.append(f"5xx: {doc['server_errors']}")
    if "notes" in doc:
        parts.append(doc["notes"])
    return "; ".join(parts)


def table(docs: list[dict[str, Any]]) -> list[str]:
    docs = sorted(
        docs, key=lambda d: (ORDER.index(d["category"]) if d["category"] in ORDER else 99, d["name"])
    )
    lines = ["| test | category | requests | statuses | lost | detail |", "|---|---|---|---|---|---|"]
    for d in docs:
        statuses = d.get("statuses_by_endpoint") or {"all": d.get("statuses", {})}
        seen = "<br>".join(f"{k}: {_statuses(v)}" for k, v in statuses.items())
        lines.append(
            f"| {d['name']} | {d['category']} | {d['requests']} | {seen} | {d['lost']} | {_detail(d)} |"
        )
    total = sum(d["requests"] for d in docs)
    lost = sum(d["lost"] for d in docs)
    lines.append(f"| **total** | | **{total}** | | **{lost}** | |")
    return lines


def _row(*cells: object) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def soak_lines(path: Path) -> list[str]:
    doc = json.loads(path.read_text())
    v = doc["verdict"]
    r, f, t = v["rss_mib"], v["fds"], v["tcp"]
    return [
        f"Soak ({doc['duration_s']} s, {doc['settings']['users']} users): {v['requests']} requests, "
        f"{v['failures']} failures; verdict {'ok' if v['ok'] else '; '.join(v['problems'])}",
        "",
        "| | before load | after warm-up | end of load | max | after load |",
        "|---|---|---|---|---|---|",
        _row("RSS MiB", r["before_load"], r["after_warmup"], r["end_of_load"], r["max"], r["after_load"]),
        _row("open fds", f["before_load"], f["after_warmup"], f["end_of_load"], f["max"], f["after_load"]),
        _row(
            "TCP connections", t["before_load"], "", t["end_of_load"], t["max_during_load"], t["after_load"]
        ),
        "",
        f"RSS growth after the warm-up: {r['growth_after_warmup']} MiB "
        f"({r['slope_mib_per_min_after_warmup']} MiB/min).",
    ]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", type=Path, default=ROOT / "artifacts" / "reliability")
    ap.add_argument("--soak", type=Path, help="a soak.json written by benchmarks/soak.py")
    args = ap.parse_args(argv)
    docs = [json.loads(p.read_text()) for p in sorted(args.dir.glob("*.json"))]
    if not docs and args.soak is None:
        print(f"no artifacts in {args.dir}: run `.venv/bin/pytest tests/reliability` first")
        return 1
    lines = table(docs) if docs else []
    if args.soak is not None:
        lines += ["", *soak_lines(args.soak)]
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
