"""The issue's performance targets as verdict lines, from the microbench CSV rows of one run.

    python benchmarks/verdict.py [CSV] [--all] [--commit C] [--backend triton] [--out verdict.txt]

Rows: CSV (default benchmarks/results/microbench.csv); the latest run in it (the newest timestamp, among the
rows of --commit when given), or every row with --all (a file that holds one run, as gpu_check.sh writes).
One line per target: PASS / FAIL / NOT MEASURED, with the measured ratio. A row of ours flagged WRONG
(valid=False: its error against the fp32 reference was over the tolerance) is a FAIL; a missing row, or a
baseline without a time, is NOT MEASURED. Targets (bf16, ours = --backend):
  (a) fwd+bwd >= 1.3x PEFT's real path (`sdpa-peft`) on a Llama-8B layer: B 8, Hq 32, Hkv 8, L = S = 2048,
      P 64, D 128, causal;
  (b) fwd+bwd >= 2x `sdpa-peft` at the P-Tuning v2 NLU shape: B 32, H 12, L = S = 128, P 128, D 64;
  (c) forward >= 50% of the device's bf16 dense peak (the CSV's pct_peak) on the Llama layers with L >= 4096
      (the lowest of them decides);
  (d) within 10% of SDPA on pre-concatenated K/V at P = 0 (ours <= 1.1x the fastest of `sdpa-concat` and
      `sdpa-concat:<flash|efficient|cudnn>`), forward and fwd+bwd, on the Llama layer with P = 0;
  (e) ours, not the issue's: a decode step's forward (B 64, Hq 32, Hkv 8, L 1, S 8192, P 64, D 128, the
      triton decode path) at least as fast as PEFT's real path.
Then INFO lines, no target: (f) the triton backend with its opt-in fused backward (`triton:fused-bwd`) against
`triton` (the split backward), fwd+bwd on the Llama-8B layer of (a); (g) the same for its opt-in atomic backward
(`triton:atomic-bwd`, deterministic=False); (h), (i) its opt-in TMA forward (`triton:tma-fwd`) against `triton`
(pointers), forward on the Llama-8B layer at L 2048 and L 8192.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import read_csv, results_dir  # noqa: E402

LLAMA = dict(Hq=32, Hkv=8, D=128, causal=True)
NLU = dict(B=32, Hq=12, Hkv=12, L=128, S=128, P=128, D=64, causal=False)


def _match(row: dict, dtype: str, mode: str, **dims) -> bool:
    if row.get("dtype") != dtype or row.get("mode") != mode:
        return False
    for key, want in dims.items():
        got = row.get(key)
        if isinstance(want, bool):
            if str(got) != str(want):
                return False
        elif got in (None, "") or int(float(got)) != want:
            return False
    return True


def _ms(row: dict | None) -> float | None:
    if row is None or str(row.get("valid", "")) == "False" or row.get("ms") in (None, ""):
        return None
    return float(row["ms"])


def _wrong(row: dict | None) -> bool:
    return row is not None and str(row.get("valid", "")) == "False"


def _err(row: dict) -> str:
    return f"err {row.get('max_err', '?')}" + (f", grad err {row['grad_err']}" if row.get("grad_err") else "")


def _find(rows, backend: str, dtype: str, mode: str, **dims) -> dict | None:
    found = [r for r in rows if r.get("backend") == backend and _match(r, dtype, mode, **dims)]
    return found[-1] if found else None


def speedup_line(rows, label: str, ours: str, baselines: list[str], dtype: str, mode: str, target: float,
                 target_text: str, **dims) -> str:
    """`ours`' speedup over the fastest of `baselines` (time ratio baseline / ours) against `target`."""
    mine = _find(rows, ours, dtype, mode, **dims)
    if _wrong(mine):
        return f"FAIL {label}: {ours} WRONG ({_err(mine)}), no time ({target_text})"
    if _ms(mine) is None:
        return f"NOT MEASURED {label}: no {ours} row ({target_text})"
    timed = [(ms, b) for b in baselines if (ms := _ms(_find(rows, b, dtype, mode, **dims))) is not None]
    if not timed:
        return f"NOT MEASURED {label}: no timed {' / '.join(baselines)} row ({target_text})"
    base_ms, base = min(timed)
    ratio = base_ms / _ms(mine)
    verdict = "PASS" if ratio >= target else "FAIL"
    return (f"{verdict} {label}: {ratio:.2f}x ({target_text}; {ours} {_ms(mine):.3f} ms, {base} {base_ms:.3f} ms, "
            f"{mode})")


def peak_line(rows, label: str, ours: str, dtype: str, target_pct: float, min_L: int, **dims) -> str:
    cands = [r for r in rows if r.get("backend") == ours and _match(r, dtype, "fwd", **dims)
             and int(float(r["L"])) >= min_L]
    text = f"target >= {target_pct:.0f}% of the bf16 peak at L >= {min_L}"
    if not cands:
        return f"NOT MEASURED {label}: no {ours} forward row at L >= {min_L} ({text})"
    wrong = [r for r in cands if _wrong(r)]
    if wrong:
        return f"FAIL {label}: {ours} WRONG at L={wrong[0]['L']} ({_err(wrong[0])}), no time ({text})"
    if any(r.get("pct_peak") in (None, "") for r in cands):
        return f"NOT MEASURED {label}: the device's peak is unknown, no pct_peak ({text})"
    worst = min(cands, key=lambda r: float(r["pct_peak"]))
    pct = float(worst["pct_peak"])
    parts = ", ".join(f"L={r['L']}: {float(r['pct_peak']):.1f}% ({float(r['tflops']):.0f} TFLOP/s)" for r in cands)
    return f"{'PASS' if pct >= target_pct else 'FAIL'} {label}: {pct / 100:.2f} of peak ({text}; {parts})"


def verdicts(rows: list[dict], ours: str = "triton", dtype: str = "bfloat16") -> list[str]:
    concat = ["sdpa-concat", "sdpa-concat:flash", "sdpa-concat:efficient", "sdpa-concat:cudnn"]
    llama = dict(B=8, L=2048, S=2048, **LLAMA)
    return [
        speedup_line(rows, "(a) Llama-8B layer fwd+bwd vs PEFT's real path", ours, ["sdpa-peft"], dtype, "fwd+bwd",
                     1.3, "target >= 1.30x", P=64, **llama),
        speedup_line(rows, "(b) NLU B32 H12 L128 P128 D64 fwd+bwd vs PEFT's real path", ours, ["sdpa-peft"], dtype,
                     "fwd+bwd", 2.0, "target >= 2.00x", **NLU),
        peak_line(rows, "(c) forward % of bf16 peak, Llama layers", ours, dtype, 50.0, 4096, P=64, **LLAMA),
        speedup_line(rows, "(d) P=0 forward vs SDPA on pre-concatenated K/V", ours, concat, dtype, "fwd",
                     1 / 1.1, "target >= 0.91x: within 10%", P=0, **llama),
        speedup_line(rows, "(d) P=0 fwd+bwd vs SDPA on pre-concatenated K/V", ours, concat, dtype, "fwd+bwd",
                     1 / 1.1, "target >= 0.91x: within 10%", P=0, **llama),
        speedup_line(rows, "(e) decode B64 L1 S8192 forward vs PEFT's real path", ours, ["sdpa-peft"], dtype, "fwd",
                     1.0, "our target >= 1.00x", B=64, L=1, S=8192, P=64, **LLAMA),
        info_line(rows, "(f) Llama-8B layer fwd+bwd, fused backward vs split", "triton:fused-bwd", ours, dtype,
                  "fwd+bwd", P=64, **llama),
        info_line(rows, "(g) Llama-8B layer fwd+bwd, atomic backward vs split", "triton:atomic-bwd", ours, dtype,
                  "fwd+bwd", P=64, **llama),
        info_line(rows, "(h) Llama-8B layer forward, TMA vs pointers", "triton:tma-fwd", ours, dtype, "fwd", P=64,
                  **llama),
        info_line(rows, "(i) Llama-8B layer L 8192 forward, TMA vs pointers", "triton:tma-fwd", ours, dtype, "fwd",
                  P=64, **dict(llama, B=2, L=8192, S=8192)),
    ]


def info_line(rows, label: str, mine: str, other: str, dtype: str, mode: str, **dims) -> str:
    """INFO: `other`'s time over `mine`'s (above 1: `mine` is faster); no target."""
    a, b = _find(rows, mine, dtype, mode, **dims), _find(rows, other, dtype, mode, **dims)
    for name, row in ((mine, a), (other, b)):
        if _wrong(row):
            return f"INFO {label}: {name} WRONG ({_err(row)}), no time"
        if _ms(row) is None:
            return f"INFO {label}: no timed {name} row"
    return (f"INFO {label}: {_ms(b) / _ms(a):.2f}x ({mine} {_ms(a):.3f} ms, {other} {_ms(b):.3f} ms, {mode}; "
            "no target)")


def latest_run(rows: list[dict], commit: str | None = None) -> list[dict]:
    """The rows of the newest timestamp (among `commit`'s rows when given)."""
    if commit:
        rows = [r for r in rows if r.get("commit") == commit]
    if not rows:
        return []
    stamp = max(r.get("timestamp", "") for r in rows)
    return [r for r in rows if r.get("timestamp", "") == stamp]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("csv", nargs="?", default=None, help="default: <results>/microbench.csv")
    ap.add_argument("--all", action="store_true", help="every row of the file (one run), not the latest run")
    ap.add_argument("--commit", default=None, help="the latest run of this commit")
    ap.add_argument("--backend", default="triton", help="ours (default triton)")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--out", default=None, help="also write the lines to this file")
    args = ap.parse_args(argv)
    path = args.csv or os.path.join(results_dir(), "microbench.csv")
    rows = read_csv(path) if os.path.exists(path) else []
    if not args.all:
        rows = latest_run(rows, args.commit)
    head = (f"verdict of {path}: {len(rows)} rows" + (f", run {rows[0].get('timestamp')} commit "
                                                       f"{rows[0].get('commit')} on {rows[0].get('machine')}"
                                                       if rows else ""))
    lines = [head] + verdicts(rows, args.backend, args.dtype)
    text = "\n".join(lines) + "\n"
    print(text, end="")
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
