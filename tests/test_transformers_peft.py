"""Equivalence with Hugging Face PEFT prefix tuning, and PEFT's adapter format both ways."""

from __future__ import annotations

import json

import pytest
import torch

import prefix_kernels as pk
from tiny_models import assert_same_prefix_grads, fresh, gpt2, llama, randomize_prefix, tokens

peft = pytest.importorskip("peft")
_TRANSFORMERS = tuple(int(x) for x in __import__("transformers").__version__.split(".")[:2])


def _peft_model(base, P, projection, hidden=32):
    cfg = peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P, prefix_projection=projection,
                                  encoder_hidden_size=hidden)
    return peft.get_peft_model(fresh(base), cfg)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("projection", [False, True])
def test_logits_and_prefix_grads_match_peft(family, projection):
    base = llama() if family == "llama" else gpt2()  # llama: GQA (4 query heads, 2 KV heads) + RoPE
    P = 5
    ours = pk.get_prefix_model(fresh(base), pk.PrefixTuningConfig(num_virtual_tokens=P, prefix_projection=projection,
                                                                  encoder_hidden_size=32))
    randomize_prefix(ours, scale=0.5)
    theirs = _peft_model(base, P, projection)
    missing, unexpected = theirs.prompt_encoder["default"].load_state_dict(ours.prefix_encoder.state_dict(),
                                                                           strict=False)
    assert not missing and not unexpected
    ids = tokens(3, 7)
    a = ours(input_ids=ids).logits
    b = theirs(input_ids=ids).logits
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    target = torch.randn_like(a)
    (a * target).sum().backward()
    (b * target).sum().backward()
    assert_same_prefix_grads(ours, theirs)
    # the base model is frozen in both
    assert all(not p.requires_grad for p in ours.base_model.parameters())


def test_right_padded_batch_matches_peft():
    base = llama()
    ours = randomize_prefix(pk.get_prefix_model(fresh(base), pk.PrefixTuningConfig(num_virtual_tokens=4)), scale=0.5)
    theirs = _peft_model(base, 4, False)
    theirs.prompt_encoder["default"].load_state_dict(ours.prefix_encoder.state_dict())
    ids = tokens(2, 6)
    mask = torch.ones_like(ids)
    mask[1, 4:] = 0
    a = ours(input_ids=ids, attention_mask=mask).logits
    b = theirs(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(a[0], b[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(a[1, :4], b[1, :4], rtol=1e-5, atol=1e-5)


def test_save_pretrained_writes_peft_format_and_peft_loads_it(tmp_path):
    base = llama()
    P = 3
    ours = randomize_prefix(pk.get_prefix_model(fresh(base), pk.PrefixTuningConfig(
        num_virtual_tokens=P, prefix_projection=True, encoder_hidden_size=16)), scale=0.5)
    ours.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "PREFIX_TUNING" and cfg["num_layers"] == 2
    assert cfg["num_attention_heads"] == 2 and cfg["token_dim"] == 2 * 16  # Hkv * head_dim (GQA)
    from safetensors.torch import load_file

    w = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert set(w) == {"prompt_embeddings"}
    L, H, D = 2, 2, 16
    assert w["prompt_embeddings"].shape == (P, L * 2 * H * D)
    # PEFT's column order ((layer*2 + {K,V}) * Hkv + head) * D + d: layer 1 values of KV head 1, prefix token 2
    kv = ours.prefix_encoder().detach()
    col = ((1 * 2 + 1) * H + 1) * D
    torch.testing.assert_close(w["prompt_embeddings"][2, col:col + D], kv[1, 1, 1, 2])

    ids = tokens(2, 6)
    expected = ours(input_ids=ids).logits
    loaded = peft.PeftModel.from_pretrained(fresh(base), str(tmp_path))
    torch.testing.assert_close(loaded(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-5)


def test_peft_adapter_loads_with_identical_logits(tmp_path):
    base = llama()
    theirs = _peft_model(base, 4, True)
    with torch.no_grad():
        for p in theirs.prompt_encoder["default"].parameters():
            p.normal_(0, 0.5)
    theirs.eval()
    ids = tokens(2, 6)
    expected = theirs(input_ids=ids).logits
    theirs.save_pretrained(str(tmp_path))
    ours = pk.PrefixModel.from_pretrained(fresh(base), tmp_path)
    torch.testing.assert_close(ours(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-5)
    assert not any(p.requires_grad for p in ours.parameters())
    trainable = pk.PrefixModel.from_pretrained(fresh(base), tmp_path, is_trainable=True)
    assert all(p.requires_grad for p in trainable.prefix_encoder.parameters())


def _greedy(model, ids, mask, new=5):
    with torch.no_grad():
        return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                              do_sample=False, pad_token_id=0)[:, ids.shape[1]:]


@pytest.mark.skipif(_TRANSFORMERS < (5, 24), reason="the behaviour checked is transformers 5.24's: on 5.0-5.22 "
                    "PEFT 0.21's generate does use the prefix")
def test_peft_generate_ignores_the_prefix_and_ours_does_not():
    """What the README says of PEFT with this transformers: its forward uses the prefix (equal to ours), its
    `generate` does not (the same tokens for any prefix value). If PEFT fixes this, this test fails and the
    README's comparison must change."""
    base = llama()
    ids = tokens(3, 7)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding, as for batched generation
    outputs = {}
    for seed in (1, 2):
        ours = randomize_prefix(pk.get_prefix_model(fresh(base), pk.PrefixTuningConfig(num_virtual_tokens=4)),
                                seed=seed, scale=3.0).eval()
        theirs = _peft_model(base, 4, False).eval()
        theirs.prompt_encoder["default"].load_state_dict(ours.prefix_encoder.state_dict())
        with torch.no_grad():  # PEFT's forward (unpadded rows) sees the prefix exactly as ours does
            torch.testing.assert_close(theirs(input_ids=ids[[0, 2]]).logits, ours(input_ids=ids[[0, 2]]).logits,
                                       rtol=1e-5, atol=1e-5)
        outputs[seed] = (_greedy(ours, ids, mask), _greedy(theirs, ids, mask))
    assert not torch.equal(outputs[1][0], outputs[2][0])  # ours follows the prefix
    assert torch.equal(outputs[1][1], outputs[2][1])  # PEFT's generate does not
    plain = _greedy(fresh(base).eval(), ids, mask)
    assert torch.equal(outputs[1][1][[0, 2]], plain[[0, 2]])  # unpadded rows: exactly the base model's tokens
