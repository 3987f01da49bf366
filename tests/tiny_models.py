"""Tiny models and helpers shared by the transformers-integration tests (no test here; no downloads)."""

from __future__ import annotations

import copy
import warnings

import torch

warnings.filterwarnings("ignore", category=FutureWarning)

VOCAB = 128


def llama(num_labels=None, task="causal"):
    from transformers import (LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification,
                              LlamaForTokenClassification)

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
                      intermediate_size=128, vocab_size=VOCAB, pad_token_id=0, num_labels=num_labels or 2)
    cls = {"causal": LlamaForCausalLM, "seq": LlamaForSequenceClassification,
           "tok": LlamaForTokenClassification}[task]
    return cls(cfg).eval()


def gpt2(task="causal", n_positions=64):
    from transformers import GPT2Config, GPT2LMHeadModel, GPT2ForTokenClassification

    torch.manual_seed(0)
    cfg = GPT2Config(n_embd=64, n_head=4, n_layer=2, vocab_size=VOCAB, n_positions=n_positions, pad_token_id=0,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, num_labels=3)
    return {"causal": GPT2LMHeadModel, "tok": GPT2ForTokenClassification}[task](cfg).eval()


def bert(task="seq", max_position_embeddings=64):
    from transformers import BertConfig, BertForSequenceClassification, BertForTokenClassification

    torch.manual_seed(0)
    cfg = BertConfig(hidden_size=64, num_attention_heads=4, num_hidden_layers=2, intermediate_size=128,
                     vocab_size=VOCAB, max_position_embeddings=max_position_embeddings, num_labels=3,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, pad_token_id=0)
    return {"seq": BertForSequenceClassification, "tok": BertForTokenClassification}[task](cfg).eval()


def roberta(task="seq"):
    from transformers import RobertaConfig, RobertaForSequenceClassification, RobertaForTokenClassification

    torch.manual_seed(0)
    cfg = RobertaConfig(hidden_size=64, num_attention_heads=4, num_hidden_layers=2, intermediate_size=128,
                        vocab_size=VOCAB, max_position_embeddings=66, num_labels=3, pad_token_id=1,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return {"seq": RobertaForSequenceClassification, "tok": RobertaForTokenClassification}[task](cfg).eval()


def bart():
    from transformers import BartConfig, BartForConditionalGeneration

    torch.manual_seed(0)
    cfg = BartConfig(d_model=64, encoder_attention_heads=4, decoder_attention_heads=4, encoder_layers=2,
                     decoder_layers=2, encoder_ffn_dim=128, decoder_ffn_dim=128, vocab_size=VOCAB,
                     max_position_embeddings=64, dropout=0.0, attention_dropout=0.0, pad_token_id=1,
                     bos_token_id=0, eos_token_id=2, decoder_start_token_id=2, forced_eos_token_id=None)
    return BartForConditionalGeneration(cfg).eval()


def randomize_prefix(pm, seed=1, scale=1.0):
    """Give the prefix non-trivial values (random init is N(0,1); make it reproducible)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in pm.prefix_encoder.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * scale)
    return pm


def tokens(B, T, seed=0, low=3):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(low, VOCAB, (B, T), generator=g)


def left_padded(lengths, T, seed=0):
    """Token ids [len(lengths), T] with row b's first T - lengths[b] tokens padding, and the attention mask."""
    ids = tokens(len(lengths), T, seed=seed)
    mask = torch.ones_like(ids)
    for b, n in enumerate(lengths):
        ids[b, : T - n] = 0
        mask[b, : T - n] = 0
    return ids, mask


def recompute_greedy(pm, ids, mask, steps):
    """Greedy decoding without a cache: the whole sequence is run again for every new token."""
    for _ in range(steps):
        logits = pm(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, -1]
        nxt = logits.argmax(-1, keepdim=True)
        ids = torch.cat([ids, nxt], dim=1)
        mask = torch.cat([mask, torch.ones_like(nxt)], dim=1)
    return ids


def assert_same_prefix_grads(ours, theirs):
    """Our prefix encoder's gradients equal those of PEFT's prompt encoder, parameter by parameter (same names)."""
    theirs_params = dict(theirs.prompt_encoder["default"].named_parameters())
    for name, p in ours.prefix_encoder.named_parameters():
        q = theirs_params[name]
        assert p.grad is not None and q.grad is not None, name
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-5 * q.grad.abs().max().item())


def fresh(model):
    return copy.deepcopy(model)


def bert_mlm():
    """A masked LM for P-Tuning v1 (no dropout, so that runs compare exactly)."""
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(0)
    cfg = BertConfig(hidden_size=32, num_attention_heads=2, num_hidden_layers=2, intermediate_size=64,
                     vocab_size=VOCAB, max_position_embeddings=64, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0, pad_token_id=0)
    return BertForMaskedLM(cfg).eval()


# ---- families with sliding windows, soft-capping and sinks (tests/test_transformers_features.py) --------------
# Small vocabularies and widths; GQA (4 query heads, 2 KV heads) everywhere; no dropout.

def mistral(sliding_window=None, num_hidden_layers=2):
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    cfg = MistralConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=num_hidden_layers,
                        num_attention_heads=4, num_key_value_heads=2, sliding_window=sliding_window, pad_token_id=0)
    return MistralForCausalLM(cfg).eval()


def phi3(sliding_window=None):
    from transformers import Phi3Config, Phi3ForCausalLM

    torch.manual_seed(0)
    cfg = Phi3Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, sliding_window=sliding_window, pad_token_id=0,
                     bos_token_id=1, eos_token_id=2, resid_pdrop=0.0, embd_pdrop=0.0, attention_dropout=0.0,
                     max_position_embeddings=4096, original_max_position_embeddings=4096)
    return Phi3ForCausalLM(cfg).eval()


def qwen2(sliding_window=4096, use_sliding_window=True, max_window_layers=1, num_hidden_layers=2, layer_types=None):
    """Qwen2 with `use_sliding_window`: layers from `max_window_layers` on slide (or explicit `layer_types`)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    kw = {} if layer_types is None else dict(layer_types=layer_types)
    cfg = Qwen2Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=num_hidden_layers,
                      num_attention_heads=4, num_key_value_heads=2, sliding_window=sliding_window,
                      use_sliding_window=use_sliding_window, max_window_layers=max_window_layers, pad_token_id=0, **kw)
    return Qwen2ForCausalLM(cfg).eval()


def gemma2(sliding_window=4096, attn_logit_softcapping=50.0, final_logit_softcapping=30.0):
    """Gemma 2: layers alternate sliding and full attention, scores soft-capped (`softcap` per call)."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    cfg = Gemma2Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=sliding_window,
                       attn_logit_softcapping=attn_logit_softcapping, final_logit_softcapping=final_logit_softcapping,
                       query_pre_attn_scalar=16, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return Gemma2ForCausalLM(cfg).eval()


def gemma3(sliding_window=4096, layer_types=("sliding_attention", "full_attention")):
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    cfg = Gemma3TextConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=len(layer_types),
                           num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=sliding_window,
                           layer_types=list(layer_types), query_pre_attn_scalar=16, pad_token_id=0, bos_token_id=1,
                           eos_token_id=2)
    return Gemma3ForCausalLM(cfg).eval()


def gpt_oss(sliding_window=128):
    """GPT-OSS: attention sinks (`s_aux`) on every layer, sliding and full layers alternating; a tiny MoE."""
    from transformers import GptOssConfig, GptOssForCausalLM

    torch.manual_seed(0)
    cfg = GptOssConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=2,
                       num_experts_per_tok=1, sliding_window=sliding_window, pad_token_id=0, bos_token_id=1,
                       eos_token_id=2, layer_types=["sliding_attention", "full_attention"])
    model = GptOssForCausalLM(cfg).eval()
    with torch.no_grad():  # the init leaves the sinks near 0; make them matter
        for layer in model.model.layers:
            layer.self_attn.sinks.normal_(0.0, 1.0)
    return model
