"""Turn the raw records into figures, a markdown table with ratios, a JSON and PNG charts."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from perf.proxies import Target
from perf.upstream import UPSTREAM_THREADS

Records = list[dict[str, Any]]

# Ratios compare fastproxy with these rows (the proxies a user could run instead).
PEER_LAUNCHERS = ("stunnel", "haproxy", "threaded", "asyncio")


@dataclass(frozen=True)
class Metric:
    key: str
    label: str
    unit: str
    higher_better: bool
    extract: Callable[[Records, str], float | None]
    proxy_only: bool = False  # meaningless for plain-tcp / direct-tls
    ranked: bool = True  # False: diagnostic only, no "best peer" and no ratios


# The field that ranks repeated runs of one test (higher is better); the report keeps the best.
_PRIMARY = ("mbps", "rps", "cps", "tps")


def _rec(records: Records, target: str, test: str) -> dict[str, Any] | None:
    """The best successful run of ``test`` on ``target`` (tests may run several rounds)."""
    runs = [
        r
        for r in records
        if r.get("target") == target and r.get("test") == test and "error" not in r
    ]
    if not runs:
        return None
    key = next((k for k in _PRIMARY if k in runs[0]), None)
    return max(runs, key=lambda r: float(r.get(key, 0))) if key else runs[0]


def _busy(tests: tuple[str, ...]) -> Callable[[Records, str], float | None]:
    """Proxy CPU seconds per wall second over the tests: well below 1 for a single-threaded
    proxy that is not keeping up means it waits (missed wake-ups, backpressure stalls)."""

    def get(records: Records, target: str) -> float | None:
        cpu = wall = 0.0
        for t in tests:
            r = _rec(records, target, t)
            if r is None or "proxy_cpu_s" not in r or not r.get("wall_s"):
                continue
            cpu += r["proxy_cpu_s"]
            wall += r["wall_s"]
        return cpu / wall if wall else None

    return get


def _field(test: str, name: str, scale: float = 1.0) -> Callable[[Records, str], float | None]:
    def get(records: Records, target: str) -> float | None:
        r = _rec(records, target, test)
        if r is None or name not in r or r[name] is None or r[name] < 0:
            return None
        return float(r[name]) * scale

    return get


def _cpu_per_gb(tests: tuple[str, ...]) -> Callable[[Records, str], float | None]:
    def get(records: Records, target: str) -> float | None:
        cpu = gb = 0.0
        for t in tests:
            r = _rec(records, target, t)
            if r is None or "proxy_cpu_s" not in r:
                return None
            cpu += r["proxy_cpu_s"]
            gb += r["bytes"] / 1e9
        return cpu / gb if gb else None

    return get


def _cpu_per(test: str, count_field: str, scale: float) -> Callable[[Records, str], float | None]:
    def get(records: Records, target: str) -> float | None:
        r = _rec(records, target, test)
        if r is None or "proxy_cpu_s" not in r or not r.get(count_field):
            return None
        return float(r["proxy_cpu_s"]) / float(r[count_field]) * scale

    return get


def _hold_base(records: Records, target: str) -> float | None:
    for r in records:
        test = str(r.get("test", ""))
        if r.get("target") == target and test.startswith("hold-") and "proxy_rss_before" in r:
            return float(r["proxy_rss_before"]) / 2**20
    return None


def metrics_for(records: Records) -> list[Metric]:
    tests = {str(r.get("test")) for r in records}
    out: list[Metric] = []
    for direction in ("up", "down"):
        for conns in (1, 16):
            t = f"{direction}-{conns}"
            if t in tests:
                word = "upload" if direction == "up" else "download"
                out.append(Metric(t, f"{word} x{conns}", "MB/s", True, _field(t, "mbps")))
    for direction in ("up", "down"):
        ts = tuple(t for t in (f"{direction}-1", f"{direction}-16") if t in tests)
        if ts:
            word = "upload" if direction == "up" else "download"
            out.append(
                Metric(
                    f"cpu-gb-{direction}",
                    f"proxy CPU per GB, {word}",
                    "CPU s/GB",
                    False,
                    _cpu_per_gb(ts),
                    proxy_only=True,
                )
            )
    bulk = tuple(t for t in ("up-1", "up-16", "down-1", "down-16") if t in tests)
    if bulk:
        out.append(
            Metric(
                "busy-bulk",
                "proxy CPU busy during bulk (diagnostic)",
                "cores",
                False,
                _busy(bulk),
                proxy_only=True,
                ranked=False,
            )
        )
    for conns in (1, 64):
        t = f"pingpong-{conns}"
        if t not in tests:
            continue
        out.append(
            Metric(f"{t}-rps", f"ping-pong x{conns} round trips", "1/s", True, _field(t, "rps"))
        )
        for name, label in (("p50_us", "p50"), ("p99_us", "p99"), ("p999_us", "p99.9")):
            out.append(
                Metric(f"{t}-{label}", f"ping-pong x{conns} {label}", "µs", False, _field(t, name))
            )
        out.append(
            Metric(
                f"{t}-cpu",
                f"proxy CPU per round trip x{conns}",
                "µs",
                False,
                _cpu_per(t, "count", 1e6),
                proxy_only=True,
            )
        )
    if "pingpong-64" in tests:
        out.append(
            Metric(
                "busy-pp64",
                "proxy CPU busy during ping-pong x64 (diagnostic)",
                "cores",
                False,
                _busy(("pingpong-64",)),
                proxy_only=True,
                ranked=False,
            )
        )
    if "connrate" in tests:
        out += [
            Metric("connrate", "new connections", "conn/s", True, _field("connrate", "cps")),
            Metric("connrate-p50", "new connection p50", "µs", False, _field("connrate", "p50_us")),
            Metric("connrate-p99", "new connection p99", "µs", False, _field("connrate", "p99_us")),
            Metric(
                "connrate-cpu",
                "proxy CPU per new connection",
                "ms",
                False,
                _cpu_per("connrate", "count", 1e3),
                proxy_only=True,
            ),
        ]
    holds = sorted({int(str(t).split("-")[1]) for t in tests if str(t).startswith("hold-")})
    if holds:
        out.append(Metric("rss-base", "proxy RSS before holding", "MiB", False, _hold_base, True))
    for n in holds:
        out.append(
            Metric(
                f"hold-{n}",
                f"RSS per idle connection, N={n}",
                "KiB",
                False,
                _field(f"hold-{n}", "rss_per_conn", 1 / 1024),
                proxy_only=True,
            )
        )
    pg = sorted(
        {str(t) for t in tests if str(t).startswith("pg-")},
        key=lambda s: (s.rsplit("-", 1)[0], int(s.rsplit("-", 1)[1])),
    )
    for t in pg:
        mode, clients = t[3:].rsplit("-", 1)
        out.append(
            Metric(f"{t}-tps", f"pgbench {mode} -c {clients}", "TPS", True, _field(t, "tps"))
        )
        out.append(
            Metric(
                f"{t}-lat",
                f"pgbench {mode} -c {clients} latency",
                "ms",
                False,
                _field(t, "latency_ms"),
            )
        )
        out.append(
            Metric(
                f"{t}-cpu",
                f"proxy CPU per transaction, {mode} -c {clients}",
                "µs",
                False,
                _cpu_per(t, "transactions", 1e6),
                proxy_only=True,
            )
        )
    return out


def _fmt(v: float | None) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    a = abs(v)
    if a >= 1000:
        return f"{v:,.0f}"
    if a >= 100:
        return f"{v:.0f}"
    if a >= 10:
        return f"{v:.1f}"
    if a >= 1:
        return f"{v:.2f}"
    return f"{v:.3f}"


def _ratio(fp: float | None, other: float | None, higher_better: bool) -> str:
    """fastproxy ÷ other, written so that > 1 always means fastproxy is better."""
    if fp is None or other is None or fp <= 0 or other <= 0:
        return "-"
    r = fp / other if higher_better else other / fp
    return f"{r:.2f}x"


def figures(records: Records, targets: list[Target]) -> dict[str, dict[str, float | None]]:
    table: dict[str, dict[str, float | None]] = {}
    for m in metrics_for(records):
        row: dict[str, float | None] = {}
        for t in targets:
            row[t.name] = (
                None if (m.proxy_only and t.kind != "proxy") else m.extract(records, t.name)
            )
        table[m.key] = row
    return table


def markdown(records: Records, targets: list[Target], notes: list[str]) -> str:
    present = [t for t in targets if any(r.get("target") == t.name for r in records)]
    peers = [t for t in present if t.launcher in PEER_LAUNCHERS]
    fp_name = next((t.name for t in present if t.name == "fastproxy"), None) or next(
        (t.name for t in present if t.is_fastproxy), None
    )
    metrics = metrics_for(records)
    fig = figures(records, present)
    lines: list[str] = []
    head = ["figure", "unit", *[t.name for t in present]]
    if fp_name and peers:
        head += [f"{fp_name} ÷ best peer", "best peer"]
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "|".join(["---"] * 2 + ["---:"] * (len(head) - 2)) + "|")
    for m in metrics:
        row = fig[m.key]
        arrow = (" ↑" if m.higher_better else " ↓") if m.ranked else ""
        cells = [m.label + arrow, m.unit]
        cells += [_fmt(row.get(t.name)) for t in present]
        if fp_name and peers and not m.ranked:
            cells += ["-", "-"]
        elif fp_name and peers:
            vals = [(row.get(p.name), p.name) for p in peers if row.get(p.name)]
            if vals:
                best_v, best_n = (max if m.higher_better else min)(vals, key=lambda x: x[0] or 0)
                cells += [_ratio(row.get(fp_name), best_v, m.higher_better), best_n]
            else:
                cells += ["-", "-"]
        lines.append("| " + " | ".join(cells) + " |")
    out = "\n".join(lines) + "\n"
    out += '\n↑ higher is better, ↓ lower is better. Ratios read "how many times better '
    out += 'fastproxy is": above 1x fastproxy wins, below 1x the peer wins.\n'

    # fastproxy rows against each peer
    fps = [t for t in present if t.is_fastproxy]
    if fps and peers:
        out += "\n### fastproxy ÷ each peer (> 1x = fastproxy better)\n\n"
        cols = [f"{f.name} ÷ {p.name}" for f in fps for p in peers]
        out += "| figure | " + " | ".join(cols) + " |\n"
        out += "|---|" + "|".join(["---:"] * len(cols)) + "|\n"
        for m in metrics:
            if not m.ranked:
                continue
            row = fig[m.key]
            cells = [m.label]
            for f in fps:
                for p in peers:
                    cells.append(_ratio(row.get(f.name), row.get(p.name), m.higher_better))
            out += "| " + " | ".join(cells) + " |\n"

    # upstream headroom
    head_lines = headroom(records, present)
    if head_lines:
        out += "\n### Upstream headroom (direct TLS ÷ fastest proxy; must be well above 1x)\n\n"
        out += "\n".join(f"* {line}" for line in head_lines) + "\n"
    errors = [r for r in records if "error" in r]
    warnings = [r for r in records if "warning" in r]
    if errors or warnings or notes:
        out += "\n### Notes\n\n"
        for n in notes:
            out += f"* {n}\n"
        for r in errors:
            out += f"* {r.get('target')} {r.get('test')}: {r['error']}\n"
        for r in warnings:
            rnd = f" (round {r['round']})" if "round" in r else ""
            out += f"* {r.get('target')} {r.get('test')}{rnd}: {r['warning']}\n"
    return out


def headroom(records: Records, targets: list[Target]) -> list[str]:
    direct = next((t.name for t in targets if t.kind == "direct"), None)
    proxies = [t.name for t in targets if t.kind == "proxy"]
    if not direct or not proxies:
        return []
    out = []
    for test, field, label in (
        ("up-1", "mbps", "upload x1"),
        ("up-16", "mbps", "upload x16"),
        ("down-1", "mbps", "download x1"),
        ("down-16", "mbps", "download x16"),
        ("pingpong-64", "rps", "ping-pong x64 round trips/s"),
        ("connrate", "cps", "new connections/s"),
    ):
        d = _rec(records, direct, test)
        vals = [(r[field], p) for p in proxies if (r := _rec(records, p, test)) and field in r]
        if d is None or not vals or field not in d:
            continue
        best, who = max(vals)
        if best > 0:
            out.append(
                f"{label}: direct TLS {_fmt(d[field])} vs {who} {_fmt(best)} = "
                f"{d[field] / best:.2f}x"
            )
    # How busy the upstream (haproxy + sink) was while each proxy ran its hardest tests.
    loads = []
    for p in proxies:
        for r in records:
            if r.get("target") == p and r.get("wall_s") and "upstream_cpu_s" in r:
                loads.append((r["upstream_cpu_s"] / r["wall_s"], p, r["test"]))
    if loads:
        top, who, test = max(loads)
        out.append(
            f"busiest upstream moment: {top:.2f} CPU cores (haproxy + sink) during {who} {test}; "
            f"haproxy runs {UPSTREAM_THREADS} threads on {os.cpu_count()} CPUs shared with "
            "everything else"
        )
    return out


def write_json(
    path: Path,
    records: Records,
    targets: list[Target],
    notes: list[str],
    meta: dict[str, Any],
) -> None:
    present = [t for t in targets if any(r.get("target") == t.name for r in records)]
    doc = {
        **meta,
        "targets": [
            {"name": t.name, "kind": t.kind, "description": t.description, "note": t.note}
            for t in present
        ],
        "figures": figures(records, present),
        "metrics": {
            m.key: {"label": m.label, "unit": m.unit, "higher_is_better": m.higher_better}
            for m in metrics_for(records)
        },
        "notes": notes,
        "raw": records,
    }
    path.write_text(json.dumps(doc, indent=2, default=str) + "\n")


def charts(outdir: Path, records: Records, targets: list[Target]) -> list[Path]:
    """Throughput, latency percentiles, memory per connection, pgbench TPS (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    present = [t for t in targets if any(r.get("target") == t.name for r in records)]
    fig_values = figures(records, present)
    written: list[Path] = []

    def grouped(
        filename: str,
        title: str,
        ylabel: str,
        keys: list[tuple[str, str]],
        rows: list[Target],
        log: bool = False,
    ) -> None:
        keys = [(k, lab) for k, lab in keys if k in fig_values]
        if not keys:
            return
        fig, ax = plt.subplots(figsize=(min(16, max(8, 1.3 * len(rows) * len(keys) / 3)), 5))
        width = 0.8 / len(keys)
        for i, (k, lab) in enumerate(keys):
            vals = [fig_values[k].get(t.name) or 0.0 for t in rows]
            xs = [j + i * width for j in range(len(rows))]
            ax.bar(xs, vals, width, label=lab)
        ax.set_xticks([j + width * (len(keys) - 1) / 2 for j in range(len(rows))])
        ax.set_xticklabels([t.name for t in rows], rotation=20, ha="right")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        if log:
            ax.set_yscale("log")
        ax.legend()
        ax.grid(axis="y", alpha=0.3)
        fig.tight_layout()
        path = outdir / filename
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)

    proxies = [t for t in present if t.kind == "proxy"]
    grouped(
        "throughput.png",
        "Bulk throughput by proxy (MB/s, 10^6 B)",
        "MB/s",
        [
            ("up-1", "upload x1"),
            ("up-16", "upload x16"),
            ("down-1", "download x1"),
            ("down-16", "download x16"),
        ],
        present,
    )
    grouped(
        "latency.png",
        "Ping-pong latency, 100-byte messages (µs, log scale)",
        "µs",
        [
            ("pingpong-1-p50", "x1 p50"),
            ("pingpong-1-p99", "x1 p99"),
            ("pingpong-1-p99.9", "x1 p99.9"),
            ("pingpong-64-p50", "x64 p50"),
            ("pingpong-64-p99", "x64 p99"),
            ("pingpong-64-p99.9", "x64 p99.9"),
        ],
        present,
        log=True,
    )
    holds = sorted((k for k in fig_values if k.startswith("hold-")), key=lambda k: int(k[5:]))
    grouped(
        "memory.png",
        "Proxy RSS per idle connection (KiB)",
        "KiB per connection",
        [(k, f"N={k.split('-')[1]}") for k in holds],
        proxies,
    )
    pg_keys = sorted(
        (k for k in fig_values if k.startswith("pg-") and k.endswith("-tps")),
        key=lambda s: (s.split("-")[1], int(s.split("-")[-2])),
    )
    grouped(
        "pgbench.png",
        "pgbench TPS through each proxy",
        "TPS",
        [(k, k[3:-4]) for k in pg_keys],
        [t for t in present if t.kind != "direct"],
    )
    return written
