"""The C++ `cpu` backend against `reference` on CPU-sized shapes (a 2-core machine), fp32 and bf16:
P-Tuning v2 NLU (BERT-base/large heads, L = 128, B = 8), causal LM (L 512/2048, GQA 4:1, B = 1) and decode
(L = 1, S = 2048, B = 16). Forward+backward everywhere, forward alone too for decode.

    python benchmarks/bench_cpu.py [--reps 5] [--quick]

Appends to benchmarks/results/cpu_bench.csv and writes benchmarks/results/cpu_bench.md (see microbench.py
for the method: backends alternating in one process; peak memory per benchmarks/common.py).
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import Shape, markdown_table  # noqa: E402
from microbench import TABLE_HEADER, measure, record  # noqa: E402


def shapes(quick: bool) -> list[tuple[Shape, tuple[str, ...]]]:
    nlu = [Shape(name, 8, H, H, 128, 128, P, 64, causal=False)
           for name, H in (("bert-base", 12), ("bert-large", 16)) for P in (16, 64, 128, 224)]
    causal = [Shape("causal-lm", 1, 8, 2, L, L, P, 64, causal=True) for L in (512, 2048) for P in (16, 64)]
    decode = [Shape("decode", 16, 8, 2, 1, 2048, 64, 64, causal=True)]
    if quick:
        nlu, causal = nlu[:2], causal[:1]
    return [(s, ("fwd+bwd",)) for s in nlu + causal] + [(s, ("fwd", "fwd+bwd")) for s in decode]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    rows, table = [], []
    for dtype in ("float32", "bfloat16"):
        for shape, modes in shapes(args.quick):
            r, t = measure([shape], [dtype], ["cpu", "reference"], "cpu", args.reps, modes)
            rows += r
            table += t
    print(markdown_table(TABLE_HEADER, table))
    record(rows, table, "cpu_bench.csv", "cpu_bench.md", "C++ cpu backend vs reference", args.reps)


if __name__ == "__main__":
    main()
