"""The shims for older transformers 5.x releases (prefix_kernels/transformers/compat.py), each exercised here
in the form the older release uses, whatever transformers is installed. `make test-min-transformers` runs the
integration tests against the oldest supported release."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import prefix_kernels as pk
from prefix_kernels.transformers import compat
from prefix_kernels.transformers.attention import PrefixMask, prefix_mask_function
from tiny_models import gpt2, llama, randomize_prefix, tokens

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


def test_mask_function_takes_both_signatures():
    from transformers.masking_utils import bidirectional_mask_function

    mask = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])
    new = prefix_mask_function(batch_size=2, q_length=4, kv_length=4, q_offset=0, kv_offset=0,
                               attention_mask=mask, allow_is_causal_skip=True, dtype=torch.float32, config=None)
    old = prefix_mask_function(batch_size=2, cache_position=torch.arange(4), kv_length=4, kv_offset=0,
                               attention_mask=mask, allow_is_causal_skip=True, dtype=torch.float32, config=None)
    for got in (new, old):
        assert isinstance(got, PrefixMask) and got.causal and got.unsupported is None
        assert torch.equal(got.key_padding_mask, mask.bool())
    bidirectional = prefix_mask_function(batch_size=2, cache_position=torch.arange(4), kv_length=4,
                                         mask_function=bidirectional_mask_function, attention_mask=None)
    assert bidirectional == PrefixMask(None, False)
    with pytest.raises(TypeError, match="q_length .* or cache_position"):
        prefix_mask_function(batch_size=2, kv_length=4)


def test_mask_patterns_the_op_cannot_apply_are_refused_where_used():
    def overlay(batch_idx, head_idx, q_idx, kv_idx):
        return kv_idx <= q_idx

    got = prefix_mask_function(batch_size=1, q_length=3, kv_length=3, mask_function=overlay)
    assert "another mask pattern ('overlay'" in got.unsupported
    assert "key offset" in prefix_mask_function(batch_size=1, q_length=3, kv_length=3, kv_offset=2).unsupported


class _Before523(nn.Module):
    """transformers < 5.23: checkpointing is switched on by gradient_checkpointing_enable only."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs=None, every_n_layers=1):
        self.calls.append((gradient_checkpointing_kwargs, every_n_layers))


def test_enable_activation_checkpointing_before_and_after_5_23():
    old = _Before523()
    compat.enable_activation_checkpointing(old, {"use_reentrant": False}, every_n_layers=2)
    assert old.calls == [({"use_reentrant": False}, 2)]

    model = llama()
    compat.enable_activation_checkpointing(model, {"use_reentrant": False})
    assert model.is_gradient_checkpointing


def test_checkpointed_training_step_through_the_shim_equals_plain():
    def step(checkpointing):
        pm = randomize_prefix(pk.get_prefix_model(llama(), pk.PrefixTuningConfig(num_virtual_tokens=3)))
        if checkpointing:
            compat.enable_activation_checkpointing(pm.base_model, {"use_reentrant": False})
        pm.train()
        ids = tokens(2, 6)
        loss = pm(input_ids=ids, labels=ids).loss
        loss.backward()
        return loss.detach(), [p.grad for p in pm.prefix_encoder.parameters()]

    loss, grads = step(False)
    loss_ckpt, grads_ckpt = step(True)
    torch.testing.assert_close(loss_ckpt, loss)
    for a, b in zip(grads_ckpt, grads):
        torch.testing.assert_close(a, b)


def _positions_module(cache_name):
    """A learned position table whose forward names its cache length `cache_name`."""
    module = nn.Module()
    module.weight = nn.Parameter(torch.zeros(8, 2))
    namespace = {}
    exec(f"def forward(input_ids, {cache_name}=0, position_ids=None):\n    return {cache_name}, position_ids",
         namespace)
    module.forward = namespace["forward"]
    return module


@pytest.mark.parametrize("cache_name", ["cache_length", "past_key_values_length"])
def test_learned_positions_shift_under_either_argument_name(cache_name):
    module = _positions_module(cache_name)
    ids = torch.zeros(2, 3, dtype=torch.long)
    checked = []
    args, kwargs = compat.shift_learned_positions(module, (ids, 4), {}, 5, lambda p, n: checked.append(n))
    assert args == (ids,) and kwargs[cache_name] == 4
    assert kwargs["position_ids"].tolist() == [9, 10, 11] and checked == [3]
    args, kwargs = compat.shift_learned_positions(module, (ids,), {"position_ids": torch.tensor([0, 1, 2])}, 2)
    assert kwargs == {cache_name: 0, "position_ids": kwargs["position_ids"]}
    assert kwargs["position_ids"].tolist() == [2, 3, 4]


def test_learned_positions_with_an_unknown_signature_are_refused():
    module = _positions_module("offset")
    with pytest.raises(TypeError, match="neither cache_length nor past_key_values_length"):
        compat.shift_learned_positions(module, (torch.zeros(1, 2, dtype=torch.long),), {}, 1)


def test_gpt2_scaling_when_the_model_passes_none():
    model = gpt2()
    attention = model.transformer.h[1].attn
    assert compat.module_scaling(attention, 16) == pytest.approx(16 ** -0.5)
    attention.scale_attn_by_inverse_layer_idx = True
    assert compat.module_scaling(attention, 16) == pytest.approx(16 ** -0.5 / 2)
    attention.scale_attn_weights = False
    assert compat.module_scaling(attention, 16) == pytest.approx(0.5)
    assert compat.module_scaling(model.transformer.h[0].mlp, 16) is None
