"""Every kernel backend gives the reference backend's logits and prefix gradients inside a real model
(a tiny Llama with GQA, RoPE and left padding: q/k/v arrive as transposes of [B, T, H, D])."""

import pytest
import torch
from tiny_models import llama, randomize_prefix, tokens

import prefix_kernels as pk


def logits_and_prefix_grads(backend):
    model = pk.get_prefix_model(llama(), pk.PrefixTuningConfig(num_virtual_tokens=5, backend=backend))
    randomize_prefix(model)
    ids = tokens(2, 11)
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # left padding
    logits = model(input_ids=ids, attention_mask=mask).logits
    (logits * mask[..., None]).square().mean().backward()
    grads = {n: p.grad.clone() for n, p in model.prefix_encoder.named_parameters()}
    return logits.detach(), grads


@pytest.mark.parametrize("backend", ["triton", "cpu"])
def test_backend_matches_reference_in_a_model(backend):
    device = "cpu"
    if backend not in pk.available_backends(device):
        pytest.skip(f"{backend} is not available on {device}")
    want_logits, want_grads = logits_and_prefix_grads("reference")
    logits, grads = logits_and_prefix_grads(backend)
    torch.testing.assert_close(logits, want_logits, atol=2e-5, rtol=2e-5)
    for name in want_grads:
        assert want_grads[name].abs().sum() > 0
        torch.testing.assert_close(grads[name], want_grads[name], atol=2e-5, rtol=2e-5, msg=name)
