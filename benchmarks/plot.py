"""Plots and headline tables from the benchmark CSVs (the latest measurement of every case).

    python benchmarks/plot.py [--results DIR]

For every microbench*.csv under DIR (default benchmarks/results/): per device and dtype, a PNG with the
speedup against `reference` (top row) and the peak memory (bottom row) of every method, one column per mode
(`<csv stem>_<device>_<dtype>.png`), and `<csv stem>_<device>_summary.md`: for each case, our fastest backend
against reference, sdpa-expand (PEFT + SDPA) and sdpa-concat (no copy), and the memory it saves. For e2e.csv:
`e2e_<device>.png` (tokens/s and peak memory per model and method).
"""

from __future__ import annotations

import argparse
import glob
import os
import sys
from collections import defaultdict

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import markdown_table, read_csv, results_dir  # noqa: E402

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

OURS = ("triton", "cuda", "cpu")
CASE = ("device", "dtype", "shape", "B", "Hq", "Hkv", "L", "S", "P", "D", "causal", "mode")


def latest(rows: list[dict], key: tuple[str, ...]) -> list[dict]:
    """The last row of every key (CSV rows are appended in time order)."""
    out = {}
    for r in rows:
        out[tuple(r.get(k, "") for k in key)] = r
    return list(out.values())


def case_label(r: dict) -> str:
    return f"{r['shape']}\nB{r['B']} H{r['Hq']}/{r['Hkv']} L{r['L']} S{r['S']} P{r['P']} D{r['D']}"


def plot_microbench(csv_path: str, out: str) -> list[str]:
    # A row without a time is a method whose result was wrong (microbench.py times no wrong kernel).
    rows = [r for r in latest(read_csv(csv_path), CASE + ("backend",)) if r.get("ms") not in ("", None)]
    stem = os.path.splitext(os.path.basename(csv_path))[0]
    written = []
    by_dev = defaultdict(list)
    for r in rows:
        by_dev[(r["device"].split(":")[0], r["dtype"])].append(r)
    for (device, dtype), rs in sorted(by_dev.items()):
        modes = [m for m in ("fwd", "bwd", "fwd+bwd") if any(r["mode"] == m for r in rs)]
        methods = list(dict.fromkeys(r["backend"] for r in rs))
        fig, axes = plt.subplots(2, len(modes), figsize=(max(6, 5.5 * len(modes)), 9), squeeze=False)
        for col, mode in enumerate(modes):
            mr = [r for r in rs if r["mode"] == mode]
            cases = list(dict.fromkeys(case_label(r) for r in mr))
            width = 0.8 / max(1, len(methods))
            for row, (field, ylabel) in enumerate((("speedup_vs_reference", "speedup vs reference (x)"),
                                                   ("peak_mib", "peak memory of one call (MiB)"))):
                ax = axes[row][col]
                for i, m in enumerate(methods):
                    values = {case_label(r): float(r[field]) for r in mr if r["backend"] == m}
                    xs = [j + i * width for j, c in enumerate(cases) if c in values]
                    ax.bar(xs, [values[c] for c in cases if c in values], width, label=m)
                ax.set_xticks([j + 0.4 - width / 2 for j in range(len(cases))])
                ax.set_xticklabels(cases, fontsize=6, rotation=60, ha="right")
                ax.set_ylabel(ylabel)
                if row == 0:
                    ax.axhline(1.0, color="black", linewidth=0.6)
                    ax.set_yscale("log")
                    ax.set_title(f"{device} {dtype} {mode}")
                ax.grid(axis="y", alpha=0.3)
        axes[0][0].legend(fontsize=7)
        fig.tight_layout()
        path = os.path.join(out, f"{stem}_{device}_{dtype}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    for device in sorted({d for d, _ in by_dev}):
        path = os.path.join(out, f"{stem}_{device}_summary.md")
        with open(path, "w") as f:
            f.write(summary_table([r for r in rows if r["device"].split(":")[0] == device]))
        written.append(path)
    return written


def summary_table(rows: list[dict]) -> str:
    """Per case: our fastest backend, its time, and its speedup / memory saved against each baseline."""
    cases = defaultdict(dict)
    for r in rows:
        cases[tuple(r[k] for k in CASE)][r["backend"]] = r
    header = ["dtype", "case", "mode", "ours", "ours ms", "vs reference", "vs sdpa-expand", "vs sdpa-concat",
              "vs flex", "vs flash-attn", "peak MiB ours / reference"]
    table = []
    for by in cases.values():
        ours = [by[b] for b in OURS if b in by]
        if not ours:
            continue
        best = min(ours, key=lambda r: float(r["ms"]))
        ms = float(best["ms"])

        def ratio(name, by=by, ms=ms):
            return f"{float(by[name]['ms']) / ms:.2f}x" if name in by else "-"
        mem = f"{float(best['peak_mib']):.1f} / {float(by['reference']['peak_mib']):.1f}" if "reference" in by else "-"
        r = best
        table.append([r["dtype"], f"{r['shape']} B{r['B']} H{r['Hq']}/{r['Hkv']} L{r['L']} S{r['S']} P{r['P']} "
                      f"D{r['D']}", r["mode"], r["backend"], f"{ms:.3f}", ratio("reference"), ratio("sdpa-expand"),
                      ratio("sdpa-concat"), ratio("flex"), ratio("flash-attn"), mem])
    machine = rows[0]["machine"] if rows else ""
    return (f"Speedup of our fastest backend = other method's time / ours (>1: ours faster), latest run per case. "
            f"{machine}; {rows[0].get('versions', '') if rows else ''}; commit {rows[0]['commit'] if rows else ''}.\n\n"
            + markdown_table(header, table))


def plot_e2e(csv_path: str, out: str) -> list[str]:
    rows = latest(read_csv(csv_path), ("device", "dtype", "model", "B", "T", "P", "method"))
    written = []
    for device in sorted({r["device"].split(":")[0] for r in rows}):
        rs = [r for r in rows if r["device"].split(":")[0] == device]
        workloads = list(dict.fromkeys(f"{r['model']} B{r['B']} T{r['T']} P{r['P']}" for r in rs))
        methods = list(dict.fromkeys(r["method"] for r in rs))
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
        width = 0.8 / max(1, len(methods))
        for ax, field, label in ((axes[0], "tokens_per_s", "training tokens/s"), (axes[1], "peak_mib", "peak MiB")):
            for i, m in enumerate(methods):
                values = {f"{r['model']} B{r['B']} T{r['T']} P{r['P']}": float(r[field])
                          for r in rs if r["method"] == m}
                xs = [j + i * width for j, w in enumerate(workloads) if w in values]
                ax.bar(xs, [values[w] for w in workloads if w in values], width, label=m)
            ax.set_xticks([j + 0.4 - width / 2 for j in range(len(workloads))])
            ax.set_xticklabels(workloads, fontsize=8)
            ax.set_ylabel(label)
            ax.grid(axis="y", alpha=0.3)
        axes[0].legend(fontsize=7)
        fig.suptitle(f"prefix-tuned training step, {device} ({rs[0]['dtype']})")
        fig.tight_layout()
        path = os.path.join(out, f"e2e_{device}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", default=None, help="folder holding the CSVs (default benchmarks/results)")
    ap.add_argument("--out", default=None, help="where PNG/markdown go (default: the results folder)")
    args = ap.parse_args()
    src = results_dir(args.results)
    out = args.out or src
    os.makedirs(out, exist_ok=True)
    written = []
    for path in sorted(glob.glob(os.path.join(src, "microbench*.csv"))):
        written += plot_microbench(path, out)
    if os.path.exists(os.path.join(src, "e2e.csv")):
        written += plot_e2e(os.path.join(src, "e2e.csv"), out)
    print("\n".join(f"wrote {p}" for p in written) or f"no CSV under {src}")


if __name__ == "__main__":
    main()
