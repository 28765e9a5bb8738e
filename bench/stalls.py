"""Where a kernel's warps wait, per SASS instruction: reads ``ncu --page source --csv --print-source sass``.

    python3 bench/stalls.py profile_sass.csv [--top 30]

Prints the column names ncu wrote (they vary by version), then the instructions with the most warp-stall
samples, each with its share of all samples, so that a long wait shows next to the instruction that waits
(the wait is charged to the instruction that needs the result, not to the load that produces it).
"""
from __future__ import annotations

import argparse
import csv
import io


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("csv")
    ap.add_argument("--top", type=int, default=30)
    a = ap.parse_args()
    text = open(a.csv, errors="replace").read()
    start = text.find('"Address"') if '"Address"' in text else text.find('"#')
    rows = list(csv.DictReader(io.StringIO(text[max(start, 0):])))
    if not rows:
        raise SystemExit(f"{a.csv}: no rows (ncu wrote: {text[:300]!r})")
    cols = list(rows[0])
    print("columns:", cols)
    sample = next((c for c in cols if c.startswith("Warp Stall Sampling (All")), None)
    if sample is None:
        raise SystemExit("no 'Warp Stall Sampling (All Samples)' column")
    number = lambda v: float(str(v).replace(",", "") or 0)
    total = sum(number(r[sample]) for r in rows) or 1.0
    source = next((c for c in cols if c in ("Source", "SASS")), cols[1])
    reasons = [c for c in cols if c.startswith("stall_") or c.startswith("smsp__pcsamp")]
    print(f"{len(rows)} instructions, {total:.0f} samples; top {a.top}:")
    for r in sorted(rows, key=lambda r: -number(r[sample]))[:a.top]:
        why = sorted(((number(r[c]), c) for c in reasons), reverse=True)[:2]
        print(f"{100 * number(r[sample]) / total:5.1f}%  {r.get('Address', ''):>6}  {r[source][:60]:60}  "
              + " ".join(f"{c}={v:.0f}" for v, c in why if v))


if __name__ == "__main__":
    main()
