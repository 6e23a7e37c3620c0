#!/usr/bin/env python3
"""recfuse (criterion results) next to PyTorch (a `linear.py --json` file), as a markdown table.

    python3 scripts/baselines/compare.py --criterion target/criterion --torch torch.json

Standard library only, so it runs wherever the benches ran. `scripts/bench-table` and
`scripts/device-check run` both use it. The ratio is recfuse throughput ÷ PyTorch throughput
for the same name (above 1, recfuse is faster); times are medians per call.
"""

import argparse
import json
import os


def criterion_results(base, since=0.0):
    """{full_id: (median seconds per call, FLOPs per call or None)} from criterion's
    `<base>/**/new/{benchmark,estimates}.json`, keeping results written at or after `since`."""
    out = {}
    for dirpath, _dirs, files in os.walk(base):
        if os.path.basename(dirpath) != "new" or "benchmark.json" not in files:
            continue
        est_path = os.path.join(dirpath, "estimates.json")
        if not os.path.exists(est_path) or os.path.getmtime(est_path) < since:
            continue
        with open(os.path.join(dirpath, "benchmark.json")) as f:
            bench = json.load(f)
        with open(est_path) as f:
            est = json.load(f)
        flops = (bench.get("throughput") or {}).get("Elements")
        out[bench["full_id"]] = (est["median"]["point_estimate"] * 1e-9, flops)
    return out


def _ratio(a, b):
    return f"{a / b:.2f}×" if a and b else "–"


# linear.py's impl names → (column label, ratio label).
IMPLS = {"torch-eager": ("torch eager", "eager"), "torch-compile": ("torch.compile", "compile")}


def markdown_table(ours, torch_rows, ceiling=None):
    """Lines of a markdown table: one row per recfuse result, PyTorch columns per impl; with
    `ceiling` (a measured GFLOP/s ceiling), a last column: recfuse's share of it."""
    theirs = {}
    for row in torch_rows:
        theirs.setdefault(row["name"], {})[row["impl"]] = row
    head = ["name", "recfuse ms", "recfuse GFLOP/s"]
    for label, short in IMPLS.values():
        head += [f"{label} ms", f"{label} GFLOP/s", f"recfuse / {short}"]
    if ceiling:
        head.append("recfuse / ceiling")
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for name in sorted(ours):
        sec, flops = ours[name]
        gf = flops / sec / 1e9 if flops else None
        cells = [f"`{name}`", f"{sec * 1e3:.3f}", f"{gf:.1f}" if gf else "–"]
        for impl in IMPLS:
            row = theirs.get(name, {}).get(impl)
            if row:
                cells += [f"{row['time_ms']:.3f}", f"{row['gflops']:.1f}", _ratio(gf, row["gflops"])]
            else:
                cells += ["–", "–", "–"]
        if ceiling:
            cells.append(f"{gf / ceiling:.0%}" if gf else "–")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--criterion", required=True, help="criterion's output folder")
    ap.add_argument("--torch", help="JSON written by linear.py --json")
    ap.add_argument("--since", type=float, default=0.0, help="ignore results older (epoch s)")
    args = ap.parse_args()
    ours = criterion_results(args.criterion, args.since)
    rows = []
    if args.torch and os.path.exists(args.torch):
        with open(args.torch) as f:
            rows = json.load(f)["rows"]
    if not ours:
        print("(no criterion results)")
        return
    print("\n".join(markdown_table(ours, rows)))


if __name__ == "__main__":
    main()
