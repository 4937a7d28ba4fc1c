#!/usr/bin/env python3
"""`revpilot metrics` against the same monthly MRR written as DuckDB SQL, side by side in one run.

    python3 benches/duckdb/compare.py [--customers 20000] [--months 24] [--runs 3]

Generates (once) a Stripe-shaped export with `revpilot synth` under target/bench-data/, builds the
release binary, installs duckdb into .venv when missing, then alternates the two commands
`--runs` times, checks that both give the same month-end MRR series, and prints the median wall
times and their ratio.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
VENV_PY = ROOT / ".venv" / "bin" / "python"
DUCKDB = "duckdb==2.0.1"


def sh(cmd, **kw):
    return subprocess.run(cmd, check=True, **kw)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--customers", type=int, default=20000)
    ap.add_argument("--months", type=int, default=24)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()

    if not VENV_PY.exists():
        sh([sys.executable, "-m", "venv", str(ROOT / ".venv")])
    if subprocess.run([str(VENV_PY), "-c", "import duckdb"], capture_output=True).returncode != 0:
        sh([str(VENV_PY), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", DUCKDB])
    sh(["cargo", "build", "--release", "--quiet", "-p", "revpilot-cli"], cwd=ROOT)
    revpilot = ROOT / "target" / "release" / "revpilot"

    data = ROOT / "target" / "bench-data"
    data.mkdir(parents=True, exist_ok=True)
    export = data / f"export-{args.customers}x{args.months}.json"
    if not export.exists():
        with open(export, "wb") as out:
            sh([str(revpilot), "synth", "--customers", str(args.customers), "--months", str(args.months), "--seed", "1"], stdout=out)
    size_mb = export.stat().st_size / 1e6

    first = "2023-01"
    last_year, last_month = 2023 + (args.months - 1) // 12, (args.months - 1) % 12 + 1
    last = f"{last_year}-{last_month:02d}"
    last_day = subprocess.run(["date", "-d", f"{last}-01 +1 month -1 day", "+%F"], capture_output=True, text=True, check=True).stdout.strip()
    ours = [str(revpilot), "metrics", "--input", str(export), "--from", f"{first}-01", "--to", last_day, "--granularity", "month"]
    theirs = [str(VENV_PY), str(ROOT / "benches" / "duckdb" / "mrr.py"), str(export), first, last]

    times = {"revpilot": [], "duckdb": []}
    outputs = {}
    for _ in range(args.runs):
        for name, cmd in (("revpilot", ours), ("duckdb", theirs)):
            start = time.perf_counter()
            done = subprocess.run(cmd, capture_output=True, check=True)
            times[name].append(time.perf_counter() - start)
            outputs[name] = json.loads(done.stdout)

    a = [(r["date"], r["mrr"]) for r in outputs["revpilot"]["series"]]
    b = [(r["date"], r["mrr"]) for r in outputs["duckdb"]["series"]]
    if a != b:
        for x, y in zip(a, b):
            if x != y:
                print(f"DIFFERENT: revpilot {x} duckdb {y}")
        sys.exit("the two MRR series differ")

    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"export: {export.name}, {size_mb:.0f} MB, {args.customers} customers over {args.months} months")
    print(f"same month-end MRR series from both ({len(a)} months, last {a[-1][1]})")
    for name in ("revpilot", "duckdb"):
        runs = ", ".join(f"{t:.2f}" for t in times[name])
        print(f"{name:<9} median {med[name]:6.2f} s   (runs: {runs})")
    print(f"revpilot is {med['duckdb'] / med['revpilot']:.1f}x faster than DuckDB SQL")


if __name__ == "__main__":
    main()
