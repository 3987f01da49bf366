"""The op's optional features on CPU: what a sliding window, soft-capping, sinks and packing cost, side by side.

    python benchmarks/features.py [--device cpu] [--reps N] [--quick] [--backends cpu reference] [--out DIR]

Each case times its variants with every backend in one process, calls alternating (benchmarks/common.py):
- window: a causal layer with L = S = 4096 (B 1, Hq 8, Hkv 2, P 64, D 64) without a window and with window
  512. A fused backend skips the key blocks the window hides, so its time should fall roughly with the
  fraction of keys visible (P + 512 of P + ~2048 on average); the reference computes every score and masks.
- softcap: soft-capping (Gemma 2's 50.0) on and off, at the NLU shape and a causal GQA shape.
- sinks: GPT-OSS's per-head sink logit on and off, causal GQA shape.
- packed: 32 sequences with the token lengths of 32 Rotten Tomatoes training sentences under
  all-MiniLM-L6-v2's tokenizer (the demo's data, 835 tokens), padded into a [32, 49] batch with key
  padding (1568 positions), against the same sequences packed into one row with `cu_seqlens`;
  bidirectional (NLU) and causal.
Rows (median, p20/p80 ms, ratio to the case's first variant with the same backend, ratio to `reference` on
the same variant, peak MiB) are appended to <out>/features.csv and written to <out>/features_<device>.md.
`--quick`: one case, 2 reps, fwd only (a smoke test, no timing claim).
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass, field

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (  # noqa: E402
    append_csv, git_commit, machine_description, markdown_table, peak_memory_mib, progress, results_dir,
    time_side_by_side, utc_stamp, versions,
)

import torch  # noqa: E402

from prefix_kernels import available_backends, prefix_attention  # noqa: E402
from prefix_kernels.ops.backends import backend as backend_record  # noqa: E402

# Token counts (special tokens included, truncated at 64) of the first 32 snippets of the demo's Rotten
# Tomatoes training split (seed 0) under all-MiniLM-L6-v2's tokenizer: 835 tokens, longest 49.
RT_LENGTHS = (29, 18, 21, 10, 30, 35, 34, 30, 22, 32, 26, 25, 49, 8, 28, 21,
              9, 18, 35, 17, 23, 32, 41, 43, 33, 13, 49, 11, 22, 31, 22, 18)


@dataclass(frozen=True)
class Layer:
    B: int
    Hq: int
    Hkv: int
    L: int
    P: int
    D: int
    causal: bool

    def label(self) -> str:
        return (f"B={self.B} H={self.Hq}/{self.Hkv} L=S={self.L} P={self.P} D={self.D}"
                f"{' causal' if self.causal else ''}")


@dataclass(frozen=True)
class Variant:
    name: str
    options: dict = field(default_factory=dict)  # window / softcap / sinks
    lengths: tuple[int, ...] = ()  # packed or padded sequences instead of the layer's B x L
    packed: bool = False


@dataclass(frozen=True)
class Case:
    name: str
    layer: Layer
    variants: tuple[Variant, ...]


NLU = Layer(8, 12, 12, 128, 64, 64, causal=False)
CAUSAL = Layer(1, 8, 2, 512, 64, 64, causal=True)
CASES = [
    Case("window", Layer(1, 8, 2, 4096, 64, 64, causal=True),
         (Variant("no window"), Variant("window 512", {"window": 512}))),
    Case("softcap NLU", NLU, (Variant("no softcap"), Variant("softcap 50", {"softcap": 50.0}))),
    Case("softcap causal", CAUSAL, (Variant("no softcap"), Variant("softcap 50", {"softcap": 50.0}))),
    Case("sinks causal", CAUSAL, (Variant("no sinks"), Variant("sinks", {"sinks": True}))),
    Case("packed NLU", Layer(32, 12, 12, 49, 64, 64, causal=False),
         (Variant("padded [32, 49]", lengths=RT_LENGTHS), Variant("packed", lengths=RT_LENGTHS, packed=True))),
    Case("packed causal", Layer(32, 8, 2, 49, 64, 64, causal=True),
         (Variant("padded [32, 49]", lengths=RT_LENGTHS), Variant("packed", lengths=RT_LENGTHS, packed=True))),
]


def build(layer: Layer, variant: Variant, dtype, device, backend: str, requires_grad: bool):
    """(leaves, forward, grad_out) for one variant on one backend."""
    gen = torch.Generator().manual_seed(0)

    def rnd(*dims):
        return torch.randn(*dims, generator=gen).to(device=device, dtype=dtype).requires_grad_(requires_grad)

    B, L = layer.B, layer.L
    kwargs = {}
    if variant.lengths:
        lengths = torch.tensor(variant.lengths)
        if variant.packed:
            B, L = 1, int(lengths.sum())
            kwargs["cu_seqlens"] = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)]).to(
                device=device, dtype=torch.int32)
        else:
            B, L = len(lengths), int(lengths.max())
            kwargs["key_padding_mask"] = (torch.arange(L)[None, :] < lengths[:, None]).to(device)
    q = rnd(B, layer.Hq, L, layer.D)
    k, v = rnd(B, layer.Hkv, L, layer.D), rnd(B, layer.Hkv, L, layer.D)
    pk, pv = rnd(layer.Hkv, layer.P, layer.D), rnd(layer.Hkv, layer.P, layer.D)
    for name, value in variant.options.items():
        kwargs[name] = (torch.randn(layer.Hq, generator=gen).to(device=device, dtype=dtype)
                        if name == "sinks" else value)
    grad_out = torch.randn(B, layer.Hq, L, layer.D, generator=gen).to(device=device, dtype=dtype)
    leaves = (q, k, v, pk, pv)

    def forward():
        return prefix_attention(q, k, v, pk, pv, causal=layer.causal, backend=backend, **kwargs)

    return leaves, forward, grad_out


def _call(leaves, forward, grad_out, mode: str):
    if mode == "fwd":
        def fwd():
            with torch.no_grad():
                forward()
        return fwd

    def fwd_bwd():
        for t in leaves:
            t.grad = None
        forward().backward(grad_out)
    return fwd_bwd


def measure(cases, backends, device, dtype_name, reps, modes):
    rows, table = [], []
    machine, stamp, commit, vers = machine_description(device), utc_stamp(), git_commit(), versions()
    dtype = getattr(torch, dtype_name)
    work = [(c, m) for c in cases for m in modes]
    for case, mode in progress(work, "features"):
        calls, names = {}, []
        for variant in case.variants:
            for backend in backends:
                features = tuple(f for f in ("window", "softcap", "sinks") if f in variant.options)
                features += ("packed",) if variant.packed else ()
                if backend_record(backend).missing(features):
                    continue
                leaves, forward, grad_out = build(case.layer, variant, dtype, device, backend, mode != "fwd")
                key = (variant.name, backend)
                calls[key] = _call(leaves, forward, grad_out, mode)
                names.append(key)
        times = time_side_by_side(calls, device, reps)
        memory = {key: peak_memory_mib(calls[key], device) for key in names}
        base_variant = case.variants[0].name
        for variant_name, backend in names:
            ms, p20, p80 = times[(variant_name, backend)]
            base = times.get((base_variant, backend), (float("nan"),))[0]
            ref = times.get((variant_name, "reference"), (float("nan"),))[0]
            rows.append(dict(timestamp=stamp, machine=machine, versions=vers, commit=commit, device=device,
                             dtype=dtype_name, case=case.name, layer=case.layer.label(), variant=variant_name,
                             backend=backend, mode=mode, ms=round(ms, 3), p20_ms=round(p20, 3), p80_ms=round(p80, 3),
                             vs_first_variant=round(ms / base, 3), speedup_vs_reference=round(ref / ms, 3),
                             peak_mib=round(memory[(variant_name, backend)], 1), reps=reps))
            table.append([case.name, case.layer.label(), variant_name, backend, mode,
                          f"{ms:.2f} ({p20:.2f}-{p80:.2f})", f"{ms / base:.2f}", f"{ref / ms:.2f}x",
                          f"{memory[(variant_name, backend)]:.1f}"])
    return rows, table


HEADER = ["case", "layer", "variant", "backend", "mode", "ms median (p20-p80)", "time / first variant",
          "vs reference", "peak MiB"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--modes", nargs="+", default=["fwd", "fwd+bwd"], choices=("fwd", "fwd+bwd"))
    ap.add_argument("--only", default=None, help="keep the cases whose name contains this")
    ap.add_argument("--backends", nargs="*", default=None, help="default: every available one but triton on CPU")
    ap.add_argument("--quick", action="store_true", help="the softcap NLU case, fwd, 2 reps (a smoke test)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--no-record", action="store_true")
    args = ap.parse_args()
    cases, reps, modes = CASES, args.reps, args.modes
    if args.only:
        cases = [c for c in cases if args.only.lower() in c.name.lower()]
    if args.quick:
        cases, reps, modes = [c for c in CASES if c.name == "softcap NLU"], 2, ["fwd"]
    backends = args.backends or [b for b in available_backends(args.device)
                                 if args.device.startswith("cuda") or b != "triton"]
    if "reference" not in backends:
        backends.append("reference")
    print(f"{machine_description(args.device)}; {versions()}; commit {git_commit()}; backends {backends}")
    rows, table = measure(cases, backends, args.device, args.dtype, reps, modes)
    print(markdown_table(HEADER, table))
    if args.no_record or not rows:
        return
    out = results_dir(args.out)
    os.makedirs(out, exist_ok=True)
    append_csv(os.path.join(out, "features.csv"), rows)
    name = "cuda" if args.device.startswith("cuda") else "cpu"
    with open(os.path.join(out, f"features_{name}.md"), "w") as f:
        f.write(f"# The op's features: window, softcap, sinks, packing ({name})\n\n{rows[0]['machine']}; "
                f"{rows[0]['versions']}; commit {rows[0]['commit']}; {rows[0]['timestamp']}; {args.dtype}; {reps} "
                "timed calls per method, alternating, median (p20-p80). `time / first variant`: this variant's time "
                "over the case's first variant on the same backend (the cost of the feature); `vs reference`: "
                "the reference's time on the same variant over this one.\n\n")
        f.write(markdown_table(HEADER, table))
    print(f"appended {len(rows)} rows to {out}/features.csv, wrote {out}/features_{name}.md")


if __name__ == "__main__":
    main()
