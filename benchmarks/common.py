"""What every benchmark script shares: inputs, timing, peak memory, machine description, result files.

Timing runs the compared backends side by side in one process, alternating call by call, and reports the
median with p20/p80. Peak memory on CUDA is `torch.cuda.max_memory_allocated` over one call, above what was
allocated before it; on CPU it is the growth of the process's peak resident set (VmHWM, reset through
/proc/self/clear_refs) over one call, with glibc's mmap threshold pinned to 128 KiB (`reexec_with_malloc_
settings`) so that freed buffers go back to the OS instead of hiding in malloc's cache. Either way it counts
everything the call allocates: outputs, gradients, saved activations and temporaries.
"""

from __future__ import annotations

import csv
import datetime
import gc
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass

import torch

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def reexec_with_malloc_settings() -> None:
    if sys.platform.startswith("linux") and os.environ.get("MALLOC_MMAP_THRESHOLD_") is None:
        os.environ["MALLOC_MMAP_THRESHOLD_"] = "131072"
        os.execv(sys.executable, [sys.executable] + sys.argv)


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
        return fwd * (3.5 if mode == "fwd+bwd" else 1.0)


def make_inputs(shape: Shape, dtype: torch.dtype, device: str, requires_grad: bool):
    gen = torch.Generator().manual_seed(0)

    def rnd(*dims):
        return torch.randn(*dims, generator=gen).to(device=device, dtype=dtype).requires_grad_(requires_grad)

    tensors = (rnd(shape.B, shape.Hq, shape.L, shape.D), rnd(shape.B, shape.Hkv, shape.S, shape.D),
               rnd(shape.B, shape.Hkv, shape.S, shape.D), rnd(shape.Hkv, shape.P, shape.D),
               rnd(shape.Hkv, shape.P, shape.D))
    grad_out = torch.randn(shape.B, shape.Hq, shape.L, shape.D, generator=gen).to(device=device, dtype=dtype)
    return tensors, grad_out


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_side_by_side(calls: dict, device: str, reps: int, warmup: int = 1) -> dict:
    """Milliseconds per call: {name: (median, p20, p80)}, the calls alternating rep by rep."""
    for fn in calls.values():
        for _ in range(warmup):
            fn()
    synchronize(device)
    samples = {name: [] for name in calls}
    for _ in range(reps):
        for name, fn in calls.items():
            if device.startswith("cuda"):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize()
                samples[name].append(start.elapsed_time(end))
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


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1])
    raise KeyError(field)


def peak_memory_mib(fn, device: str) -> float:
    """Peak memory one call of `fn` adds on top of what is allocated before it (see the module docstring)."""
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before) / 2**20
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return float("nan")
    before = _status_kib("VmRSS")
    fn()
    return (_status_kib("VmHWM") - before) / 1024


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
    return f"{hw}; torch {torch.__version__}"


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=os.path.dirname(os.path.abspath(__file__)), check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def utc_stamp() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def append_csv(path: str, rows: list[dict]) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    new = not os.path.exists(path)
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        if new:
            writer.writeheader()
        writer.writerows(rows)


def markdown_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"

