"""The fused backends never copy the prefix per batch row (docs/op.md "Memory").

Every allocation made during a forward + backward is recorded by the profiler (`profile_memory=True`): the
allocator reports each block, so this sees the C++ kernels' at::empty and the Triton launch's torch.empty, not
only the Python glue. A per-row prefix copy is `B * Hkv * P * D` elements of the dtype (one batch-expanded
prefix K); the shapes make P much larger than L and S, so q, k, v, the output and their gradients stay well
below it. The only allocations allowed to reach that size are the fp32 partial sums of the deterministic
prefix reduction, whose count does not grow with B: so the same shapes are measured at two batch sizes, and an
allocation of at least a per-row copy at the larger one must also be made, same size, at the smaller one. The
reference backend (expand + cat, what PEFT does) is the negative control: the same detector must catch it.
Run with `-s` for a table of what each backend allocated.
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from attention_cases import in_interpreter, targets
from torch._C._profiler import _EventType
from torch.profiler import ProfilerActivity, profile

from prefix_kernels.ops import prefix_attention

Hq, Hkv, L, S, P, D, T = 2, 1, 8, 8, 64, 32, 3
VARIANTS = {
    "causal": {},
    "padding": {"causal": False, "padding": True},
    "dropout": {"dropout_p": 0.2},
    "atomic": {"deterministic": False},
    "prefix-bank": {"bank": True},
}


def batches(backend: str, device: str) -> tuple[int, int]:
    # The interpreter runs one Python loop per program; its prefix reduction uses at most 3 splits anyway.
    return (2, 4) if in_interpreter(backend, device) else (16, 32)


def allocations(prof) -> list[tuple[int, str]]:
    """(bytes, the ops it was made in, innermost first) of every allocation the profiler saw."""
    found = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        if node.tag == _EventType.Allocation and node.extra_fields.alloc_size > 0:
            path, parent = [], node.parent
            while parent is not None:
                path.append(parent.name)
                parent = parent.parent
            found.append((node.extra_fields.alloc_size, " < ".join(path[:3]) or "(python)"))
        stack.extend(node.children)
    return found


def measure(backend: str, device: str, B: int, dtype: torch.dtype, variant: dict) -> list[tuple[int, str]]:
    gen = torch.Generator().manual_seed(0)

    def leaf(*shape):
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype).requires_grad_()

    prefix_shape = (T, Hkv, P, D) if variant.get("bank") else (Hkv, P, D)
    q, k, v = leaf(B, Hq, L, D), leaf(B, Hkv, S, D), leaf(B, Hkv, S, D)
    pk, pv = leaf(*prefix_shape), leaf(*prefix_shape)
    grad = torch.randn(B, Hq, L, D, generator=gen).to(device=device, dtype=dtype)
    kw = {name: value for name, value in variant.items() if name not in ("bank", "padding")}
    if variant.get("padding"):
        mask = torch.ones(B, S, dtype=torch.bool)
        mask[::2, :3] = False
        kw["key_padding_mask"] = mask.to(device)
    if variant.get("bank"):
        kw["prefix_index"] = (torch.arange(B) % T).to(device)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = prefix_attention(q, k, v, pk, pv, backend=backend, **kw)
        out.backward(grad)
    assert pk.grad is not None and pk.grad.abs().sum() > 0
    return allocations(prof)


def per_row_prefix_bytes(B: int, dtype: torch.dtype) -> int:
    return B * Hkv * P * D * dtype.itemsize


def _cases():
    # The reference, the negative control, in its two ways of copying: expand + cat, and a gather by index.
    return [pytest.param(*p.values, variant, id=f"{p.id}-{variant}", marks=p.marks) for p in targets()
            for variant in VARIANTS if p.values[0] != "reference" or variant in ("causal", "prefix-bank")]


@pytest.mark.parametrize("backend,device,variant", _cases())
def test_prefix_is_never_copied_per_row(backend, device, variant):
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    small, large = batches(backend, device)
    at_small = measure(backend, device, small, dtype, VARIANTS[variant])
    at_large = measure(backend, device, large, dtype, VARIANTS[variant])
    if backend != "reference":  # (whose forward op is a composite: autograd runs its torch ops)
        assert any(f"prefix_kernels::{backend}_bwd" in where for _, where in at_large), (
            "the profiler saw no allocation inside the backward op", at_large)

    threshold = per_row_prefix_bytes(large, dtype)
    # Made at the smaller batch too, same size and same place: does not grow with B.
    independent = Counter(at_small)
    copies, partials = [], []
    for size, where in sorted(at_large, reverse=True):
        if size < threshold:
            break
        if independent[size, where] > 0:
            independent[size, where] -= 1
            partials.append(size)
        else:
            copies.append((size, where))
    # What may reach a per-row copy without growing with B: whole fp32 prefix (banks), the reduction's partials.
    fp32_prefixes = (T if VARIANTS[variant].get("bank") else 1) * Hkv * P * D * 4

    largest_small, largest_large = max(at_small)[0], max(at_large)
    small_ratio = largest_small / per_row_prefix_bytes(small, dtype)
    summary = (f"{backend}-{device} {variant}: largest allocation {small_ratio:.2f} x per-row prefix at B={small}, "
               f"{largest_large[0] / threshold:.2f} x at B={large} "
               f"({largest_large[0]} bytes in {largest_large[1]})")
    summary += f"; B-independent partials: {[f'{s // fp32_prefixes} x fp32 prefixes' for s in partials]}"
    print(f"\n{summary}; per-row copies: {len(copies)}")
    if backend == "reference":
        assert copies, f"the detector missed the reference's expand + cat: {summary}"
    else:
        assert not copies, f"per-row prefix copies {copies}; {summary}"
        assert all(size % fp32_prefixes == 0 for size in partials), summary
