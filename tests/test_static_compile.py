"""Static GPU-compile check: every shipped kernel and tile config compiles for sm_80 and sm_90 without register
spills and within shared memory. Needs no GPU (Triton compiles for a GPUTarget and runs ptxas), only ptxas.
Also the ptxas log parser both static checks share (tools/ptxas.py)."""

import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from prefix_kernels.ops.triton.configs import (ATOMIC_DQ_TILE_CONFIGS, DECODE_MERGE_TILE, DECODE_TILES,
                                               DROPOUT_MASK_TILE, DROPOUT_TILE_CONFIGS, FEATURE_TILE_CONFIGS,
                                               PREPROCESS_TILE, SM90_ONLY_TILES, TILE_CONFIGS, TMA_MAX_D_PAD)

TOOLS = Path(__file__).resolve().parent.parent / "tools"
sys.path.insert(0, str(TOOLS))

import ptxas  # noqa: E402

ARCHS = (80, 90)
PLAIN = [("bwd_preprocess", "bf16", "no", "no", d_pad, str(PREPROCESS_TILE[0]), "-", *map(str, PREPROCESS_TILE[2:]))
         for d_pad in ("64", "128", "256")] + [("dropout_mask", "-", "yes", "no", "-", *map(str, DROPOUT_MASK_TILE))]
PLAIN += [("fwd_decode_merge", "bf16", "no", "no", d_pad, str(DECODE_MERGE_TILE[0]), "-",
           *map(str, DECODE_MERGE_TILE[2:])) for d_pad in ("64", "128", "256")]


def _ptxas() -> str | None:
    try:
        from triton import knobs

        path = knobs.nvidia.ptxas.path
        if path and os.path.exists(path):
            return path
    except Exception:  # noqa: BLE001 - any failure means: look elsewhere
        pass
    for candidate in (shutil.which("ptxas"), "/usr/local/cuda/bin/ptxas"):
        if candidate and os.path.exists(candidate):
            return candidate
    return None


def expected_rows() -> Counter:
    """(kernel, dtype, DROPOUT, FEATURES, D_PAD, BLOCK_M, BLOCK_N, warps, stages, arch) of every shipped launch
    (FEATURES: the attention kernels' feature tiles with window, softcap, sinks and packed sequences on; the
    decode forward's tiles with and without its features)."""
    rows = Counter()
    for arch in ARCHS:
        for kernel, buckets in TILE_CONFIGS.items():
            # A kernel with dropout tiles of its own (the forward): plain tiles without dropout, dropout tiles with.
            variants = [("no", buckets), ("yes", DROPOUT_TILE_CONFIGS[kernel])] if kernel in DROPOUT_TILE_CONFIGS \
                else [("yes", buckets)]
            for dropout, table in variants:
                for d_pad, tiles in table.items():
                    if table is buckets:  # the plain tiles: SM90_ONLY_TILES from sm_90 on
                        tiles = [t for t in tiles if arch >= 90 or t not in SM90_ONLY_TILES.get((kernel, d_pad), ())]
                    for bm, bn, w, s in tiles:
                        rows[(kernel, "bf16", dropout, "no", str(d_pad), str(bm), str(bn), str(w), str(s),
                              f"sm_{arch}")] += 1
        for kernel, buckets in FEATURE_TILE_CONFIGS.items():
            for d_pad, tiles in buckets.items():
                for bm, bn, w, s in tiles:
                    rows[(kernel, "bf16", "yes", "yes", str(d_pad), str(bm), str(bn), str(w), str(s),
                          f"sm_{arch}")] += 1
        for d_pad, tiles in DECODE_TILES.items():
            for bm, bn, w, s in tiles:
                for features in ("no", "yes"):
                    rows[("fwd_decode", "bf16", "no", features, str(d_pad), str(bm), str(bn), str(w), str(s),
                          f"sm_{arch}")] += 1
        for plain in PLAIN:
            rows[(*plain, f"sm_{arch}")] += 1
        # The atomic backward's key-side kernels on their own tiles, features off and on.
        for kernel, buckets in ATOMIC_DQ_TILE_CONFIGS.items():
            for d_pad, tiles in buckets.items():
                for bm, bn, w, s in tiles:
                    for features in ("no", "yes"):
                        rows[(kernel + " atomic-dq", "bf16", "yes", features, str(d_pad), str(bm), str(bn), str(w),
                              str(s), f"sm_{arch}")] += 1
        # The TMA forward (sm_90 and newer, D_PAD up to TMA_MAX_D_PAD): its plain tiles (SM90_ONLY_TILES
        # included), its dropout tiles and its feature tiles.
        if arch >= 90:
            for dropout, features, table in (("no", "no", TILE_CONFIGS), ("yes", "no", DROPOUT_TILE_CONFIGS),
                                             ("yes", "yes", FEATURE_TILE_CONFIGS)):
                for d_pad, tiles in table["fwd"].items():
                    if d_pad > TMA_MAX_D_PAD:
                        continue
                    for bm, bn, w, s in tiles:
                        rows[("fwd tma", "bf16", dropout, features, str(d_pad), str(bm), str(bn), str(w), str(s),
                              f"sm_{arch}")] += 1
    return rows


def table_rows(text: str) -> Counter:
    rows = Counter()
    for line in text.splitlines():
        if not line.startswith("| ") or line.startswith("| kernel |"):
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        rows[tuple(cells[:10])] += 1
    return rows


@pytest.mark.slow
def test_static_compile(tmp_path):
    if _ptxas() is None:
        pytest.skip("ptxas not found (neither Triton's bundled one nor /usr/local/cuda/bin/ptxas)")
    # The kernels must be real JIT functions: conftest.py sets TRITON_INTERPRET=1 on CPU-only machines.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = tmp_path / "static_compile.md"
    proc = subprocess.run(
        [sys.executable, str(TOOLS / "triton_compile_check.py"), "--arch", *map(str, ARCHS), "--out", str(out)],
        env=env, capture_output=True, text=True, timeout=1800,
    )
    print(proc.stdout)
    if proc.returncode != 0:
        print(proc.stderr[-5000:], file=sys.stderr)
    assert proc.returncode == 0, f"triton_compile_check failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}"
    text = out.read_text()
    assert table_rows(text) == expected_rows()


# ptxas -v output as Triton logs it (one kernel) and as nvcc --resource-usage prints it (several, with a
# non-entry function's properties and an arch suffix).
PTXAS_LOG = """\
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function 'prefix_attention_fwd' for 'sm_90a'
ptxas info    : Function properties for prefix_attention_fwd
    8 bytes stack frame, 12 bytes spill stores, 4 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers, 16 bytes smem, 400 bytes cmem[0]
ptxas info    : Compiling entry function '_Z3fwdILi64EEvv' for 'sm_80'
ptxas info    : Function properties for _Z3fwdILi64EEvv
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 40 registers, 384 bytes cmem[0]
"""


def test_ptxas_log_parser():
    first, second = ptxas.parse(PTXAS_LOG)
    assert (first.kernel, first.arch, first.registers, first.stack, first.spill_stores, first.spill_loads,
            first.smem) == ("prefix_attention_fwd", "sm_90a", 255, 8, 12, 4, 16)
    assert first.spills and not second.spills
    assert (second.kernel, second.arch, second.registers, second.smem) == ("_Z3fwdILi64EEvv", "sm_80", 40, 0)
    assert ptxas.parse("ptxas info    : 0 bytes gmem\n") == []


SEED_CHECK = """
import sys
sys.path.insert(0, sys.argv[1])
import triton_compile_check as check
from triton.runtime.autotuner import Autotuner

from prefix_kernels.ops.triton import kernels, kernels_bwd_fused

for job in check.plan((90,), quick=True):
    if job.kernel in ("bwd_preprocess", "fwd_decode", "fwd_decode_merge"):  # no dropout, no seed
        continue
    fn = getattr(kernels, job.function, None) or getattr(kernels_bwd_fused, job.function)
    fn = fn.fn if isinstance(fn, Autotuner) else fn
    assert "seed" in fn.do_not_specialize, job.function
    index = fn.arg_names.index("seed")
    assert fn.params[index].do_not_specialize, job.function
    for seed in (1, 32, 2**40):  # 1 would become a constant, 32 and 2**40 "divisible by 16"
        original = check._launch_args

        def launch_args(j, seed=seed, original=original):
            name, args, consts = original(j)
            return name, dict(args, seed=seed), consts

        check._launch_args = launch_args
        src = check._ast_source(job)
        check._launch_args = original
        assert (index,) not in src.constants and (index,) not in src.attrs, (job.function, seed, src.attrs)
        assert src.signature["seed"] in ("i32", "i64"), src.signature["seed"]
print("ok")
"""


def test_seed_is_not_a_specialization_key():
    """Triton specializes int arguments equal to 1 (a constant) or divisible by 16: a dropout seed would
    recompile the kernels for such values. Every kernel taking `seed` lists it in do_not_specialize, so the
    signature a launch compiles (as the static check builds it) has no specialization for it. Real JIT functions
    only: a subprocess without TRITON_INTERPRET."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", SEED_CHECK, str(TOOLS)], env=env, capture_output=True, text=True,
                          timeout=600, cwd=str(TOOLS.parent))
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]


def test_compile_check_plan_covers_every_tile_config():
    import triton_compile_check

    jobs = triton_compile_check.plan((80, 90))
    assert len(jobs) == sum(expected_rows().values())
    assert {job.function for job in jobs} == {
        "prefix_attention_" + k for k in ("fwd", "fwd_decode", "fwd_decode_merge", "bwd_dq", "bwd_dkdv",
                                          "bwd_fused", "bwd_dprefix", "bwd_preprocess", "dropout_mask")}
    # The opt-in fused backward: 4 plain tiles on sm_80 (its 32 x 64 over 8 warps at D 64 is sm_90 only), 5 on
    # sm_90, and 6 feature tiles on each.
    assert sum(job.kernel == "bwd_fused" for job in jobs) == 4 + 5 + 6 + 6
    # The atomic backward: bwd_dkdv's 6 tiles and bwd_dprefix's 3, features off and on, per arch.
    assert sum(job.atomic_dq for job in jobs) == 2 * 2 * (6 + 3)
    # The TMA forward, sm_90 only, D 64 and 128: 5 plain tiles, 5 dropout tiles, 4 feature tiles.
    assert [job.arch for job in jobs if job.tma] == [90] * (5 + 5 + 4)


WS_PROBE = """
import sys
sys.path.insert(0, sys.argv[1])
import hopper_ws_probe
rows = hopper_ws_probe.probe()
for name, tile, outcome in rows:
    print(name, tile, outcome)
"""


@pytest.mark.slow
def test_hopper_ws_probe_tells_specialized_from_ignored():
    """tools/hopper_ws_probe.py (docs/kernels.md, warp specialization) reports one outcome per kernel and tile, and
    its control case is specialized: a 64-row TMA matmul over 4 warps, which the Hopper pass of the Tritons this
    project supports specializes, so the probe's `specialized` / `ignored` / `failed` are read from real compiles."""
    if _ptxas() is None:
        pytest.skip("ptxas not found (neither Triton's bundled one nor /usr/local/cuda/bin/ptxas)")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", WS_PROBE, str(TOOLS)], env=env, capture_output=True, text=True,
                          timeout=600, cwd=str(TOOLS.parent))
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 9 and all(line.split(" ", 1)[0] in ("TMA", "attention,") for line in lines), lines
    outcomes = {line.rsplit(") ", 1)[0] + ")": line.rsplit(") ", 1)[1] for line in lines}
    assert outcomes["TMA matmul (control) (64, 64, 4)"] == "specialized", outcomes
    assert set(outcomes.values()) <= {"specialized", "ignored", "failed (RuntimeError)"}, outcomes
