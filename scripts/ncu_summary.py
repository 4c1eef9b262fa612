#!/usr/bin/env python3
"""Sums ncu's kernel durations (scripts/device-profile-decode.sh: ncu --csv --metrics gpu__time_duration.sum) per
kernel: launches, total and mean microseconds, share of the step. Usage: ncu_summary.py ncu.csv [ranges]
(ranges: how many profiled decode steps the file holds; totals are divided by it)."""
import csv
import re
import sys
from collections import defaultdict


def short(name):
    name = re.sub(r"^void ", "", name)
    base = re.split(r"[<(]", name, 1)[0]
    targs = re.search(r"<(.*)>\(", name)
    return base + ("<" + targs.group(1)[:60] + ">" if targs else "")


def main():
    path = sys.argv[1]
    ranges = int(sys.argv[2]) if len(sys.argv) > 2 else 1
    rows = []
    with open(path, newline="") as f:
        lines = [l for l in f if l.startswith('"')]
    for r in csv.DictReader(lines):
        if r.get("Metric Name") == "gpu__time_duration.sum":
            rows.append((short(r["Kernel Name"]), float(r["Metric Value"].replace(",", "")) / 1e3))  # ns -> us
    agg = defaultdict(lambda: [0, 0.0])
    for k, us in rows:
        agg[k][0] += 1
        agg[k][1] += us
    total = sum(v[1] for v in agg.values())
    print(f"{len(rows)} kernels, {total / ranges:.1f} us per step (sum of kernel durations, no gaps)")
    for k, (n, us) in sorted(agg.items(), key=lambda kv: -kv[1][1]):
        print(f"{us / ranges:9.1f} us {100 * us / total:5.1f}%  {n // ranges:5d} x {us / n:7.2f} us  {k}")


if __name__ == "__main__":
    main()
