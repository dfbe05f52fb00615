"""``python -m perf run [--quick] [--only SECTIONS] [--targets NAMES]``: the load test.

Normally started through ``scripts/perf``, which installs what is needed first. Prints a
markdown table (stdout) with fastproxy's ratio to the best peer; the full run (without
``--quick``) also writes ``results/`` (JSON of raw numbers, machine and versions; PNG charts).
See perf/README.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import importlib.metadata
import os
import shlex
import signal
import sys
import time
from pathlib import Path
from types import FrameType

from perf import procs, report
from perf.proxies import default_targets
from perf.run import SECTIONS, Plan, run_all
from perf.upstream import machine, tool_versions

REPO = Path(__file__).resolve().parent.parent


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _versions() -> dict[str, str]:
    out = tool_versions()
    out["python"] = sys.version.split()[0]
    for dist in ("fastproxy", "pyOpenSSL", "cryptography", "uvloop", "matplotlib"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = "not installed"
    # fastproxy and the Python peers' TLS: the OpenSSL inside the cryptography wheel (pyOpenSSL)
    # and the one the standard library's ssl links, which need not be the system's (haproxy's).
    try:
        from OpenSSL import SSL

        out["openssl (pyOpenSSL)"] = SSL.OpenSSL_version(SSL.OPENSSL_VERSION).decode()
    except ImportError:
        out["openssl (pyOpenSSL)"] = "not installed"
    import ssl

    out["openssl (stdlib ssl)"] = ssl.OPENSSL_VERSION
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m perf", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="run the load test")
    r.add_argument("--quick", action="store_true", help="short runs, < 3 minutes, no results/")
    r.add_argument(
        "--only", default="", help=f"comma-separated sections: {','.join(SECTIONS)} (default all)"
    )
    r.add_argument("--targets", default="", help="comma-separated row names (default all)")
    r.add_argument(
        "--fastproxy-row",
        action="append",
        default=[],
        metavar="NAME=ARGS",
        help="an extra fastproxy row, e.g. 'fp-quiet=--skip-metadata-exchange --quiet'",
    )
    r.add_argument(
        "--server-key",
        choices=("rsa", "ec"),
        default="ec",
        help="key of the upstream's server certificate: ec = P-256 (default, keeps the "
        "upstream's handshake cheap), rsa = RSA-2048; clients always use RSA-2048",
    )
    r.add_argument("--results", type=Path, default=REPO / "results", help="output directory")
    r.add_argument("--write-results", action="store_true", help="write results/ in quick mode")
    args = p.parse_args(argv)

    sections = set(SECTIONS)
    if args.only:
        sections = {s.strip() for s in args.only.split(",") if s.strip()}
        unknown = sections - set(SECTIONS)
        if unknown:
            p.error(f"unknown section(s): {', '.join(sorted(unknown))}")
    extra: list[tuple[str, list[str]]] = []
    for spec in args.fastproxy_row:
        name, _, rest = spec.partition("=")
        if not name or not rest:
            p.error(f"--fastproxy-row wants NAME=ARGS, got {spec!r}")
        extra.append((name, shlex.split(rest)))
    targets, notes = default_targets(extra)
    if args.targets:
        wanted = {s.strip() for s in args.targets.split(",") if s.strip()}
        targets = [t for t in targets if t.name in wanted]
    for n in notes:
        print(f"note: {n}", file=sys.stderr)

    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGHUP, _terminate)
    plan = dataclasses.replace(Plan.make(args.quick), server_key=args.server_key)
    write = not args.quick or args.write_results
    started = dt.datetime.now(dt.UTC)
    load_before = os.getloadavg()
    t0 = time.monotonic()
    try:
        records, run_notes, config = run_all(plan, targets, sections, args.results / "build")
    except KeyboardInterrupt:
        print("\ninterrupted: every child process was stopped", file=sys.stderr)
        return 130
    finally:
        procs.stop_all()
    wall = time.monotonic() - t0
    load_after = os.getloadavg()
    notes += run_notes
    if load_before[0] > (os.cpu_count() or 1) / 2:
        notes.append(
            f"the machine was not idle: 1-minute load average {load_before[0]:.2f} at the start "
            "(other processes share the CPUs; expect noise)"
        )
    flavour = next((t.note for t in targets if t.launcher == "asyncio"), "")
    if flavour:
        notes.append(f"py-asyncio runs on {flavour}")
    table = report.markdown(records, targets, notes)
    mode = "quick" if args.quick else "full"
    print(
        f"## fastproxy load test ({mode}, {wall:.0f} s wall, {os.cpu_count()} CPUs, "
        f"load average {load_before[0]:.2f} before / {load_after[0]:.2f} after)\n"
    )
    print(table)
    if write:
        out = args.results
        out.mkdir(parents=True, exist_ok=True)
        stamp = started.strftime("%Y%m%dT%H%M%SZ")
        meta = {
            "started": started.isoformat(),
            "wall_seconds": wall,
            "load_average_before": load_before,
            "load_average_after": load_after,
            "mode": mode,
            "machine": machine(),
            "versions": _versions(),
            "config": config,
        }
        json_path = out / f"perf-{stamp}.json"
        report.write_json(json_path, records, targets, notes, meta)
        (out / "latest.json").write_text(json_path.read_text())
        (out / f"perf-{stamp}.md").write_text(table)
        try:
            charts = report.charts(out, records, targets)
        except ImportError:
            charts = []
            print("matplotlib not installed: no charts", file=sys.stderr)
        print(f"results: {json_path}" + "".join(f"\ncharts: {c}" for c in charts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
