"""The main job: time and peak memory of every available backend of `prefix_attention` and of what users have
today (benchmarks/baselines.py: sdpa-expand, sdpa-concat, flex, flash-attn) against `reference` (expand + cat
+ softmax, what PEFT does), measured side by side in one process, forward, backward and forward+backward.

    python benchmarks/microbench.py [--device cpu|cuda] [--dtype float32 bfloat16] [--reps N] [--quick]
                                    [--sweep] [--modes fwd bwd fwd+bwd] [--baselines ...] [--out DIR]

Default shapes: CPU three (NLU, causal LM, decode), GPU seven (NLU BERT-large and VERDICT_SHAPES, the last
of them a decode step);
`--verdict`: VERDICT_SHAPES (what benchmarks/verdict.py decides on), fwd and fwd+bwd, PEFT's real path and
SDPA on concatenated K/V with each SDPA kernel; `--sweep` runs the full sweep (Llama-8B-like layers over
L and P, GQA ratio and head dim, P-Tuning v2 NLU over P, decode over S and B; fp16/bf16 on GPU);
`--quick`: the first shape, one dtype, 2 reps (a smoke test, no timing claim). Decode (L = 1) is timed
forward only. Prints a table and progress, appends rows to <out>/microbench.csv (machine, versions, commit;
default out: benchmarks/results/ or $PREFIX_KERNELS_RESULTS) and writes <out>/microbench_<device>.md.
The triton backend is measured on CUDA only (on CPU it would run in Triton's interpreter, which is for
tests, not speed). A method that cannot run a case (not installed, out of memory, an error) is skipped and
the reason logged and written under the table.

Every row also records the method's error against the reference computed in float32 from the same inputs,
measured once per (case, method) in an untimed call (columns max_err, grad_err, tol, grad_tol, valid; see
ERR_FLOOR): a method over the tolerance is timed no further, its row has no time, `valid=False`, and the
table says `WRONG (err ...)`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (  # noqa: E402
    Shape, append_csv, device_peak_tflops, git_commit, machine_description, make_inputs, markdown_table,
    peak_memory_mib, progress, results_dir, synchronize, time_side_by_side,
    utc_stamp, versions,
)

import torch  # noqa: E402

import baselines  # noqa: E402
import prefix_kernels  # noqa: E402
from prefix_kernels import available_backends  # noqa: E402

CPU_SHAPES = [
    Shape("p-tuning-v2 NLU (BERT-base)", 8, 12, 12, 128, 128, 64, 64, causal=False),
    Shape("causal LM, GQA 4:1", 1, 8, 2, 512, 512, 64, 64, causal=True),
    Shape("decode", 16, 8, 2, 1, 2048, 64, 64, causal=True),
]
# The shapes benchmarks/verdict.py decides its targets on (bf16, fwd and fwd+bwd): (a) the Llama-8B layer,
# (b) the P-Tuning v2 NLU shape, (c) forward at L 4096 and 8192, (d) P = 0 against SDPA on concatenated K/V,
# (e) a Llama-8B decode step (the decode path: GQA stacking and split keys).
VERDICT_SHAPES = [
    Shape("Llama-8B-like layer", 8, 32, 8, 2048, 2048, 64, 128, causal=True),
    Shape("p-tuning-v2 NLU (BERT-base)", 32, 12, 12, 128, 128, 128, 64, causal=False),
    Shape("Llama-8B-like layer L4096", 4, 32, 8, 4096, 4096, 64, 128, causal=True),
    Shape("Llama-8B-like layer L8192", 2, 32, 8, 8192, 8192, 64, 128, causal=True),
    Shape("Llama-8B-like layer P=0", 8, 32, 8, 2048, 2048, 0, 128, causal=True),
    Shape("decode", 64, 32, 8, 1, 8192, 64, 128, causal=True),
]
VERDICT_BASELINES = ["sdpa-peft", "sdpa-concat", *baselines.SDPA_CONCAT_FORCED, *baselines.TRITON_VARIANTS]
GPU_SHAPES = [
    Shape("p-tuning-v2 NLU (BERT-large)", 32, 16, 16, 128, 128, 128, 64, causal=False),
    *VERDICT_SHAPES,
]


def gpu_sweep() -> list[Shape]:
    """The GPU sweep: Llama-8B-like layers (Hq 32, Hkv 8, D 128, L 2048-8192, P 16-128, B*L = 16k
    tokens), GQA ratio and head dim at L 4096, P-Tuning v2 NLU (BERT-base/large heads, L 128, B 32, P 8-224),
    decode (L 1, S 2048-32768, B 1-64)."""
    llama = [Shape("llama-8b", 16384 // L, 32, 8, L, L, P, 128, causal=True)
             for L in (2048, 4096, 8192) for P in (16, 64, 128)]
    gqa = [Shape(f"gqa {32 // hkv}:1 D{d}", 4, 32, hkv, 4096, 4096, 64, d, causal=True)
           for hkv in (32, 8, 1) for d in (64, 128) if not (hkv == 8 and d == 128)]
    nlu = [Shape(name, 32, h, h, 128, 128, P, 64, causal=False)
           for name, h in (("bert-base", 12), ("bert-large", 16)) for P in (8, 32, 64, 128, 224)]
    decode = [Shape("decode", B, 32, 8, 1, S, 64, 128, causal=True) for S in (2048, 8192, 32768) for B in (1, 16, 64)]
    return llama + gqa + nlu + decode


def cpu_sweep() -> list[Shape]:
    """What a 2-core CPU can sweep in minutes: NLU over P, causal over L and GQA, decode over S and B."""
    nlu = [Shape(name, 8, h, h, 128, 128, P, 64, causal=False)
           for name, h in (("bert-base", 12), ("bert-large", 16)) for P in (16, 64, 224)]
    causal = [Shape(f"causal-lm GQA {8 // hkv}:1", 1, 8, hkv, L, L, 64, 64, causal=True)
              for L in (512, 1024) for hkv in (8, 2)]
    decode = [Shape("decode", B, 8, 2, 1, S, 64, 64, causal=True) for S in (2048, 8192) for B in (1, 16)]
    return nlu + causal + decode


def clear_grads(tensors) -> None:
    for t in tensors:
        t.grad = None


def _calls(method: baselines.Method, grad_out, mode: str):
    """(setup or None, timed call) for one method and mode, each under the method's environment (scope)."""
    if mode == "fwd":
        def fwd():
            with torch.no_grad(), method.scope():
                method.forward()
        return None, fwd
    if mode == "fwd+bwd":
        def fwd_bwd():
            clear_grads(method.leaves)
            with method.scope():
                method.forward().backward(grad_out)
        return None, fwd_bwd
    state = {}

    def setup():
        clear_grads(method.leaves)
        with method.scope():
            state["out"] = method.forward()

    def bwd():
        with method.scope():
            state.pop("out").backward(grad_out)
    return setup, bwd


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0][:200] if lines else ""


def _is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()


# Correctness of every timed method, checked once per (case, method) in an untimed call against the reference
# computed in float32 from the same inputs. Forward: max |out - out_fp32|. Backward: the largest, over
# dq, dk, dv, dprefix_k, dprefix_v, of max |g - g_fp32| / max |g_fp32|. The tolerance is flash-attention's
# test criterion: at most 2x the error of `reference` computed in the case's dtype, plus a floor (ERR_FLOOR);
# FIXED_TOL when `reference` itself could not run. A method above it is WRONG: its time is not reported.
ERR_FLOOR = {"float32": 1e-4, "float16": 1e-3, "bfloat16": 1e-2}
FIXED_TOL = {"float32": 1e-3, "float16": 1e-2, "bfloat16": 5e-2}
_REF_CHUNK = 2**28  # fp32 score elements per reference chunk (1 GiB): batches are split to stay under it


def _fp32_reference(tensors, grad_out, causal: bool, with_grads: bool = True, skipped=None, shape=None, case=""):
    """(out, (dq, dk, dv, dpk, dpv) or None) of the float32 reference for these inputs (batch chunks, prefix
    gradients summed), or None when it cannot be computed (logged): then no method's validity is decided."""
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # a true fp32 reference, whatever the caller set
    try:
        q, k, v, pk, pv = (t.detach().float().requires_grad_(with_grads) for t in tensors)
        go = grad_out.float()
        B, Hq, L, _ = q.shape
        step = max(1, _REF_CHUNK // max(1, Hq * L * (k.shape[2] + pk.shape[1])))
        outs = []
        for b0 in range(0, B, step):
            sl = slice(b0, b0 + step)
            with torch.set_grad_enabled(with_grads):
                out = prefix_kernels.reference_prefix_attention(q[sl], k[sl], v[sl], pk, pv, causal=causal)
            if with_grads:
                out.backward(go[sl])
            outs.append(out.detach())
        if not with_grads:
            return torch.cat(outs), None
        grads = tuple(t.grad if t.grad is not None else torch.zeros_like(t) for t in (q, k, v, pk, pv))
        return torch.cat(outs), grads
    except Exception as e:  # noqa: BLE001 - e.g. out of memory: the timings stay, unvalidated
        if skipped is not None:
            _skip(skipped, "fp32 reference", shape, case, f"{type(e).__name__}: {_first_line(e)}; validity unknown")
        return None
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32


def _max_abs(a: torch.Tensor) -> float:
    return a.abs().max().item() if a.numel() else 0.0


def method_error(method: baselines.Method, grad_out, want, with_grads: bool) -> tuple[float, float | None]:
    """(forward max abs error, largest relative gradient error or None) of one untimed call of `method`
    against `want` = _fp32_reference(...); (None, None) when `want` is None (unknown). NaN in the output or
    gradients gives a NaN error, which no tolerance accepts."""
    if want is None:
        return None, None
    clear_grads(method.leaves)
    with method.scope():
        if with_grads:
            out = method.forward()
            out.backward(grad_out)
        else:
            with torch.no_grad():
                out = method.forward()
    err = _max_abs(out.detach().float() - want[0])
    if not with_grads:
        return err, None
    gerr = 0.0
    for got, ref in zip(method.grads(), want[1]):
        if ref.numel() == 0:
            continue
        if got is None:
            return err, float("inf")
        e = _max_abs(got.float() - ref) / max(_max_abs(ref), 1e-30)
        gerr = e if e != e or gerr != gerr else max(gerr, e)  # NaN sticks
    clear_grads(method.leaves)
    return err, gerr


def tolerances(dtype_name: str, reference_error) -> tuple[float, float]:
    """(forward, gradient) tolerance: 2x `reference`'s own error in this dtype + ERR_FLOOR, or FIXED_TOL."""
    fixed = FIXED_TOL.get(dtype_name, 5e-2)
    floor = ERR_FLOOR.get(dtype_name, 1e-2)
    if reference_error is None:
        return fixed, fixed
    err, gerr = reference_error
    return ((2 * err + floor) if err is not None and err == err else fixed,
            (2 * gerr + floor) if gerr is not None and gerr == gerr else fixed)


def is_valid(error, tol) -> bool | None:
    """True / False (NaN errors fail), or None when the error is unknown (no fp32 reference)."""
    err, gerr = error
    if err is None:
        return None
    return bool(err <= tol[0] and (gerr is None or gerr <= tol[1]))


def _num(x):
    return "" if x is None else (x if x != x else float(f"{x:.3e}"))


def modes_for(shape: Shape, modes) -> tuple[str, ...]:
    return ("fwd",) if shape.L == 1 else tuple(modes)


def measure(shapes, dtypes, backends, device, reps, modes=("fwd", "fwd+bwd"), methods_extra=(), quick=False,
            skipped=None, on_rows=None) -> tuple[list[dict], list[list]]:
    """Times and peak memory of `backends` (prefix_kernels) and `methods_extra` (baselines.BASELINES) side by
    side; returns CSV rows and markdown table rows. Reasons for skipped methods are appended to `skipped`;
    `on_rows(rows)` gets each case's rows as soon as they are measured. Ctrl-C / SIGINT (e.g. `timeout -s INT`)
    stops the sweep and returns what was measured."""
    rows, table = [], []
    try:
        _measure(shapes, dtypes, backends, device, reps, modes, methods_extra, quick,
                 [] if skipped is None else skipped, on_rows, rows, table)
    except KeyboardInterrupt:
        print(f"\ninterrupted: keeping the {len(rows)} rows measured so far", file=sys.stderr)
    return rows, table


def _measure(shapes, dtypes, backends, device, reps, modes, methods_extra, quick, skipped, on_rows, rows, table):
    machine, stamp, commit, vers = machine_description(device), utc_stamp(), git_commit(), versions()
    work = [(s, d, m) for d in dtypes for s in shapes for m in modes_for(s, modes)]
    bar = progress(work, "benchmark")
    for shape, dtype_name, mode in bar:
        first = len(rows)
        bar.set_postfix_str(f"{dtype_name} {shape.name} L={shape.L} S={shape.S} P={shape.P} {mode}")
        dtype = getattr(torch, dtype_name)
        tensors, grad_out = make_inputs(shape, dtype, device, requires_grad=mode != "fwd")
        names = list(backends)
        for b in methods_extra:
            reason = baselines.unavailable_reason(b, device, dtype, quick, mode)
            if reason is None:
                names.append(b)
            else:
                _skip(skipped, b, None, None, reason)
        setups, calls, errors = {}, {}, {}
        with_grads = mode != "fwd"
        want, want_done = None, False
        for name in names:
            try:
                method = baselines.build(name, tensors, shape.causal)
                setup, call = _calls(method, grad_out, mode)
                if setup:
                    setup()
                call()  # a first call (compiles, autotunes) that also tells whether it runs at all
                synchronize(device)
                if not want_done:
                    want_done = True
                    want = _fp32_reference(tensors, grad_out, shape.causal, with_grads, skipped, shape,
                                           f"{dtype_name} {mode}")
                errors[name] = method_error(method, grad_out, want, with_grads)  # untimed, once per method
                synchronize(device)
            except Exception as e:  # noqa: BLE001 - a baseline failing must not stop the sweep
                _skip(skipped, name, shape, f"{dtype_name} {mode}", ("out of memory" if _is_oom(e) else
                                                                     f"{type(e).__name__}: {_first_line(e)}"))
                if device.startswith("cuda"):
                    torch.cuda.empty_cache()
                continue
            calls[name] = call
            if setup:
                setups[name] = setup
        del want
        if not calls:
            continue
        tol = tolerances(dtype_name, errors.get("reference"))
        verdicts = {name: is_valid(errors[name], tol) for name in calls}
        wrong = [name for name in calls if verdicts[name] is False]
        for name in wrong:  # no time is reported for a wrong result
            calls.pop(name)
            setups.pop(name, None)
        loops: dict = {}
        times = time_side_by_side(calls, device, reps, setups=setups, loops=loops, loop_short=True) if calls else {}
        memory = {}
        for name in calls:
            clear_grads(tensors)  # so that freeing the last call's gradients does not offset the peak
            memory[name] = peak_memory_mib(calls[name], device, setup=setups.get(name))
        ref_ms = times["reference"][0] if "reference" in times else float("nan")
        ref_mib = memory.get("reference", float("nan"))
        peak = device_peak_tflops(device, dtype)
        for name in list(calls) + wrong:
            err, gerr = errors[name]
            accuracy = dict(max_err=_num(err), grad_err=_num(gerr), tol=_num(tol[0]),
                            grad_tol=_num(tol[1]) if with_grads else "",
                            valid="" if verdicts[name] is None else verdicts[name])
            base = dict(timestamp=stamp, machine=machine, versions=vers, commit=commit, device=device,
                        dtype=dtype_name, shape=shape.name, B=shape.B, Hq=shape.Hq, Hkv=shape.Hkv, L=shape.L,
                        S=shape.S, P=shape.P, D=shape.D, causal=shape.causal, mode=mode, backend=name)
            err_text = "" if err is None else f"err {err:.2e}" + ("" if gerr is None else f", grad err {gerr:.2e}")
            if name in wrong:
                rows.append(dict(base, ms="", p20_ms="", p80_ms="", speedup_vs_reference="", tflops="",
                                 pct_peak="", peak_mib="", memory_saved_mib="", reps=reps, calls_per_sample="",
                                 **accuracy))
                table.append([dtype_name, shape.label(), mode, name,
                              f"WRONG ({err_text}; tol {tol[0]:.1e}"
                              + ("" if gerr is None else f", grad tol {tol[1]:.1e}") + ")",
                              "", "", "", "", err_text])
                continue
            ms, p20, p80 = times[name]
            tflops = shape.attention_flops(mode) / (ms * 1e-3) / 1e12
            pct = "" if peak is None else round(100 * tflops / peak, 2)
            rows.append(dict(base, ms=round(ms, 4), p20_ms=round(p20, 4), p80_ms=round(p80, 4),
                             speedup_vs_reference=round(ref_ms / ms, 3), tflops=round(tflops, 4), pct_peak=pct,
                             peak_mib=round(memory[name], 2), memory_saved_mib=round(ref_mib - memory[name], 2),
                             reps=reps, calls_per_sample=loops.get(name, 1), **accuracy))
            table.append([dtype_name, shape.label(), mode, name, f"{ms:.3f} ({p20:.3f}-{p80:.3f})",
                          f"{ref_ms / ms:.2f}x", f"{tflops:.3f}" + ("" if pct == "" else f" ({pct}%)"),
                          f"{memory[name]:.1f}", f"{ref_mib - memory[name]:.1f}", err_text or "unknown"])
        if on_rows is not None:
            on_rows(rows[first:])
        del tensors, grad_out, calls, setups
        if device.startswith("cuda"):
            torch.cuda.empty_cache()


def _skip(skipped: list, name, shape, case, reason) -> None:
    line = f"{name}: {reason}" if shape is None else f"{name} on {shape.label()} {case}: {reason}"
    if line not in skipped:
        skipped.append(line)
        print(f"skipped {line}", file=sys.stderr)


TABLE_HEADER = ["dtype", "shape", "mode", "backend", "ms median (p20-p80)", "vs reference",
                "TFLOP/s (% of peak)", "peak MiB", "MiB saved vs reference", "max err vs fp32 (grad)"]


def record(rows, table, csv_name: str, md_name: str, title: str, reps: int, out: str | None = None,
           skipped=(), append: bool = True) -> None:
    out = results_dir(out)
    os.makedirs(out, exist_ok=True)
    if append:
        append_csv(os.path.join(out, csv_name), rows)
    with open(os.path.join(out, md_name), "w") as f:
        f.write(f"# {title}\n\n{rows[0]['machine']}; {rows[0].get('versions', '')}; commit {rows[0]['commit']}; "
                f"{rows[0]['timestamp']}; {reps} timed calls per method, methods alternating, median (p20-p80).\n"
                "Peak memory: what one call adds on top of its inputs (benchmarks/common.py); for `bwd`, on top "
                "of the inputs and the forward's saved tensors.\n\n")
        f.write(markdown_table(TABLE_HEADER, table))
        if skipped:
            f.write("\nSkipped:\n\n" + "".join(f"- {line}\n" for line in skipped))
    print(f"appended {len(rows)} rows to {os.path.join(out, csv_name)}, wrote {os.path.join(out, md_name)}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", nargs="+", default=None,
                    help="default: float32 bfloat16 (CPU), bfloat16 (CUDA; bfloat16 float16 with --sweep)")
    ap.add_argument("--reps", type=int, default=None, help="timed calls per method (default 5 CPU, 20 CUDA)")
    ap.add_argument("--quick", action="store_true", help="one shape, one dtype, 2 reps (a smoke test)")
    ap.add_argument("--sweep", action="store_true", help="the full sweep of shapes (see gpu_sweep/cpu_sweep)")
    ap.add_argument("--modes", nargs="+", default=None, choices=("fwd", "bwd", "fwd+bwd"),
                    help="default: fwd bwd fwd+bwd (fwd fwd+bwd with --quick)")
    ap.add_argument("--baselines", nargs="*", default=None,
                    help=f"baselines besides the prefix_kernels backends (default: {' '.join(baselines.BASELINES)})")
    ap.add_argument("--backends", nargs="*", default=None, help="prefix_kernels backends (default: all available)")
    ap.add_argument("--verdict", action="store_true",
                    help="the shapes of benchmarks/verdict.py (VERDICT_SHAPES), fwd and fwd+bwd, baselines "
                         f"{' '.join(VERDICT_BASELINES)} unless given")
    ap.add_argument("--only", default=None, help="keep the shapes whose name contains this (case-insensitive)")
    ap.add_argument("--out", default=None,
                    help="results folder (default $PREFIX_KERNELS_RESULTS or benchmarks/results)")
    ap.add_argument("--tag", default="", help="suffix of the CSV/markdown names, e.g. _sweep")
    ap.add_argument("--no-record", action="store_true", help="print only; write nothing under results/")
    args = ap.parse_args()
    device = args.device
    gpu = device.startswith("cuda")
    shapes = (gpu_sweep() if gpu else cpu_sweep()) if args.sweep else (GPU_SHAPES if gpu else CPU_SHAPES)
    if args.verdict:
        shapes = VERDICT_SHAPES
    if args.baselines is None:
        args.baselines = VERDICT_BASELINES if args.verdict else list(baselines.BASELINES) + (
            list(baselines.SDPA_CONCAT_FORCED) if gpu else [])
    dtypes = args.dtype or ((["bfloat16", "float16"] if args.sweep else ["bfloat16"]) if gpu
                            else ["float32", "bfloat16"])
    reps = args.reps or (20 if gpu else 5)
    modes = args.modes or (["fwd", "fwd+bwd"] if args.verdict else ["fwd", "bwd", "fwd+bwd"])
    if args.only:
        shapes = [s for s in shapes if args.only.lower() in s.name.lower()]
    if args.quick:
        shapes, dtypes, reps = shapes[:1], dtypes[:1], args.reps or 2
        modes = args.modes or ["fwd", "fwd+bwd"]
    backends = args.backends if args.backends is not None else [
        b for b in available_backends(device) if gpu or b != "triton"]
    if "reference" not in backends:
        backends = backends + ["reference"]  # every ratio is against it
    print(f"{machine_description(device)}; {versions()}; prefix_kernels {prefix_kernels.__version__} "
          f"({git_commit()}); backends: {', '.join(backends)}; baselines: {', '.join(args.baselines) or 'none'}")
    if backends == ["reference"]:
        print("Only the reference backend is available here: build the C++ extension (see README) or use a GPU.")
    skipped: list[str] = []
    csv_path = os.path.join(results_dir(args.out), f"microbench{args.tag}.csv")
    on_rows = None if args.no_record else (lambda new: append_csv(csv_path, new) if new else None)
    rows, table = measure(shapes, dtypes, backends, device, reps, modes, args.baselines, args.quick, skipped,
                          on_rows)
    print(markdown_table(TABLE_HEADER, table))
    if not args.no_record and rows:
        name = "cuda" if gpu else "cpu"
        record(rows, table, f"microbench{args.tag}.csv", f"microbench_{name}{args.tag}.md",
               f"prefix_attention microbenchmark ({name}{', sweep' if args.sweep else ''})", reps, args.out, skipped,
               append=False)
        with open(os.path.join(results_dir(args.out), f"microbench_{name}{args.tag}.json"), "w") as f:
            json.dump({"rows": rows, "skipped": skipped}, f, indent=1)


if __name__ == "__main__":
    main()
