"""What every benchmark script shares: inputs, timing, peak memory, machine description, result files.

Timing runs the compared backends side by side in one process, alternating call by call, and reports the
median with p20/p80 (microbench: on CUDA a call under LOOP_BELOW_MS is timed as back-to-back calls).
Peak memory is what one call adds on top of what was allocated before it, measured by the meter the demo and
the example use too (`prefix_kernels.apps.memory.PeakMemory`): on CUDA the allocator's
`max_memory_allocated`; on CPU the growth of the process's peak resident set (VmHWM, reset through
/proc/self/clear_refs) with glibc in its exact mode, so that freed buffers go back to the OS instead of hiding
in malloc's cache (timed calls run outside it, with glibc's fast settings: the exact mode slows large
allocations). Either way it counts everything the call allocates: outputs, gradients, saved activations and
temporaries.
"""

from __future__ import annotations

import csv
import datetime
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass

import torch

from prefix_kernels.apps.memory import PeakMemory

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


@dataclass(frozen=True)
class Shape:
    name: str
    B: int
    Hq: int
    Hkv: int
    L: int
    S: int
    P: int
    D: int
    causal: bool

    def label(self) -> str:
        return (f"{self.name} B={self.B} H={self.Hq}/{self.Hkv} L={self.L} S={self.S} P={self.P} D={self.D}"
                f"{' causal' if self.causal else ''}")

    def attention_flops(self, mode: str) -> float:
        """4 * B * Hq * L * visible keys * D for the forward; the backward costs 2.5x that."""
        visible = self.P + (self.S - (self.L - 1) / 2 if self.causal else self.S)
        fwd = 4.0 * self.B * self.Hq * self.L * visible * self.D
        return fwd * {"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5}[mode]


def make_inputs(shape: Shape, dtype: torch.dtype, device: str, requires_grad: bool):
    if device.startswith("cuda"):  # drawn on the GPU: a decode sweep's K/V are gigabytes
        gen = torch.Generator(device=device).manual_seed(0)

        def rnd_cuda(*dims):
            return torch.randn(*dims, generator=gen, device=device, dtype=dtype).requires_grad_(requires_grad)

        tensors = (rnd_cuda(shape.B, shape.Hq, shape.L, shape.D), rnd_cuda(shape.B, shape.Hkv, shape.S, shape.D),
                   rnd_cuda(shape.B, shape.Hkv, shape.S, shape.D), rnd_cuda(shape.Hkv, shape.P, shape.D),
                   rnd_cuda(shape.Hkv, shape.P, shape.D))
        return tensors, torch.randn(shape.B, shape.Hq, shape.L, shape.D, generator=gen, device=device, dtype=dtype)
    gen = torch.Generator().manual_seed(0)

    def rnd(*dims):
        return torch.randn(*dims, generator=gen).to(device=device, dtype=dtype).requires_grad_(requires_grad)

    tensors = (rnd(shape.B, shape.Hq, shape.L, shape.D), rnd(shape.B, shape.Hkv, shape.S, shape.D),
               rnd(shape.B, shape.Hkv, shape.S, shape.D), rnd(shape.Hkv, shape.P, shape.D),
               rnd(shape.Hkv, shape.P, shape.D))
    grad_out = torch.randn(shape.B, shape.Hq, shape.L, shape.D, generator=gen).to(device=device, dtype=dtype)
    return tensors, grad_out


class _Progress:
    """tqdm's interface, printing a line per item, for machines without tqdm."""

    def __init__(self, items, desc: str):
        self.items, self.desc, self.note = list(items), desc, ""

    def set_postfix_str(self, note: str) -> None:
        self.note = note

    def __iter__(self):
        start = time.time()
        for i, item in enumerate(self.items):
            yield item
            print(f"{self.desc}: {i + 1}/{len(self.items)} {self.note} ({time.time() - start:.0f} s)",
                  file=sys.stderr, flush=True)


def progress(items, desc: str, unit: str = "case"):
    """A progress bar on stderr over `items` (tqdm when installed)."""
    try:
        from tqdm import tqdm
    except ImportError:
        return _Progress(items, desc)
    return tqdm(items, desc=desc, unit=unit, file=sys.stderr)


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


# On CUDA a call shorter than LOOP_BELOW_MS is timed as LOOP back-to-back calls between two events (the time
# per call is the elapsed time / n), so that the launch overhead of a lone call does not decide a small shape.
LOOP_BELOW_MS = 1.0
LOOP_TARGET_MS = 2.0
LOOP_MAX = 64


def loop_count(one_call_ms: float) -> int:
    """Calls per timed sample on CUDA: 1 at or above LOOP_BELOW_MS, else enough to fill ~LOOP_TARGET_MS."""
    if not one_call_ms < LOOP_BELOW_MS:
        return 1
    return max(2, min(LOOP_MAX, math.ceil(LOOP_TARGET_MS / max(one_call_ms, 1e-3))))


def _cuda_ms(fn, n: int = 1) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(n):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / n


def time_side_by_side(calls: dict, device: str, reps: int, warmup: int = 1, setups: dict | None = None,
                      loops: dict | None = None, loop_short: bool = False) -> dict:
    """Milliseconds per call: {name: (median, p20, p80)}, the calls alternating rep by rep.

    `setups[name]`, when given, runs untimed before every call of `calls[name]` (e.g. the forward whose
    backward is timed). With `loop_short`, on CUDA, a method without setup whose call takes < LOOP_BELOW_MS is
    timed as loop_count() back-to-back calls per sample; `loops`, when given, receives the calls per sample."""
    setups = setups or {}
    for name, fn in calls.items():
        for _ in range(warmup):
            if name in setups:
                setups[name]()
            fn()
    synchronize(device)
    n = {name: 1 for name in calls}
    if loop_short and device.startswith("cuda"):
        for name, fn in calls.items():
            if name not in setups:  # a setup per call (bwd) cannot run back to back: timed call by call
                n[name] = loop_count(_cuda_ms(fn))
    if loops is not None:
        loops.update(n)
    samples = {name: [] for name in calls}
    for _ in range(reps):
        for name, fn in calls.items():
            if name in setups:
                setups[name]()
                synchronize(device)
            if device.startswith("cuda"):
                samples[name].append(_cuda_ms(fn, n[name]))
            else:
                t0 = time.perf_counter()
                fn()
                samples[name].append((time.perf_counter() - t0) * 1e3)
    return {name: _quantiles(ts) for name, ts in samples.items()}


def _quantiles(ts: list[float]) -> tuple[float, float, float]:
    if len(ts) == 1:
        return ts[0], ts[0], ts[0]
    q = statistics.quantiles(ts, n=10, method="inclusive")
    return statistics.median(ts), q[1], q[7]


def peak_memory_mib(fn, device: str, setup=None) -> float:
    """Peak memory (MiB) one call of `fn` adds on top of what is allocated before it (see the module
    docstring); `setup` runs first, its allocations counted as "before". NaN where the CPU meter has no
    /proc/self/clear_refs."""
    if setup is not None:
        setup()
    with PeakMemory(device) as mem:
        fn()
    return mem.mib


def machine_description(device: str) -> str:
    if device.startswith("cuda"):
        hw = torch.cuda.get_device_name()
    else:
        hw = platform.processor() or platform.machine()
        try:
            with open("/proc/cpuinfo") as f:
                hw = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
        except (OSError, StopIteration):
            pass
        hw += f", {torch.get_num_threads()} threads"
    return hw  # versions() names torch and the rest


# Dense peak TFLOP/s by GPU name fragment: (fp16/bf16 tensor cores, tf32 tensor cores, fp32 without them).
_PEAKS = [("H200", (989.0, 494.0, 67.0)), ("H100", (989.0, 494.0, 67.0)), ("H800", (989.0, 494.0, 67.0)),
          ("A100", (312.0, 156.0, 19.5)), ("L40S", (362.0, 183.0, 91.6)), ("A10", (125.0, 62.5, 31.2)),
          ("4090", (165.0, 82.6, 82.6)), ("V100", (125.0, 15.7, 15.7))]


def device_peak_tflops(device: str, dtype: torch.dtype) -> float | None:
    """The device's dense peak for `dtype` (None on CPU or an unknown GPU): % of peak = achieved / this."""
    if not device.startswith("cuda"):
        return None
    name = torch.cuda.get_device_name()
    for fragment, (half, tf32, fp32) in _PEAKS:
        if fragment in name:
            if dtype in (torch.float16, torch.bfloat16):
                return half
            return tf32 if torch.backends.cuda.matmul.allow_tf32 else fp32
    return None


def versions() -> str:
    """torch, triton, transformers, peft, flash-attn versions (those importable)."""
    import importlib.metadata as md

    parts = []
    for pkg in ("torch", "triton", "transformers", "peft", "flash-attn"):
        try:
            parts.append(f"{pkg} {md.version(pkg)}")
        except md.PackageNotFoundError:
            pass
    if torch.version.cuda:
        parts.append(f"cuda {torch.version.cuda}")
    return "; ".join(parts)


def results_dir(out: str | None = None) -> str:
    """Where results go: `out`, else $PREFIX_KERNELS_RESULTS, else benchmarks/results/."""
    return out or os.environ.get("PREFIX_KERNELS_RESULTS") or RESULTS


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=os.path.dirname(os.path.abspath(__file__)), check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def utc_stamp() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def append_csv(path: str, rows: list[dict]) -> None:
    """Append `rows`; when their columns differ from the file's header, rewrite the file with the union of
    columns (older rows get empty cells), so that old results are never misaligned."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fields = list(dict.fromkeys(k for row in rows for k in row))
    old_rows, old_fields = [], None
    if os.path.exists(path):
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            old_fields = reader.fieldnames
            if old_fields is not None and list(old_fields) != fields:
                old_rows = list(reader)
    if old_fields is not None and list(old_fields) == fields:
        with open(path, "a", newline="") as f:
            csv.DictWriter(f, fieldnames=fields).writerows(rows)
        return
    if old_fields:
        fields = list(dict.fromkeys(list(old_fields) + fields))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, restval="")
        writer.writeheader()
        writer.writerows(old_rows + rows)


def read_csv(path: str) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def markdown_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"

