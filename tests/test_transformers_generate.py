"""generate(): greedy equals full recompute (batched, left padding), the cache holds real tokens only."""

from __future__ import annotations

import pytest
import torch

import prefix_kernels as pk
from tiny_models import bart, gpt2, left_padded, llama, randomize_prefix, recompute_greedy, tokens

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")

NEW = 5


def wrap(model, P=4):
    return randomize_prefix(pk.get_prefix_model(model, pk.PrefixTuningConfig(num_virtual_tokens=P)), scale=0.5)


@pytest.mark.parametrize("make", [llama, gpt2], ids=["llama", "gpt2"])
def test_greedy_generate_equals_recompute_with_left_padding(make):
    pm = wrap(make())
    ids, mask = left_padded([6, 3, 1], 6)
    out = pm.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False, pad_token_id=0,
                      return_dict_in_generate=True)
    expected = recompute_greedy(pm, ids, mask, NEW)
    assert torch.equal(out.sequences, expected)
    # The KV cache holds the real (and pad) tokens only, never the P prefix tokens.
    cache = out.past_key_values
    assert cache.get_seq_length() == ids.shape[1] + NEW - 1
    assert cache.layers[0].keys.shape[2] == ids.shape[1] + NEW - 1


def test_generate_uses_the_prefix():
    base = llama()
    pm = wrap(base)
    ids = tokens(2, 4)
    with_prefix = pm.generate(input_ids=ids, max_new_tokens=NEW, do_sample=False, pad_token_id=0)
    assert torch.equal(with_prefix, recompute_greedy(pm, ids, torch.ones_like(ids), NEW))
    plain = pm.unload().generate(input_ids=ids, max_new_tokens=NEW, do_sample=False, pad_token_id=0)
    assert not torch.equal(with_prefix, plain)


def test_sampling_works():
    pm = wrap(llama())
    ids, mask = left_padded([4, 2], 4)
    torch.manual_seed(0)
    out = pm.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW, do_sample=True, top_k=20,
                      temperature=0.8, pad_token_id=0)
    assert out.shape == (2, 4 + NEW) and int(out.max()) < 128


def test_bart_generate_equals_recompute():
    pm = wrap(bart(), P=3)
    src = tokens(2, 6)
    mask = torch.ones_like(src)
    mask[1, 4:] = 0
    out = pm.generate(input_ids=src, attention_mask=mask, max_new_tokens=NEW, do_sample=False, num_beams=1,
                      eos_token_id=None, forced_eos_token_id=None)
    dec = torch.full((2, 1), pm.config.decoder_start_token_id)
    for _ in range(out.shape[1] - 1):
        logits = pm(input_ids=src, attention_mask=mask, decoder_input_ids=dec, use_cache=False).logits[:, -1]
        dec = torch.cat([dec, logits.argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, dec)
