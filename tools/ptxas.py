"""Reading `ptxas -v` logs: registers, stack, spills and static shared memory per compiled kernel.

The one parser of both static compile checks: `triton_compile_check.py` (Triton's ptxas log, or a ptxas run on
the PTX of a cached kernel) and `cuda_resource_check.py` (`nvcc --resource-usage`, the same ptxas lines). A log
reads, per kernel and arch:

    ptxas info    : Compiling entry function 'NAME' for 'sm_90a'
    ptxas info    : Function properties for NAME
        0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
    ptxas info    : Used 168 registers, used 1 barriers, 8 bytes smem, 400 bytes cmem[0]
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from dataclasses import dataclass

_ENTRY = re.compile(r"Compiling entry function '([^']+)' for '(sm_\w+)'")
_PROPS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers")
_SMEM = re.compile(r"(\d+) bytes smem")


@dataclass
class KernelResources:
    """One kernel compiled for one arch. `registers` is None when the log had no "Used N registers" line;
    `smem` is the static shared memory only (dynamic shared memory is sized at launch)."""

    kernel: str
    arch: str
    registers: int | None = None
    stack: int = 0
    spill_stores: int = 0
    spill_loads: int = 0
    smem: int = 0

    @property
    def spills(self) -> bool:
        return self.spill_stores > 0 or self.spill_loads > 0


def parse(log: str) -> list[KernelResources]:
    """Every entry function of a ptxas log, in the order compiled. Lines before the first entry are ignored."""
    rows: list[KernelResources] = []
    current: KernelResources | None = None
    for line in log.splitlines():
        m = _ENTRY.search(line)
        if m:
            current = KernelResources(m.group(1), m.group(2))
            rows.append(current)
            continue
        if current is None:
            continue
        m = _PROPS.search(line)
        if m:
            current.stack, current.spill_stores, current.spill_loads = map(int, m.groups())
        m = _USED.search(line)
        if m:
            current.registers = int(m.group(1))
            s = _SMEM.search(line)
            current.smem = int(s.group(1)) if s else 0
    return rows


def run(ptxas: str, ptx: str, gpu_name: str, extra_flags: tuple[str, ...] = ("--regAllocOptLevel=2",)) -> str:
    """The `-v` log of ptxas compiling `ptx` for `gpu_name` (e.g. "sm_90a"); raises RuntimeError on failure."""
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        cmd = [ptxas, "-lineinfo", "-v", *extra_flags, f"--gpu-name={gpu_name}", src, "-o",
               os.path.join(tmp, "k.cubin")]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            raise RuntimeError(f"ptxas failed ({res.returncode}): {res.stderr[-2000:]}")
        return res.stdout + res.stderr
