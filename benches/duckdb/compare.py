#!/usr/bin/env python3
"""`revpilot metrics` against the same monthly MRR written as DuckDB SQL, side by side in one run,
with each process's wall time and peak memory.

    python3 benches/duckdb/compare.py [--customers 25000,50000,100000] [--months 24] [--runs 3]

For each size, generates (once) a Stripe-shaped export with `revpilot synth` under
target/bench-data/, builds the release binary, installs duckdb into .venv when missing, then
alternates the two commands `--runs` times, checks that both give the same month-end MRR series,
and prints the median wall times, their ratio and each side's peak RSS. Peak RSS is the child's
own `ru_maxrss` from `wait4` (resident pages, including the file pages a process maps).
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
VENV_PY = ROOT / ".venv" / "bin" / "python"
DUCKDB = "duckdb==2.0.1"


def sh(cmd, **kw):
    return subprocess.run(cmd, check=True, **kw)


def run(cmd):
    """Runs `cmd`; returns (wall seconds, peak RSS in bytes, stdout)."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as errors:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=errors)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        errors.seek(0)
        err = errors.read().decode(errors="replace")
        if proc.returncode != 0:
            sys.exit(f"{cmd[0]} failed ({proc.returncode}): {err}")
        out.seek(0)
        return wall, usage.ru_maxrss * 1024, out.read()


def compare(revpilot, customers, months, runs):
    data = ROOT / "target" / "bench-data"
    data.mkdir(parents=True, exist_ok=True)
    export = data / f"export-{customers}x{months}.json"
    if not export.exists():
        partial = export.with_suffix(".partial")
        with open(partial, "wb") as out:
            sh([str(revpilot), "synth", "--customers", str(customers), "--months", str(months), "--seed", "1"], stdout=out)
        partial.rename(export)
    size_mb = export.stat().st_size / 1e6

    first = "2023-01"
    last_year, last_month = 2023 + (months - 1) // 12, (months - 1) % 12 + 1
    last = f"{last_year}-{last_month:02d}"
    last_day = subprocess.run(["date", "-d", f"{last}-01 +1 month -1 day", "+%F"], capture_output=True, text=True, check=True).stdout.strip()
    ours = [str(revpilot), "metrics", "--input", str(export), "--from", f"{first}-01", "--to", last_day, "--granularity", "month", "--format", "json"]
    theirs = [str(VENV_PY), str(ROOT / "benches" / "duckdb" / "mrr.py"), str(export), first, last]

    times = {"revpilot": [], "duckdb": []}
    peaks = {"revpilot": 0, "duckdb": 0}
    outputs = {}
    for _ in range(runs):
        for name, cmd in (("revpilot", ours), ("duckdb", theirs)):
            wall, peak, stdout = run(cmd)
            times[name].append(wall)
            peaks[name] = max(peaks[name], peak)
            outputs[name] = json.loads(stdout)

    a = [(r["date"], r["mrr"]) for r in outputs["revpilot"]["series"]]
    b = [(r["date"], r["mrr"]) for r in outputs["duckdb"]["series"]]
    if a != b:
        for x, y in zip(a, b):
            if x != y:
                print(f"DIFFERENT: revpilot {x} duckdb {y}")
        sys.exit("the two MRR series differ")

    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"\nexport: {export.name}, {size_mb:.0f} MB, {customers} customers over {months} months")
    print(f"same month-end MRR series from both ({len(a)} months, last {a[-1][1]})")
    for name in ("revpilot", "duckdb"):
        runs_text = ", ".join(f"{t:.2f}" for t in times[name])
        print(f"{name:<9} median {med[name]:6.2f} s   peak RSS {peaks[name] / 2**30:5.2f} GiB   (runs: {runs_text})")
    print(f"revpilot is {med['duckdb'] / med['revpilot']:.2f}x as fast as DuckDB SQL, "
          f"{size_mb / med['revpilot']:.0f} MB/s")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--customers", default="25000,50000,100000", help="comma-separated sizes")
    ap.add_argument("--months", type=int, default=24)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()

    if not VENV_PY.exists():
        sh([sys.executable, "-m", "venv", str(ROOT / ".venv")])
    if subprocess.run([str(VENV_PY), "-c", "import duckdb"], capture_output=True).returncode != 0:
        sh([str(VENV_PY), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", DUCKDB])
    sh(["cargo", "build", "--release", "--quiet", "-p", "revpilot-cli"], cwd=ROOT)
    target = Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target"))
    revpilot = target / "release" / "revpilot"

    for customers in [int(c) for c in str(args.customers).split(",")]:
        compare(revpilot, customers, args.months, args.runs)


if __name__ == "__main__":
    main()
