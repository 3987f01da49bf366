"""Compile the CUDA kernels (csrc/cuda/*.cu) with nvcc and report their resource usage per kernel and arch.

    python tools/cuda_resource_check.py [--out resources.md] [--arch 80 --arch 90] [--nvcc PATH]

For every kernel and target architecture it prints registers, stack frame, spill stores, spill loads and
static shared memory (from `nvcc --resource-usage`, read by tools/ptxas.py), writes the table as markdown to
--out, and exits non-zero if any kernel spills registers or a file fails to compile. Needs a CUDA toolkit
(CUDA_HOME or nvcc on PATH) and torch for the include directories (a CUDA build of torch; the CPU build works
for kernel-only files).
No GPU is needed. The flags match setup.py's nvcc flags plus torch's own CUDAExtension defines.

Dynamic shared memory is sized at launch from the head dim and is not in this table; every launch checks it
against the device's opt-in limit and raises a clear error when it does not fit.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import ptxas  # tools/ptxas.py: this script's folder is on sys.path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_ARCHS = ("80", "90")
# setup.py's nvcc flags (without -lineinfo, which does not change resources) and torch's CUDAExtension defines.
NVCC_FLAGS = [
    "-O3", "--use_fast_math", "--resource-usage",
    "-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__", "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
    "-D__CUDA_NO_HALF2_OPERATORS__", "--expt-relaxed-constexpr", "-Xcompiler", "-fPIC",
]


def cxx_standard() -> str:
    """-std=c++20 where torch's headers need it (torch >= 2.10, as in setup.py), else -std=c++17."""
    try:
        import torch
    except ImportError:
        return "-std=c++17"
    major, minor = (int(x) for x in torch.__version__.split("+")[0].split(".")[:2])
    return "-std=c++20" if (major, minor) >= (2, 10) else "-std=c++17"


def find_nvcc(explicit: str | None) -> str:
    if explicit:
        return explicit
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(var)
        if home and (Path(home) / "bin" / "nvcc").exists():
            return str(Path(home) / "bin" / "nvcc")
    found = shutil.which("nvcc")
    if found:
        return found
    if Path("/usr/local/cuda/bin/nvcc").exists():
        return "/usr/local/cuda/bin/nvcc"
    sys.exit("cuda_resource_check: nvcc not found (set CUDA_HOME or put nvcc on PATH)")


def include_dirs(nvcc: str) -> list[str]:
    dirs = [str(ROOT / "csrc")]
    try:
        from torch.utils import cpp_extension

        try:
            dirs += cpp_extension.include_paths(device_type="cuda")
        except TypeError:  # torch < 2.6
            dirs += cpp_extension.include_paths(cuda=True)
    except ImportError:
        print("cuda_resource_check: torch not importable, compiling without its include dirs", file=sys.stderr)
    dirs.append(str(Path(nvcc).resolve().parent.parent / "include"))
    return [d for d in dict.fromkeys(dirs) if Path(d).is_dir()]


def demangle(names: list[str]) -> dict[str, str]:
    tool = shutil.which("cu++filt") or shutil.which("c++filt")
    if not tool or not names:
        return {n: n for n in names}
    out = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    if len(out) != len(names):
        return {n: n for n in names}
    pretty = {}
    for name, dem in zip(names, out):
        dem = re.sub(r"\(anonymous namespace\)::|\(prefix_kernels::cuda::Params\)|prefix_kernels::cuda::", "", dem)
        pretty[name] = dem.replace("__nv_bfloat16", "bf16").replace("__half", "fp16").replace("<float", "<fp32")
    return pretty


def compile_one(nvcc: str, src: Path, archs: list[str], incs: list[str], std: str, tmp: str) -> tuple[int, str]:
    cmd = [nvcc, std, *NVCC_FLAGS]
    for a in archs:
        cmd += ["-gencode", f"arch=compute_{a},code=sm_{a}"]
    cmd += [f"-I{d}" for d in incs]
    cmd += ["-c", str(src), "-o", os.path.join(tmp, src.stem + ".o")]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    return proc.returncode, proc.stdout + proc.stderr


def table(rows: list[ptxas.KernelResources]) -> str:
    lines = ["| kernel | arch | registers | stack (B) | spill stores (B) | spill loads (B) | static smem (B) |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        flag = " **SPILLS**" if r.spills else ""
        registers = "-" if r.registers is None else r.registers
        lines.append(f"| `{r.kernel}`{flag} | {r.arch} | {registers} | {r.stack} | {r.spill_stores} | "
                     f"{r.spill_loads} | {r.smem} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", help="write the table as markdown to this path")
    ap.add_argument("--arch", action="append", help="compute capability without the dot (default: 80 and 90)")
    ap.add_argument("--nvcc", help="path of nvcc (default: $CUDA_HOME/bin/nvcc or nvcc on PATH)")
    ap.add_argument("--std", help="C++ standard flag, e.g. -std=c++17 (default: what torch's headers need)")
    ap.add_argument("--sources", nargs="*", help="the .cu files (default: csrc/cuda/*.cu)")
    args = ap.parse_args(argv)

    nvcc = find_nvcc(args.nvcc)
    archs = args.arch or list(DEFAULT_ARCHS)
    sources = [Path(s) for s in args.sources] if args.sources else sorted((ROOT / "csrc" / "cuda").glob("*.cu"))
    if not sources:
        print("cuda_resource_check: no .cu files found", file=sys.stderr)
        return 1
    incs = include_dirs(nvcc)
    std = args.std or cxx_standard()
    version = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout.strip().splitlines()

    by_source: list[tuple[str, ptxas.KernelResources]] = []
    failures: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        for src in sources:
            shown = src.relative_to(ROOT) if src.is_relative_to(ROOT) else src
            print(f"compiling {shown} for sm_{', sm_'.join(archs)} ...", flush=True)
            rc, log = compile_one(nvcc, src, archs, incs, std, tmp)
            if rc != 0:
                failures.append(f"{src.name}: nvcc exited with {rc}\n{log}")
                continue
            by_source += [(src.name, r) for r in ptxas.parse(log)]

    names = demangle(sorted({r.kernel for _, r in by_source}))
    for _, r in by_source:
        r.kernel = names.get(r.kernel, r.kernel)
    rows = [r for _, r in sorted(by_source, key=lambda sr: (sr[0], sr[1].kernel, sr[1].arch))]
    spilling = [r for r in rows if r.spills]

    report = ["# CUDA kernel resource usage", "",
              f"nvcc: {version[-1] if version else nvcc}; flags: `{std} {' '.join(NVCC_FLAGS)}`", "",
              table(rows), "",
              ("**Register spills:** " + ", ".join(f"`{r.kernel}` ({r.arch})" for r in spilling)) if spilling
              else "No kernel spills registers.",
              "",
              "Static shared memory only: the tiles live in dynamic shared memory sized from the head dim at launch."]
    if failures:
        report += ["", "**Compile failures:**", "", "```", *failures, "```"]
    text = "\n".join(report) + "\n"
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
    if failures:
        print(f"cuda_resource_check: {len(failures)} file(s) failed to compile", file=sys.stderr)
        return 2
    if not rows:
        print("cuda_resource_check: no kernels found in the nvcc output", file=sys.stderr)
        return 1
    if spilling:
        print(f"cuda_resource_check: {len(spilling)} kernel/arch pair(s) spill registers", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
