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
