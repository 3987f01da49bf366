"""The main job until the end-to-end demo exists: time and peak memory of every available backend of
`prefix_attention` against `reference` (expand + cat + softmax, what PEFT does), for a few shapes.

    python benchmarks/microbench.py [--device cpu|cuda] [--dtype float32 bfloat16] [--reps N] [--quick]

Prints a table, appends rows to benchmarks/results/microbench.csv (machine, versions, commit) and writes
benchmarks/results/microbench_<device>.md. The triton backend is measured on CUDA only (on CPU it would run
in Triton's interpreter, which is for tests, not speed).
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (  # noqa: E402
    RESULTS, Shape, append_csv, git_commit, machine_description, make_inputs, markdown_table, peak_memory_mib,
    reexec_with_malloc_settings, time_side_by_side, utc_stamp,
)

reexec_with_malloc_settings()

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

import prefix_kernels  # noqa: E402
from prefix_kernels.ops.dispatch import available_backends  # noqa: E402

CPU_SHAPES = [
    Shape("p-tuning-v2 NLU (BERT-base)", 8, 12, 12, 128, 128, 64, 64, causal=False),
    Shape("causal LM, GQA 4:1", 1, 8, 2, 512, 512, 64, 64, causal=True),
    Shape("decode", 16, 8, 2, 1, 2048, 64, 64, causal=True),
]
GPU_SHAPES = [
    Shape("p-tuning-v2 NLU (BERT-large)", 32, 16, 16, 128, 128, 128, 64, causal=False),
    Shape("Llama-8B-like layer", 8, 32, 8, 2048, 2048, 64, 128, causal=True),
    Shape("decode", 64, 32, 8, 1, 8192, 64, 128, causal=True),
]


def clear_grads(tensors) -> None:
    for t in tensors:
        t.grad = None


def run_once(backend, tensors, grad_out, shape, mode):
    clear_grads(tensors)
    if mode == "fwd":
        with torch.no_grad():
            prefix_kernels.prefix_attention(*tensors, causal=shape.causal, backend=backend)
    else:
        prefix_kernels.prefix_attention(*tensors, causal=shape.causal, backend=backend).backward(grad_out)


def measure(shapes, dtypes, backends, device, reps, modes=("fwd", "fwd+bwd")) -> tuple[list[dict], list[list]]:
    """Times and peak memory of `backends` side by side; returns CSV rows and markdown table rows."""
    machine, stamp, commit = machine_description(device), utc_stamp(), git_commit()
    rows, table = [], []
    work = [(s, d, m) for d in dtypes for s in shapes for m in modes]
    for shape, dtype_name, mode in tqdm(work, desc="benchmark", unit="case", file=sys.stderr):
        dtype = getattr(torch, dtype_name)
        tensors, grad_out = make_inputs(shape, dtype, device, requires_grad=mode != "fwd")
        calls = {b: (lambda b=b: run_once(b, tensors, grad_out, shape, mode)) for b in backends}
        times = time_side_by_side(calls, device, reps)
        memory = {}
        for b in backends:
            clear_grads(tensors)  # so that freeing the last call's gradients does not offset the peak
            memory[b] = peak_memory_mib(calls[b], device)
        ref_ms, ref_mib = times["reference"][0], memory["reference"]
        for b in backends:
            ms, p20, p80 = times[b]
            tflops = shape.attention_flops(mode) / (ms * 1e-3) / 1e12
            rows.append(dict(timestamp=stamp, machine=machine, commit=commit, device=device, dtype=dtype_name,
                             shape=shape.name, B=shape.B, Hq=shape.Hq, Hkv=shape.Hkv, L=shape.L, S=shape.S,
                             P=shape.P, D=shape.D, causal=shape.causal, mode=mode, backend=b, ms=round(ms, 4),
                             p20_ms=round(p20, 4), p80_ms=round(p80, 4),
                             speedup_vs_reference=round(ref_ms / ms, 3), tflops=round(tflops, 4),
                             peak_mib=round(memory[b], 2), memory_saved_mib=round(ref_mib - memory[b], 2)))
            table.append([dtype_name, shape.label(), mode, b, f"{ms:.2f} ({p20:.2f}-{p80:.2f})",
                          f"{ref_ms / ms:.2f}x", f"{tflops:.3f}", f"{memory[b]:.1f}", f"{ref_mib:.1f}"])
    return rows, table


TABLE_HEADER = ["dtype", "shape", "mode", "backend", "ms median (p20-p80)", "vs reference", "TFLOP/s", "peak MiB",
                "reference peak MiB"]


def record(rows, table, csv_name: str, md_name: str, title: str, reps: int) -> None:
    append_csv(os.path.join(RESULTS, csv_name), rows)
    with open(os.path.join(RESULTS, md_name), "w") as f:
        f.write(f"# {title}\n\n{rows[0]['machine']}; commit {rows[0]['commit']}; {rows[0]['timestamp']}; "
                f"{reps} timed calls per backend, backends alternating, median (p20-p80).\n"
                "Peak memory: what one call adds on top of its inputs (benchmarks/common.py).\n\n")
        f.write(markdown_table(TABLE_HEADER, table))
    print(f"appended {len(rows)} rows to benchmarks/results/{csv_name}, wrote benchmarks/results/{md_name}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", nargs="+", default=None, help="default: float32 bfloat16 (CPU), bfloat16 (CUDA)")
    ap.add_argument("--reps", type=int, default=None, help="timed calls per backend (default 5 CPU, 20 CUDA)")
    ap.add_argument("--quick", action="store_true", help="one shape, one dtype, 2 reps (a smoke test)")
    ap.add_argument("--no-record", action="store_true", help="print only; write nothing under results/")
    args = ap.parse_args()
    device = args.device
    gpu = device.startswith("cuda")
    shapes = GPU_SHAPES if gpu else CPU_SHAPES
    dtypes = args.dtype or (["bfloat16"] if gpu else ["float32", "bfloat16"])
    reps = args.reps or (20 if gpu else 5)
    if args.quick:
        shapes, dtypes, reps = shapes[:1], dtypes[:1], 2
    backends = [b for b in available_backends(device) if gpu or b != "triton"]
    print(f"{machine_description(device)}; prefix_kernels {prefix_kernels.__version__} ({git_commit()}); "
          f"backends: {', '.join(backends)}")
    if backends == ["reference"]:
        print("Only the reference backend is available here: build the C++ extension (see README) or use a GPU.")
    rows, table = measure(shapes, dtypes, backends, device, reps)
    print(markdown_table(TABLE_HEADER, table))
    if not args.no_record:
        name = "cuda" if gpu else "cpu"
        record(rows, table, "microbench.csv", f"microbench_{name}.md", f"prefix_attention microbenchmark ({name})",
               reps)


if __name__ == "__main__":
    main()
