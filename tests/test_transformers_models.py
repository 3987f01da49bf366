"""Model families: classification heads, padding, positions, encoder-decoder prefixes."""

from __future__ import annotations

import pytest
import torch

import prefix_kernels as pk
from tiny_models import bart, bert, fresh, gpt2, llama, randomize_prefix, roberta, tokens

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


def wrap(model, P=4, **kw):
    return randomize_prefix(pk.get_prefix_model(model, pk.PrefixTuningConfig(num_virtual_tokens=P, **kw)), scale=0.5)


@pytest.mark.parametrize("make,task", [(lambda: llama(task="seq"), "seq"), (lambda: bert("seq"), "seq"),
                                       (lambda: roberta("seq"), "seq"), (lambda: bert("tok"), "tok"),
                                       (lambda: gpt2("tok"), "tok"), (lambda: llama(task="tok"), "tok")])
def test_classification_trains_prefix_and_head(make, task):
    pm = wrap(make())
    ids = tokens(3, 6)
    labels = torch.tensor([0, 1, 1]) if task == "seq" else torch.randint(0, 2, (3, 6))
    out = pm(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels)
    assert out.logits.shape[0] == 3 and torch.isfinite(out.loss)
    out.loss.backward()
    trainable = {n for n, p in pm.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("prefix_encoder.") or any(
        f".{h}." in n for h in ("classifier", "score")) for n in trainable)
    assert any(n.startswith("base_model.") for n in trainable)  # the head
    assert all(p.grad is not None for n, p in pm.named_parameters() if p.requires_grad)
    assert pm.prefix_encoder.embedding.weight.grad.abs().sum() > 0


def _per_row_equal(pm, ids, lengths, side, causal_lm=True):
    B, T = ids.shape
    mask = torch.zeros_like(ids)
    padded = torch.full_like(ids, 0)
    for b, n in enumerate(lengths):
        if side == "left":
            padded[b, T - n:] = ids[b, :n]
            mask[b, T - n:] = 1
        else:
            padded[b, :n] = ids[b, :n]
            mask[b, :n] = 1
    out = pm(input_ids=padded, attention_mask=mask).logits
    for b, n in enumerate(lengths):
        alone = pm(input_ids=ids[b:b + 1, :n]).logits[0]
        got = out[b, T - n:] if side == "left" else out[b, :n]
        if out.ndim == 2:  # sequence classification: one row
            continue
        torch.testing.assert_close(got, alone, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("make", [llama, gpt2, lambda: bert("tok"), lambda: roberta("tok")],
                         ids=["llama", "gpt2", "bert", "roberta"])
def test_padding_gives_unpadded_results(make, side):
    pm = wrap(make())
    _per_row_equal(pm, tokens(3, 7), [7, 4, 2], side)


def test_bart_padding_gives_unpadded_results():
    pm = wrap(bart())
    src, tgt = tokens(2, 6), tokens(2, 5, seed=3)
    mask = torch.ones_like(src)
    mask[1, 4:] = 0
    out = pm(input_ids=src, attention_mask=mask, decoder_input_ids=tgt).logits
    alone = pm(input_ids=src[1:, :4], decoder_input_ids=tgt[1:]).logits
    torch.testing.assert_close(out[1:], alone, rtol=1e-5, atol=1e-5)


def _spy_positions(module):
    seen = []

    def hook(mod, args, kwargs):
        pos = kwargs.get("position_ids", args[1] if len(args) > 1 else None)
        seen.append(pos.clone())

    module.register_forward_pre_hook(hook, with_kwargs=True)
    return seen


@pytest.mark.parametrize("offset", [True, False])
def test_position_offset_rope(offset):
    P, T = 4, 5
    pm = wrap(llama(), P=P, position_offset=offset)
    seen = _spy_positions(pm.base_model.model.rotary_emb)
    pm(input_ids=tokens(2, T))
    expected = torch.arange(T) + (P if offset else 0)
    assert torch.equal(seen[-1].expand(2, -1), expected.expand(2, -1))


@pytest.mark.parametrize("offset", [True, False])
def test_position_offset_absolute(offset):
    P, T = 3, 6
    pm = wrap(gpt2(), P=P, position_offset=offset)
    seen = []
    pm.base_model.transformer.wpe.register_forward_pre_hook(lambda m, a: seen.append(a[0].clone()))
    pm(input_ids=tokens(2, T))
    assert torch.equal(seen[-1].expand(2, -1), (torch.arange(T) + (P if offset else 0)).expand(2, -1))
    # RoBERTa: padding_idx + 1 + i (+ P)
    pm = wrap(roberta(), P=P, position_offset=offset)
    seen = []
    pm.base_model.roberta.embeddings.position_embeddings.register_forward_pre_hook(
        lambda m, a: seen.append(a[0].clone()))
    pm(input_ids=tokens(1, T))
    assert torch.equal(seen[-1][0], torch.arange(T) + 2 + (P if offset else 0))


def test_position_offset_false_matches_no_offset_reference():
    """position_offset=False: real tokens at 0..T-1, i.e. the base model's own positions."""
    P, T = 3, 5
    base = llama()
    on = wrap(fresh(base), P=P, position_offset=True)
    off = wrap(fresh(base), P=P, position_offset=False)
    ids = tokens(2, T)
    shifted = off(input_ids=ids, position_ids=torch.arange(T).unsqueeze(0) + P).logits
    torch.testing.assert_close(on(input_ids=ids).logits, shifted, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(off(input_ids=ids).logits, shifted)


def test_bart_prefixes_every_attention_without_tying():
    pm = wrap(bart(), P=3)
    assert pm.layout.groups == [("encoder", 2), ("decoder", 2), ("cross", 2)]
    names = [n for n, _ in pm.layout.attention_modules]
    assert names[4].endswith("decoder.layers.0.encoder_attn") and names[0].endswith("encoder.layers.0.self_attn")
    out = pm(input_ids=tokens(2, 6), decoder_input_ids=tokens(2, 4, seed=5)).logits
    out.square().sum().backward()
    g = pm.prefix_encoder.embedding.weight.grad.view(3, 6, 2, -1)  # [P, slots, K/V, Hkv*D]
    for slot in range(6):  # every layer of every stack gets its own, non-zero, gradient
        assert g[:, slot].abs().sum() > 0, slot
    # positions shifted by P in encoder and decoder
    assert pm.layout.position_style == "embed_positions"


def test_two_models_do_not_interfere():
    base = llama()
    a, b = wrap(fresh(base), P=3), wrap(fresh(base), P=5)
    randomize_prefix(b, seed=7)
    ids = tokens(2, 5)
    ra, rb = a(input_ids=ids).logits, b(input_ids=ids).logits
    torch.testing.assert_close(a(input_ids=ids).logits, ra)
    assert not torch.allclose(ra, rb)


def test_unload_restores_attention_and_requires_grad():
    base = llama()
    ids = tokens(2, 5)
    expected = base(input_ids=ids).logits
    original = base.config._attn_implementation
    pm = wrap(base)
    assert base.config._attn_implementation == "prefix_kernels"
    model = pm.unload()
    assert model is base and model.config._attn_implementation == original
    assert all(p.requires_grad for p in model.parameters())
    assert not any(hasattr(m, "_prefix_kernels") for m in model.modules())
    torch.testing.assert_close(model(input_ids=ids).logits, expected)
    wrap(model)  # can be wrapped again


def test_ptuning_v2_config_defaults():
    cfg = pk.PTuningV2Config(num_virtual_tokens=8)
    assert cfg.prefix_projection is False and cfg.prefix_dropout == 0.1
    pm = pk.get_prefix_model(bert("seq"), cfg)
    pm.train()
    ids = tokens(2, 5)
    pm(input_ids=ids, labels=torch.tensor([0, 1])).loss.backward()
    assert pm.prefix_encoder.embedding.weight.grad is not None
