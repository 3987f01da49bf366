"""Static GPU-compile check of the Triton kernels: registers, spills and shared memory without a GPU. Every shipped
kernel is compiled with `triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))` for sm_80 and sm_90,
for every tile config of `configs.TILE_CONFIGS` and every head-dim bucket, in the "full-feature" specialization
(causal, key padding mask, several prefixes, dropout; the forward without dropout on its plain tiles, with --fp32
also in fp32 with "ieee" dots for D_PAD <= 128, and with dropout on the tiles of `configs.DROPOUT_TILE_CONFIGS`),
and for every tile config of `configs.FEATURE_TILE_CONFIGS` the attention kernels (the opt-in `bwd_fused` too) with
every optional feature on (FEATURES: window, softcap, sinks, packed sequences with a prefix per sequence; no key
padding mask, which packed sequences exclude). `bwd_dkdv` and `bwd_dprefix` also compile the tiles of
`configs.ATOMIC_DQ_TILE_CONFIGS` as the opt-in atomic backward launches them (`atomic-dq` rows: ATOMIC_DQ, and for
`bwd_dprefix` its atomic prefix reduction), with FEATURES off and on. For sm_90 the forward also compiles through
tensor descriptors as the opt-in TMA forward launches it (`fwd tma` rows, D_PAD up to `configs.TMA_MAX_D_PAD`): its
plain tiles, its dropout tiles with dropout, its feature tiles with FEATURES on but packed sequences off. The tiles
of `configs.SM90_ONLY_TILES` compile for sm_90 only. The decode forward (`kernels_decode.py`) compiles every tile of
`configs.DECODE_TILES` (one per BLOCK_M) with FEATURES off (a decode step, L = 1: causal, key padding mask, several
prefixes, the keys split; with --fp32 also in fp32 with "ieee" dots for D_PAD <= 128) and on (L = 5: also window,
softcap and sinks, one split, so out and lse are stored directly), and its merge kernel at
`configs.DECODE_MERGE_TILE`. The argument types and the integer specializations (divisibility by 16, strides equal
to 1 as constants, none for the arguments a kernel lists in `do_not_specialize`, such as the dropout seed) are those
of a launch from `launch.py` on contiguous tensors. Shared memory comes from the compiled kernel's metadata
(`shared`, dynamic) plus the static shared memory ptxas reports; registers and spills come from `ptxas -v` (Triton's
own log of its ptxas run, or a second ptxas run on the PTX when the kernel came from Triton's cache), read by
tools/ptxas.py.

    python tools/triton_compile_check.py [--arch 80 90] [--out FILE.md] [--quick] [--fp32] [--jobs N]

Prints a markdown table and exits 1 if any row spills, exceeds the shared memory of its arch, or fails to
compile. The kernels must be real JIT functions: under TRITON_INTERPRET (a non-zero value) the check refuses
to run (exit 2), since the variable has to be absent before the kernels are imported.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from typing import Optional

import ptxas  # tools/ptxas.py: this script's folder is on sys.path

from prefix_kernels.ops.triton import interpreting

# Dynamic shared memory a block may opt into (bytes).
SMEM_LIMIT = {80: 166912, 90: 232448}
DEFAULT_ARCHS = (80, 90)
KERNEL_ORDER = ("fwd", "fwd_decode", "fwd_decode_merge", "bwd_dq", "bwd_dkdv", "bwd_fused", "bwd_dprefix",
                "bwd_preprocess", "dropout_mask")
FP32_MAX_D_PAD = 128
BUCKETS = (64, 128, 256)

# A representative launch: contiguous tensors, GQA, several prefixes, sizes that are not multiples of 16.
B, HQ, HKV, L, S, P, T = 2, 8, 4, 1000, 1000, 500, 3
GROUP = HQ // HKV
# The decode forward's queries: a decode step (FEATURES off, its keys split) and a short query (FEATURES on).
DECODE_L, DECODE_FEATURES_L, DECODE_SPLITS = 1, 5, 7


@dataclass(frozen=True)
class Job:
    kernel: str  # TILE_CONFIGS key, or "fwd_decode" / "fwd_decode_merge" / "bwd_preprocess" / "dropout_mask"
    dtype: str  # "bf16" or "fp32"
    dropout: bool
    d_pad: Optional[int]
    block_m: int
    block_n: Optional[int]
    num_warps: int
    num_stages: int
    arch: int
    features: bool = False  # WINDOW, SOFTCAP, SINKS (forward), PACKED on; HAS_KPM off (fwd_decode: see above)
    atomic_dq: bool = False  # bwd_dkdv / bwd_dprefix of the atomic backward (ATOMIC_DQ; bwd_dprefix: ATOMIC too)
    tma: bool = False  # fwd with tensor descriptors (TMA, sm_90)

    @property
    def name(self) -> str:
        """The table's kernel cell."""
        return self.kernel + (" atomic-dq" if self.atomic_dq else "") + (" tma" if self.tma else "")

    @property
    def function(self) -> str:
        """The kernel's function in kernels.py, kernels_bwd_fused.py or kernels_decode.py."""
        return "prefix_attention_" + self.kernel


@dataclass
class Row:
    job: Job
    registers: Optional[int] = None
    spill_stores: Optional[int] = None
    spill_loads: Optional[int] = None
    smem: Optional[int] = None
    seconds: float = 0.0
    error: Optional[str] = None
    error_full: Optional[str] = None
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.error is None and not self.problems


def plan(archs=DEFAULT_ARCHS, quick: bool = False, fp32: bool = False) -> list[Job]:
    """Every (kernel, variant, tile, arch) the check compiles; `tests/test_static_compile.py` counts these."""
    from prefix_kernels.ops.triton.configs import (ATOMIC_DQ_TILE_CONFIGS, DECODE_MERGE_TILE, DECODE_TILES,
                                                   DROPOUT_MASK_TILE,
                                                   DROPOUT_TILE_CONFIGS, FEATURE_TILE_CONFIGS, PREPROCESS_TILE,
                                                   TILE_CONFIGS, TMA_MAX_D_PAD, launch_tiles, tiles_for_arch)

    jobs = []
    for arch in archs:
        for kernel, buckets in TILE_CONFIGS.items():
            # (dtype, dropout, table): a kernel with its own dropout tiles compiles its plain tiles without
            # dropout and its dropout tiles with it; the others compile their plain tiles with dropout.
            if kernel in DROPOUT_TILE_CONFIGS:
                variants = [("bf16", False, buckets), ("bf16", True, DROPOUT_TILE_CONFIGS[kernel])]
                if fp32:
                    variants.append(("fp32", False, buckets))
            else:
                variants = [("bf16", True, buckets)]
            for dtype, dropout, table in variants:
                for d_pad, tiles in sorted(table.items()):
                    if dtype == "fp32" and d_pad > FP32_MAX_D_PAD:
                        continue
                    if table is buckets:  # the plain tiles: those of SM90_ONLY_TILES only from sm_90 on
                        tiles = tiles_for_arch(kernel, d_pad, tiles, arch)
                    for bm, bn, w, s in tiles[:1] if quick else tiles:
                        jobs.append(Job(kernel, dtype, dropout, d_pad, bm, bn, w, s, arch))
        for kernel, buckets in FEATURE_TILE_CONFIGS.items():
            for d_pad, tiles in sorted(buckets.items()):
                for bm, bn, w, s in tiles[:1] if quick else tiles:
                    jobs.append(Job(kernel, "bf16", True, d_pad, bm, bn, w, s, arch, features=True))
        if arch >= 90:
            # The forward through tensor descriptors (launch.py's TMA mode, D_PAD up to TMA_MAX_D_PAD) on each of
            # its tables: plain, dropout, and features (without packed sequences, which TMA does not take).
            for dropout, features in ((False, False), (True, False), (True, True)):
                for d_pad in (d for d in BUCKETS if d <= TMA_MAX_D_PAD):
                    tiles = launch_tiles("fwd", d_pad, features, dropout, arch=arch)
                    for bm, bn, w, s in tiles[:1] if quick else tiles:
                        jobs.append(Job("fwd", "bf16", dropout, d_pad, bm, bn, w, s, arch, features=features,
                                        tma=True))
        # The key-side kernels as the atomic backward launches them (dq's atomics on top), on their own tiles,
        # with the features off and on.
        for kernel, buckets in ATOMIC_DQ_TILE_CONFIGS.items():
            for d_pad, tiles in sorted(buckets.items()):
                for bm, bn, w, s in tiles[:1] if quick else tiles:
                    for features in (False, True):
                        jobs.append(Job(kernel, "bf16", True, d_pad, bm, bn, w, s, arch, features=features,
                                        atomic_dq=True))
        for d_pad, tiles in sorted(DECODE_TILES.items()):
            for bm, bn, w, s in tiles[-1:] if quick else tiles:
                for features in (False, True):
                    jobs.append(Job("fwd_decode", "bf16", False, d_pad, bm, bn, w, s, arch, features=features))
                if fp32 and d_pad <= FP32_MAX_D_PAD:
                    jobs.append(Job("fwd_decode", "fp32", False, d_pad, bm, bn, w, s, arch))
        bm, _, w, s = DECODE_MERGE_TILE
        for d_pad in BUCKETS:
            jobs.append(Job("fwd_decode_merge", "bf16", False, d_pad, bm, None, w, s, arch))
        bm, _, w, s = PREPROCESS_TILE
        for d_pad in BUCKETS:
            jobs.append(Job("bwd_preprocess", "bf16", False, d_pad, bm, None, w, s, arch))
        bm, bn, w, s = DROPOUT_MASK_TILE
        jobs.append(Job("dropout_mask", "-", True, None, bm, bn, w, s, arch))
    return jobs


# ----------------------------------------------------------------------------------------------------------
# Arguments of one launch, as launch.py passes them.


def _contig(*shape):
    strides, acc = [], 1
    for n in reversed(shape):
        strides.append(acc)
        acc *= n
    return tuple(reversed(strides))


def _launch_args(job: Job) -> tuple[str, dict, dict]:
    """(kernel function name, runtime arguments by name, constexprs by name) of one launch."""
    import torch
    from triton.runtime.jit import MockTensor

    tdt = {"bf16": torch.bfloat16, "fp32": torch.float32}.get(job.dtype, torch.bfloat16)

    def t(dtype=tdt):
        return MockTensor(dtype)

    D = job.d_pad
    q_s = _contig(B, HQ, L, D) if D else None
    kv_s = _contig(B, HKV, S, D) if D else None
    p_s = _contig(T, HKV, P, D) if D else None
    kpm_s = _contig(B, S)
    scalars = dict(scale_log2=0.18033688011112042, dropout_p=0.1, seed=2**61 + 12345)
    buckets = dict(L_BUCKET=1024, S_BUCKET=1024, P_BUCKET=512)
    tiles = dict(BLOCK_M=job.block_m, BLOCK_N=job.block_n)
    common = dict(GROUP=GROUP, D=D, D_PAD=D, DROPOUT=job.dropout,
                  DOT_PRECISION="ieee" if job.dtype == "fp32" else "tf32", **tiles)
    on = job.features
    packed = on and not job.tma
    flags = dict(WINDOW=on, SOFTCAP=on, PACKED=packed)
    # Packed sequences: 5 along the one row (n_seqs); a window of 128 keys, a cap of 30 (Gemma 2's 50 is alike).
    features = dict(n_seqs=5 if packed else 1, window=128 if on else 0, softcap=30.0 if on else 0.0)
    kpm = not on

    def strides(**layouts):
        """The stride arguments: strides(q=("bhld", q_s)) -> {"stride_qb": ..., "stride_qh": ..., ...}."""
        return {f"stride_{name}{dim}": value for name, (dims, values) in layouts.items()
                for dim, value in zip(dims, values)}

    if job.kernel == "fwd":
        args = dict(Q=t(), K=t(), V=t(), PK=t(), PV=t(), KPM=t(torch.uint8), PIDX=t(torch.int64),
                    CU_SEQLENS=t(torch.int32), SINK_LOGITS=t(torch.float32), OUT=t(), LSE=t(torch.float32))
        if job.tma:
            from triton.tools.tensor_descriptor import TensorDescriptor

            def desc(shape, strides, rows):
                return TensorDescriptor(t(), list(shape), list(strides), [1, 1, rows, D])

            args.update(Q=desc((B, HQ, L, D), q_s, job.block_m), OUT=desc((B, HQ, L, D), q_s, job.block_m),
                        K=desc((B, HKV, S, D), kv_s, job.block_n), V=desc((B, HKV, S, D), kv_s, job.block_n),
                        PK=desc((T, HKV, P, D), p_s, job.block_n), PV=desc((T, HKV, P, D), p_s, job.block_n))
        args.update(strides(q=("bhld", q_s), k=("bhsd", kv_s), v=("bhsd", kv_s), pk=("thpd", p_s),
                            pv=("thpd", p_s), o=("bhld", q_s), kpm_=("bs", kpm_s)))
        args.update(Hq=HQ, L=L, S=S, P=P, **features, **scalars, **buckets)
        consts = dict(CAUSAL=True, HAS_KPM=kpm, MULTI_PREFIX=True, SINKS=on, TMA=job.tma, **flags, **common)
    elif job.kernel == "fwd_decode":
        args = dict(Q=t(), K=t(), V=t(), PK=t(), PV=t(), KPM=t(torch.uint8), PIDX=t(torch.int64),
                    SINK_LOGITS=t(torch.float32), OUT=t(), LSE=t(torch.float32), WS_O=t(torch.float32),
                    WS_LSE=t(torch.float32))
        decode_l = DECODE_FEATURES_L if on else DECODE_L
        dq_s = _contig(B, HQ, decode_l, D)
        args.update(strides(q=("bhld", dq_s), k=("bhsd", kv_s), v=("bhsd", kv_s), pk=("thpd", p_s),
                            pv=("thpd", p_s), o=("bhld", dq_s), kpm_=("bs", kpm_s)))
        args.update(Hq=HQ, Hkv=HKV, L=decode_l, S=S, P=P, n_splits=1 if on else DECODE_SPLITS,
                    window=features["window"], softcap=features["softcap"], scale_log2=scalars["scale_log2"])
        consts = dict(CAUSAL=True, HAS_KPM=True, MULTI_PREFIX=True, WINDOW=on, SOFTCAP=on, SINKS=on, SPLIT=not on,
                      **{name: common[name] for name in ("GROUP", "D", "D_PAD", "DOT_PRECISION")}, **tiles)
    elif job.kernel == "fwd_decode_merge":
        args = dict(WS_O=t(torch.float32), WS_LSE=t(torch.float32), OUT=t(), LSE=t(torch.float32))
        args.update(strides(o=("bhld", _contig(B, HQ, DECODE_L, D))))
        args.update(Hq=HQ, L=DECODE_L, n_rows=B * HQ * DECODE_L, n_splits=DECODE_SPLITS)
        consts = dict(D=D, D_PAD=D, BLOCK_M=job.block_m)
    elif job.kernel == "bwd_dq":
        args = dict(Q=t(), K=t(), V=t(), PK=t(), PV=t(), KPM=t(torch.uint8), PIDX=t(torch.int64),
                    CU_SEQLENS=t(torch.int32), DO=t(), LSE=t(torch.float32), DELTA=t(torch.float32), DQ=t())
        args.update(strides(q=("bhld", q_s), k=("bhsd", kv_s), v=("bhsd", kv_s), pk=("thpd", p_s),
                            pv=("thpd", p_s), do=("bhld", q_s), dq=("bhld", q_s), kpm_=("bs", kpm_s)))
        args.update(Hq=HQ, L=L, S=S, P=P, **features, **scalars, **buckets)
        consts = dict(CAUSAL=True, HAS_KPM=kpm, MULTI_PREFIX=True, **flags, **common)
    elif job.kernel == "bwd_dkdv":
        args = dict(Q=t(), K=t(), V=t(), KPM=t(torch.uint8), CU_SEQLENS=t(torch.int32), DO=t(),
                    LSE=t(torch.float32), DELTA=t(torch.float32), DK=t(), DV=t())
        args.update(strides(q=("bhld", q_s), k=("bhsd", kv_s), v=("bhsd", kv_s), do=("bhld", q_s),
                            dk=("bhsd", kv_s), dv=("bhsd", kv_s), kpm_=("bs", kpm_s)))
        args.update(Hq=HQ, Hkv=HKV, L=L, S=S, P=P, **features, **scalars, **buckets)
        args.update(DQ=t(torch.float32))
        consts = dict(CAUSAL=True, HAS_KPM=kpm, ATOMIC_DQ=job.atomic_dq, **flags, **common)
    elif job.kernel == "bwd_fused":
        args = dict(Q=t(), K=t(), V=t(), PK=t(), PV=t(), KPM=t(torch.uint8), PIDX=t(torch.int64),
                    CU_SEQLENS=t(torch.int32), DO=t(), LSE=t(torch.float32), DELTA=t(torch.float32), DQ=t(), DK=t(),
                    DV=t())
        args.update(strides(q=("bhld", q_s), k=("bhsd", kv_s), v=("bhsd", kv_s), pk=("thpd", p_s),
                            pv=("thpd", p_s), do=("bhld", q_s), dq=("bhld", q_s), dk=("bhsd", kv_s),
                            dv=("bhsd", kv_s), kpm_=("bs", kpm_s)))
        args.update(Hq=HQ, Hkv=HKV, L=L, S=S, P=P, **features, **scalars, **buckets)
        consts = dict(CAUSAL=True, HAS_KPM=kpm, MULTI_PREFIX=True, DQ_ON=True, DKDV_ON=True, **flags, **common)
    elif job.kernel == "bwd_dprefix":
        args = dict(Q=t(), PK=t(), PV=t(), PIDX=t(torch.int64), DO=t(), LSE=t(torch.float32),
                    DELTA=t(torch.float32), DPK=t(torch.float32), DPV=t(torch.float32), DQ=t(torch.float32))
        args.update(strides(q=("bhld", q_s), pk=("thpd", p_s), pv=("thpd", p_s), do=("bhld", q_s)))
        args.update(B=B, Hq=HQ, Hkv=HKV, L=L, S=S, P=P, T=T, n_splits=7, softcap=features["softcap"], **scalars,
                    **buckets)
        consts = dict(MULTI_PREFIX=True, ATOMIC=job.atomic_dq, ATOMIC_DQ=job.atomic_dq, SOFTCAP=on, PACKED=on,
                      **common)
    elif job.kernel == "bwd_preprocess":
        args = dict(OUT=t(), DO=t(), DELTA=t(torch.float32))
        args.update(strides(o=("bhld", q_s), do=("bhld", q_s)))
        args.update(Hq=HQ, L=L)
        consts = dict(D=D, D_PAD=D, BLOCK_M=job.block_m)
    elif job.kernel == "dropout_mask":
        args = dict(KEEP=t(torch.int8), L=L, P=P, S=S, dropout_p=scalars["dropout_p"], seed=scalars["seed"])
        consts = dict(BLOCK_M=job.block_m, BLOCK_N=job.block_n)
    else:
        raise ValueError(f"unknown kernel {job.kernel!r}")
    return job.function, args, consts


def _ast_source(job: Job):
    """The ASTSource of a job, specialized like a JIT launch (ints divisible by 16, ints equal to 1)."""
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.nvidia.compiler import CUDABackend
    from triton.compiler import ASTSource

    from prefix_kernels.ops.triton import kernels, kernels_bwd_fused, kernels_decode

    name, args, consts = _launch_args(job)
    fn = getattr(kernels, name, None) or getattr(kernels_bwd_fused, name, None) or getattr(kernels_decode, name)
    from triton.runtime.autotuner import Autotuner
    if isinstance(fn, Autotuner):
        fn = fn.fn  # the JITFunction under the autotuner
    if not hasattr(fn, "arg_names"):
        raise RuntimeError(f"{name} is not a JITFunction (is TRITON_INTERPRET set?)")
    missing = set(fn.arg_names) - set(args) - set(consts)
    extra = (set(args) | set(consts)) - set(fn.arg_names)
    if missing or extra:
        raise RuntimeError(f"{name}: launch arguments out of date: missing {sorted(missing)}, extra {sorted(extra)}")
    signature, constexprs, attrs = {}, {}, {}
    for i, arg in enumerate(fn.arg_names):
        if arg in consts:
            signature[arg] = "constexpr"
            constexprs[arg] = consts[arg]
            continue
        # (backend, value, is_const, specialize_value, align), as the JIT's launcher calls it.
        specialize = i not in fn.do_not_specialize and arg not in fn.do_not_specialize
        ty, spec = native_specialize_impl(CUDABackend, args[arg], False, specialize, True)
        signature[arg] = ty
        if ty == "constexpr":  # an int equal to 1
            constexprs[arg] = spec
        elif isinstance(spec, str):
            attrs[(i,)] = CUDABackend.parse_attr(spec)
    return ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)


def _ptxas(arch: int) -> str:
    from triton.backends.nvidia.compiler import get_ptxas
    return get_ptxas(arch).path


def _resources(log: str, function: str) -> Optional[ptxas.KernelResources]:
    """The entry `function` of a ptxas log (a log holds one kernel per compile), None if it has no register
    count (a kernel from Triton's cache: no ptxas ran)."""
    rows = [r for r in ptxas.parse(log) if r.registers is not None]
    named = [r for r in rows if r.kernel == function]
    return (named or rows or [None])[-1]


def _resources_path(kernel_hash: str) -> str:
    from triton import knobs
    return os.path.join(knobs.cache.dir, "prefix_kernels_compile_check", f"{kernel_hash}.json")


def _cached_resources(kernel_hash: str) -> Optional[ptxas.KernelResources]:
    """The ptxas numbers of a kernel found in Triton's cache (its ptxas log is not kept there)."""
    try:
        with open(_resources_path(kernel_hash)) as f:
            return ptxas.KernelResources(**json.load(f))
    except (OSError, ValueError, TypeError):
        return None


def _store_resources(kernel_hash: str, info: ptxas.KernelResources) -> None:
    path = _resources_path(kernel_hash)
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump(asdict(info), f)
        os.replace(tmp, path)
    except OSError:
        pass


def compile_job(job: Job) -> Row:
    """Compile one job and read its resources (runs in a worker process)."""
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import sm_arch_from_capability

    row = Row(job)
    start = time.perf_counter()
    try:
        src = _ast_source(job)
        knobs.nvidia.dump_ptxas_log = True
        captured = io.StringIO()
        with contextlib.redirect_stdout(captured):
            kernel = triton.compile(src, target=GPUTarget("cuda", job.arch, 32),
                                    options={"num_warps": job.num_warps, "num_stages": job.num_stages})
        info = _resources(captured.getvalue(), job.function)
        if info is None:  # a cache hit: Triton ran no ptxas this time
            info = _cached_resources(kernel.hash)
        if info is None:
            log = ptxas.run(_ptxas(job.arch), kernel.asm["ptx"], sm_arch_from_capability(job.arch))
            info = _resources(log, job.function)
        if info is None:
            raise RuntimeError("no register count in the ptxas log")
        _store_resources(kernel.hash, info)
        row.registers = info.registers
        row.spill_stores = info.spill_stores
        row.spill_loads = info.spill_loads
        row.smem = int(kernel.metadata.shared) + info.smem
    except Exception as e:  # noqa: BLE001 - every failure becomes a failing row
        msg = f"{type(e).__name__}: {e}".strip()
        row.error = msg.splitlines()[0][:300] if msg else type(e).__name__
        row.problems.append("compile error")
        row.seconds = time.perf_counter() - start
        row.error_full = msg
        return row
    row.seconds = time.perf_counter() - start
    if row.spill_stores or row.spill_loads:
        row.problems.append("spills")
    if row.smem > SMEM_LIMIT[job.arch]:
        row.problems.append(f"smem > {SMEM_LIMIT[job.arch]}")
    return row


# ----------------------------------------------------------------------------------------------------------
# Table


HEADER = ["kernel", "dtype", "DROPOUT", "FEATURES", "D_PAD", "BLOCK_M", "BLOCK_N", "warps", "stages", "arch",
          "registers", "spill stores", "spill loads", "smem bytes", "OK"]


def _cell(v):
    return "-" if v is None else str(v)


def table(rows: list[Row]) -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "|".join("---" for _ in HEADER) + "|"]
    for r in rows:
        j = r.job
        ok = "yes" if r.ok else "NO: " + ", ".join(r.problems)
        cells = [j.name, j.dtype, "yes" if j.dropout else "no", "yes" if j.features else "no", _cell(j.d_pad),
                 j.block_m, _cell(j.block_n), j.num_warps, j.num_stages, f"sm_{j.arch}", _cell(r.registers),
                 _cell(r.spill_stores), _cell(r.spill_loads), _cell(r.smem), ok]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


def _order(job: Job):
    return (KERNEL_ORDER.index(job.kernel), job.atomic_dq, job.tma, job.features, job.dtype != "bf16", not job.dropout,
            job.d_pad or 0, job.arch)


def run_check(archs=DEFAULT_ARCHS, quick=False, fp32=False, jobs: int = 2) -> tuple[list[Row], float]:
    todo = plan(archs, quick, fp32)
    start = time.perf_counter()
    # Slowest first (large tiles, many stages) so the pool does not end on one long compile.
    by_cost = sorted(todo, key=lambda j: -(j.block_m * (j.block_n or 64) * (j.d_pad or 64) * j.num_stages))
    rows = []

    def progress(row: Row):
        rows.append(row)
        status = "ok" if row.ok else ", ".join(row.problems)
        print(f"[{len(rows)}/{len(todo)} {time.perf_counter() - start:.0f}s] {row.job.name} {row.job.dtype} "
              f"drop={row.job.dropout} feat={row.job.features} D={row.job.d_pad} {row.job.block_m}x{row.job.block_n} "
              f"w{row.job.num_warps} "
              f"s{row.job.num_stages} sm_{row.job.arch}: regs={row.registers} spill={row.spill_stores}/"
              f"{row.spill_loads} smem={row.smem} {status} ({row.seconds:.0f}s)", file=sys.stderr, flush=True)

    if jobs > 1:
        import multiprocessing as mp
        with ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("spawn")) as pool:
            for fut in as_completed([pool.submit(compile_job, j) for j in by_cost]):
                progress(fut.result())
    else:
        for j in by_cost:
            progress(compile_job(j))
    index = {j: i for i, j in enumerate(todo)}
    rows.sort(key=lambda r: (_order(r.job), index[r.job]))
    return rows, time.perf_counter() - start


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python tools/triton_compile_check.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", type=int, nargs="+", default=list(DEFAULT_ARCHS), choices=sorted(SMEM_LIMIT))
    parser.add_argument("--out", help="also write the markdown table to this file")
    parser.add_argument("--quick", action="store_true", help="only the first tile config of each kernel and bucket")
    parser.add_argument("--fp32", action="store_true",
                        help=f"also the forward in fp32 with ieee dots at D_PAD <= {FP32_MAX_D_PAD} (slower)")
    parser.add_argument("--jobs", type=int, default=2, help="parallel compile processes (default 2)")
    args = parser.parse_args(argv)

    if interpreting():
        print("triton_compile_check: TRITON_INTERPRET is set to a non-zero value, so the kernels are interpreter "
              "objects and cannot be compiled. Run it with the variable unset, e.g. "
              "`env -u TRITON_INTERPRET python tools/triton_compile_check.py`.", file=sys.stderr)
        return 2

    import triton

    rows, seconds = run_check(tuple(args.arch), args.quick, args.fp32, args.jobs)
    bad = [r for r in rows if not r.ok]
    text = (f"Static compile check of the prefix-kernels Triton kernels: triton {triton.__version__}, "
            f"ptxas {', '.join(sorted({_ptxas(a) for a in args.arch}))}, compiled on a CPU-only machine "
            f"(no GPU), {len(rows)} kernels in {seconds:.0f} s with {args.jobs} processes.\n"
            f"Launch specialization: causal, key padding mask, {T} prefixes, dropout (the forward: its plain tiles "
            f"without dropout{', also in fp32 with ieee dots at D_PAD <= ' + str(FP32_MAX_D_PAD) if args.fp32 else ''}"
            f", its DROPOUT_TILE_CONFIGS with dropout); the tiles of SM90_ONLY_TILES on sm_90 only; "
            f"FEATURES = yes: window, softcap, sinks and packed sequences (with a prefix each), no padding mask; "
            f"`fwd tma` (sm_90 only, D_PAD <= 128): the forward through tensor descriptors, FEATURES without packed "
            f"sequences; "
            f"deterministic prefix reduction, except the `atomic-dq` rows (the atomic backward: ATOMIC_DQ, and "
            f"bwd_dprefix's ATOMIC); "
            f"B={B}, Hq={HQ}, Hkv={HKV}, L=S={L}, P={P}, contiguous tensors, D = D_PAD; fwd_decode: L = {DECODE_L} "
            f"with {DECODE_SPLITS} splits (FEATURES = no) or L = {DECODE_FEATURES_L}, one split, window, softcap and "
            f"sinks with the padding mask (FEATURES = yes). "
            f"smem = Triton's dynamic shared memory + ptxas static smem; limits sm_80 {SMEM_LIMIT[80]}, "
            f"sm_90 {SMEM_LIMIT[90]} bytes.\n\n" + table(rows) + "\n")
    for r in bad:
        if r.error:
            text += f"\n- {r.job}: {r.error_full}\n"
    text += f"\n{len(rows) - len(bad)}/{len(rows)} OK.\n"
    print(text)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            f.write(text)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
