"""Determinism: the dropout seed comes from torch's generator (so `torch.manual_seed` repeats a run), and a
prefix-tuned model's training step is bitwise repeatable.

Each backend's own run-after-run bitwise test is test_backends.py::test_two_runs_are_bitwise_equal; the
independence of the C++ kernels from the thread count is in test_cpu_backend.py.
"""

from __future__ import annotations

import pytest
import torch
from attention_cases import Case, in_interpreter, make_inputs, targets

from prefix_kernels.ops import prefix_attention


@pytest.mark.parametrize("backend,device", targets())
def test_dropout_follows_torch_manual_seed(backend, device):
    """prefix_attention draws its dropout seed from torch's generator: the same manual seed gives the same
    output and gradients bit for bit, another seed a different output."""
    case = Case(B=2, Hq=2, Hkv=1, L=5, S=6, P=3, D=16) if in_interpreter(backend, device) else Case(padding=True)
    data = make_inputs(case, torch.float32, device)
    runs = []
    for seed in (7, 7, 8):
        leaves = {n: t.detach().requires_grad_() for n, t in data["tensors"].items()}
        torch.manual_seed(seed)
        out = prefix_attention(**leaves, **data["kwargs"], dropout_p=0.5, backend=backend)
        out.backward(data["grad_out"])
        runs.append((out.detach(), leaves["prefix_k"].grad))
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])
    assert not torch.equal(runs[0][0], runs[2][0])


def test_model_training_step_is_bitwise_repeatable():
    """A prefix-tuned model: loss and prefix gradients of one step, twice, bit for bit (the default backend)."""
    from tiny_models import llama, tokens

    import prefix_kernels as pk

    results = []
    for _ in range(2):
        torch.manual_seed(0)
        pm = pk.get_prefix_model(llama(), pk.PrefixTuningConfig(num_virtual_tokens=4, prefix_projection=True))
        ids = tokens(3, 10)
        mask = torch.ones_like(ids)
        mask[0, :3] = 0
        out = pm(input_ids=ids, attention_mask=mask, labels=ids)
        out.loss.backward()
        results.append([out.loss.detach()] + [p.grad for p in pm.prefix_encoder.parameters()])
    for a, b in zip(*results):
        assert torch.equal(a, b)
