"""The fused backends never copy the prefix per batch row (DESIGN.md "Memory").

Every aten op run during forward and backward is recorded with a TorchDispatchMode; no tensor it creates may
hold B * Hkv * P * D or more elements (one batch-expanded prefix K). The shapes make P much larger than L and
S, so q, k, v, the output and every gradient stay below that size: only a per-row prefix copy can reach it.
"""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from prefix_kernels import prefix_attention
from prefix_kernels.ops.dispatch import available_backends

B, Hq, Hkv, L, S, P, D = 4, 4, 2, 8, 8, 64, 32
THRESHOLD = B * Hkv * P * D


class AllocationRecorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.created = []  # (op name, shape)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {id(t) for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and id(t) not in inputs and t._base is None:
                self.created.append((str(func), tuple(t.shape), t.numel()))
        return out


def record(backend, device="cpu", **kwargs):
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(B, Hq, L, D, generator=gen).to(device).requires_grad_()
    k = torch.randn(B, Hkv, S, D, generator=gen).to(device).requires_grad_()
    v = torch.randn(B, Hkv, S, D, generator=gen).to(device).requires_grad_()
    pk = torch.randn(Hkv, P, D, generator=gen).to(device).requires_grad_()
    pv = torch.randn(Hkv, P, D, generator=gen).to(device).requires_grad_()
    grad = torch.randn(B, Hq, L, D, generator=gen).to(device)
    with AllocationRecorder() as rec:
        out = prefix_attention(q, k, v, pk, pv, backend=backend, **kwargs)
        out.backward(grad)
    assert pk.grad is not None and pk.grad.abs().sum() > 0
    return rec.created


def large(created):
    return [c for c in created if c[2] >= THRESHOLD]


def test_detector_catches_the_reference_copy():
    """The negative control: the reference (what PEFT does) concatenates a [B, Hkv, P + S, D] copy."""
    big = large(record("reference"))
    assert any(shape == (B, Hkv, P + S, D) for _, shape, _ in big), big


@pytest.mark.parametrize("kwargs", [{}, {"causal": False, "key_padding_mask": torch.ones(B, S, dtype=torch.bool)},
                                    {"dropout_p": 0.2}, {"deterministic": False}],
                         ids=["causal", "padding", "dropout", "atomic"])
@pytest.mark.parametrize("backend", ["triton", "cpu"])
def test_fused_backends_never_copy_the_prefix_per_row(backend, kwargs):
    device = "cuda" if torch.cuda.is_available() and backend == "triton" else "cpu"
    if backend not in available_backends(device):
        pytest.skip(f"backend {backend} is not available on {device}")
    created = record(backend, device, **kwargs)
    assert created, "the recorder saw no allocation at all"
    assert not large(created), large(created)
