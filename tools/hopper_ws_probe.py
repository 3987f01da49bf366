"""Probe: does this Triton warp-specialize an attention loop on sm_90? (docs/kernels.md "TMA", warp specialization)

Compiles, for sm_90 without a GPU, an attention forward reduced to what matters here (TMA descriptor loads, an
online softmax, two tile products per key block) with `tl.range(..., warp_specialize=True)` on its key loop, in
two shapes: one key loop (the Triton tutorial's) and two key loops in a row (prefix_attention_fwd has at least
two: the prefix keys, then the sequence keys), at FlashAttention's tile sizes. For each it reports what Triton's
Hopper warp-specialization pass did: `specialized` (the TTGIR has a `ttg.warp_specialize` region), `ignored`
(compiled, no region) or `failed` (the pass broke the compile). A TMA matmul is the control case.

    python tools/hopper_ws_probe.py [--out FILE.md]

Needs the variable TRITON_INTERPRET absent (real JIT functions). Exit status 0 whatever the answers: it reports.
"""

from __future__ import annotations

import argparse
import sys

import triton
import triton.language as tl

from prefix_kernels.ops.triton import interpreting

ARCH = 90
# (BLOCK_M, BLOCK_N, num_warps): FlashAttention-2's Hopper-sized tile over 8 warps and 4, and the 64-row tile.
TILES = ((128, 64, 8), (128, 64, 4), (64, 64, 4))
D = 128


@triton.jit
def _online_softmax_block(acc, m_i, l_i, q, k, v, qk_scale):
    qk = tl.dot(q, k.T)
    m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
    p = tl.math.exp2(qk * qk_scale - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
    return acc, m_new, l_i * alpha + tl.sum(p, 1)


@triton.jit
def attention(q_desc, k_desc, v_desc, o_desc, n_prefix, n, qk_scale, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              D: tl.constexpr, TWO_LOOPS: tl.constexpr):
    row = tl.program_id(0) * BLOCK_M
    base = tl.program_id(1) * n
    q = q_desc.load([base + row, 0])
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    if TWO_LOOPS:
        for start in range(0, n_prefix, BLOCK_N):
            acc, m_i, l_i = _online_softmax_block(acc, m_i, l_i, q, k_desc.load([start, 0]),
                                                  v_desc.load([start, 0]), qk_scale)
    for start in tl.range(0, n, BLOCK_N, warp_specialize=True):
        acc, m_i, l_i = _online_softmax_block(acc, m_i, l_i, q, k_desc.load([base + start, 0]),
                                              v_desc.load([base + start, 0]), qk_scale)
    o_desc.store([base + row, 0], (acc / l_i[:, None]).to(o_desc.dtype))


@triton.jit
def matmul(a_desc, b_desc, c_desc, K, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k in tl.range(0, K, BLOCK_K, warp_specialize=True):
        acc = tl.dot(a_desc.load([tl.program_id(0) * BLOCK_M, k]), b_desc.load([tl.program_id(1) * BLOCK_N, k]).T, acc)
    c_desc.store([tl.program_id(0) * BLOCK_M, tl.program_id(1) * BLOCK_N], acc.to(c_desc.dtype))


def _outcome(fn, signature: dict, constexprs: dict, num_warps: int) -> str:
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    src = ASTSource(fn=fn, signature={**signature, **{name: "constexpr" for name in constexprs}},
                    constexprs=constexprs)
    try:
        kernel = triton.compile(src, target=GPUTarget("cuda", ARCH, 32),
                                options={"num_warps": num_warps, "num_stages": 2})
    except Exception as e:  # noqa: BLE001 - the compile's failure is the answer
        return f"failed ({type(e).__name__})"
    return "specialized" if "ttg.warp_specialize" in kernel.asm["ttgir"] else "ignored"


def probe() -> list[tuple[str, tuple[int, int, int], str]]:
    rows = []
    for bm, bn, warps in TILES:
        mm = {"a_desc": f"tensordesc<bf16[{bm}, 64]>", "b_desc": f"tensordesc<bf16[{bn}, 64]>",
              "c_desc": f"tensordesc<bf16[{bm}, {bn}]>", "K": "i32"}
        rows.append(("TMA matmul (control)", (bm, bn, warps),
                     _outcome(matmul, mm, {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": 64}, warps)))
        attn = {"q_desc": f"tensordesc<bf16[{bm}, {D}]>", "k_desc": f"tensordesc<bf16[{bn}, {D}]>",
                "v_desc": f"tensordesc<bf16[{bn}, {D}]>", "o_desc": f"tensordesc<bf16[{bm}, {D}]>",
                "n_prefix": "i32", "n": "i32", "qk_scale": "fp32"}
        for two in (False, True):
            name = "attention, prefix loop + key loop" if two else "attention, one key loop"
            rows.append((name, (bm, bn, warps), _outcome(attention, attn, {"BLOCK_M": bm, "BLOCK_N": bn, "D": D,
                                                                           "TWO_LOOPS": two}, warps)))
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", help="also write the markdown table to this file")
    args = ap.parse_args(argv)
    if interpreting():
        print("hopper_ws_probe: unset TRITON_INTERPRET (the kernels must be real JIT functions)", file=sys.stderr)
        return 2
    lines = [f"Hopper warp specialization probe: triton {triton.__version__}, sm_{ARCH}, bf16, D {D}, "
             "`tl.range(..., warp_specialize=True)` on the key loop (tools/hopper_ws_probe.py).", "",
             "| kernel | BLOCK_M | BLOCK_N | warps | Triton's warp specialization |", "|---|---|---|---|---|"]
    lines += [f"| {name} | {bm} | {bn} | {w} | {outcome} |" for name, (bm, bn, w), outcome in probe()]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
