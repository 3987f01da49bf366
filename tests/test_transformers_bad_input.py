"""Bad input: clear errors naming expected and got, raised before the model is modified."""

from __future__ import annotations

import pytest
import torch

import prefix_kernels as pk
from tiny_models import bert, gpt2, llama, randomize_prefix, tokens

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


def assert_untouched(model, attn):
    assert model.config._attn_implementation == attn
    assert all(p.requires_grad for p in model.parameters())
    assert not model._forward_pre_hooks and not model._forward_hooks
    assert not any(hasattr(m, "_prefix_kernels") for m in model.modules())


@pytest.mark.parametrize("kwargs,error,words", [
    (dict(num_virtual_tokens=0), ValueError, ">= 1, got 0"),
    (dict(num_virtual_tokens=-3), ValueError, "got -3"),
    (dict(num_virtual_tokens=2.5), TypeError, "int, got float"),
    (dict(num_virtual_tokens="8"), TypeError, "int, got str"),
    (dict(num_virtual_tokens=4, prefix_dropout=1.0), ValueError, "[0, 1), got 1.0"),
    (dict(num_virtual_tokens=4, init="xavier"), ValueError, "got 'xavier'"),
    (dict(num_virtual_tokens=4, encoder_hidden_size=0), ValueError, "encoder_hidden_size must be >= 1, got 0"),
    (dict(num_virtual_tokens=4, prefix_projection="yes"), TypeError, "prefix_projection must be a bool"),
    (dict(num_virtual_tokens=4, backend="tpu"), ValueError, "got 'tpu'"),
    (dict(num_virtual_tokens=4, modules_to_save="classifier"), TypeError, "modules_to_save"),
])
def test_impossible_config_values(kwargs, error, words):
    with pytest.raises(error) as e:
        pk.PrefixTuningConfig(**kwargs)
    assert words in str(e.value)


def test_adapter_for_another_model(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    src = pk.get_prefix_model(llama(), pk.PrefixTuningConfig(num_virtual_tokens=3))
    src.save_pretrained(tmp_path)
    cases = {
        "num_layers expected 3, got 2": dict(num_hidden_layers=3),
        "num_attention_heads (KV heads) expected 4, got 2": dict(num_key_value_heads=4),
        "token_dim (KV heads 2 x head dim 8) expected 16, got 32": dict(hidden_size=32),
    }
    for words, change in cases.items():
        kw = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
                  intermediate_size=128, vocab_size=128)
        kw.update(change)
        other = LlamaForCausalLM(LlamaConfig(**kw))
        attn = other.config._attn_implementation
        with pytest.raises(ValueError) as e:
            pk.PrefixModel.from_pretrained(other, tmp_path)
        assert words in str(e.value), str(e.value)
        assert_untouched(other, attn)


def test_adapter_with_wrong_tensor_shape(tmp_path):
    from safetensors.torch import save_file

    src = pk.get_prefix_model(llama(), pk.PrefixTuningConfig(num_virtual_tokens=3))
    src.save_pretrained(tmp_path, training_state=False)
    save_file({"prompt_embeddings": torch.zeros(3, 100)}, str(tmp_path / "adapter_model.safetensors"))
    model = llama()
    with pytest.raises(ValueError, match=r"expected \(3, 128\), got \(3, 100\)"):
        pk.PrefixModel.from_pretrained(model, tmp_path)
    assert_untouched(model, model.config._attn_implementation)


def test_unsupported_families_list_what_is_supported():
    from transformers import BloomConfig, BloomForCausalLM, T5Config, T5ForConditionalGeneration

    bloom = BloomForCausalLM(BloomConfig(hidden_size=32, n_head=4, n_layer=2, vocab_size=64))
    attn = bloom.config._attn_implementation
    with pytest.raises(ValueError) as e:
        pk.get_prefix_model(bloom, pk.PrefixTuningConfig(num_virtual_tokens=2))
    assert "bloom" in str(e.value) and "Llama, GPT-2, BERT, RoBERTa, BART" in str(e.value)
    assert_untouched(bloom, attn)
    t5 = T5ForConditionalGeneration(T5Config(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, vocab_size=64))
    with pytest.raises(ValueError, match="position bias"):
        pk.get_prefix_model(t5, pk.PrefixTuningConfig(num_virtual_tokens=2))
    with pytest.raises(TypeError, match="PreTrainedModel, got Linear"):
        pk.get_prefix_model(torch.nn.Linear(2, 2), pk.PrefixTuningConfig(num_virtual_tokens=2))
    with pytest.raises(TypeError, match="PrefixTuningConfig"):
        pk.get_prefix_model(llama(), {"num_virtual_tokens": 2})


def test_prefix_plus_tokens_beyond_absolute_positions():
    pm = pk.get_prefix_model(gpt2(n_positions=16), pk.PrefixTuningConfig(num_virtual_tokens=10))
    pm(input_ids=tokens(1, 6))  # 10 + 6 = 16 fits
    with pytest.raises(ValueError, match="16 absolute positions.*position 16.*at most 6 tokens"):
        pm(input_ids=tokens(1, 7))
    pm = pk.get_prefix_model(bert("seq", max_position_embeddings=16), pk.PrefixTuningConfig(num_virtual_tokens=12))
    with pytest.raises(ValueError, match="16 absolute positions"):
        pm(input_ids=tokens(1, 5))
    # P alone beyond the table: refused when wrapping, model untouched
    model = gpt2(n_positions=16)
    with pytest.raises(ValueError, match="below the model's 16 absolute positions.*got 16"):
        pk.get_prefix_model(model, pk.PrefixTuningConfig(num_virtual_tokens=16))
    assert_untouched(model, model.config._attn_implementation)
    # without the offset, P does not use positions
    pm = pk.get_prefix_model(gpt2(n_positions=16), pk.PrefixTuningConfig(num_virtual_tokens=16,
                                                                         position_offset=False))
    pm(input_ids=tokens(1, 16))


def test_bad_modules_to_save_and_double_wrap():
    model = llama()
    attn = model.config._attn_implementation
    with pytest.raises(ValueError, match="'head'"):
        pk.get_prefix_model(model, pk.PrefixTuningConfig(num_virtual_tokens=2, modules_to_save=["head"]))
    assert_untouched(model, attn)
    pk.get_prefix_model(model, pk.PrefixTuningConfig(num_virtual_tokens=2))
    with pytest.raises(ValueError, match="already wrapped"):
        pk.get_prefix_model(model, pk.PrefixTuningConfig(num_virtual_tokens=2))


def test_four_d_mask_is_refused():
    pm = pk.get_prefix_model(llama(), pk.PrefixTuningConfig(num_virtual_tokens=2))
    ids = tokens(1, 4)
    with pytest.raises(TypeError, match="2D attention_mask"):
        pm(input_ids=ids, attention_mask=torch.ones(1, 1, 4, 4, dtype=torch.bool))


# ---- more rows of docs/bad_input.md ---------------------------------------------------------------------------

@pytest.mark.parametrize("cls,kwargs,error,words", [
    (pk.PTuningV2Config, dict(num_virtual_tokens=4, prefix_dropout=-0.1), ValueError, "[0, 1), got -0.1"),
    (pk.PTuningV2Config, dict(num_virtual_tokens=True), TypeError, "int, got bool"),
    (pk.PrefixTuningConfig, dict(num_virtual_tokens=4, position_offset=1), TypeError, "position_offset must be a bool"),
    (pk.PrefixTuningConfig, dict(num_virtual_tokens=4, encoder_hidden_size=1.5), TypeError, "encoder_hidden_size"),
    (pk.PrefixTuningConfig, dict(num_virtual_tokens=4, prefix_dropout="0.1"), TypeError,
     "prefix_dropout must be a float"),
    (pk.PrefixTuningConfig, dict(num_virtual_tokens=4, modules_to_save=[1]), TypeError, "modules_to_save"),
])
def test_more_impossible_config_values(cls, kwargs, error, words):
    with pytest.raises(error) as e:
        cls(**kwargs)
    assert words in str(e.value)


def test_config_changed_after_construction_is_checked_when_applied():
    cfg = pk.PrefixTuningConfig(num_virtual_tokens=4)
    cfg.num_virtual_tokens = 0
    model = llama()
    with pytest.raises(ValueError, match=">= 1, got 0"):
        pk.get_prefix_model(model, cfg)
    assert_untouched(model, model.config._attn_implementation)


def test_backend_that_cannot_run_the_model():
    model = llama()
    attn = model.config._attn_implementation
    with pytest.raises(ValueError, match="backend 'cuda' cannot run this model.*cuda tensors"):
        pk.get_prefix_model(model, pk.PrefixTuningConfig(num_virtual_tokens=2, backend="cuda"))
    assert_untouched(model, attn)


def test_adapter_loading_bad_arguments(tmp_path):
    model = llama()
    attn = model.config._attn_implementation
    with pytest.raises(FileNotFoundError, match="must hold adapter_config.json and adapter_model.safetensors"):
        pk.PrefixModel.from_pretrained(model, tmp_path / "missing")
    src = pk.get_prefix_model(llama(), pk.PrefixTuningConfig(num_virtual_tokens=3))
    src.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="backend must be one of"):
        pk.PrefixModel.from_pretrained(model, tmp_path, backend="tpu")
    with pytest.raises(ValueError, match="backend 'cuda' cannot run this model"):
        pk.PrefixModel.from_pretrained(model, tmp_path, backend="cuda")
    assert_untouched(model, attn)


def test_malformed_model_inputs_raise_and_leave_the_model_usable():
    """Inputs the base model itself refuses raise the base model's error (no crash, no fault), and the wrapped
    model keeps working afterwards."""
    pm = pk.get_prefix_model(llama(), pk.PrefixTuningConfig(num_virtual_tokens=2))
    ids = tokens(2, 5)
    with pytest.raises(ValueError, match=r"expected batch 2, got attention_mask of shape \(3, 5\)"):
        pm(input_ids=ids, attention_mask=torch.ones(3, 5))  # mask batch != input batch
    with pytest.raises(RuntimeError, match="indices"):
        pm(input_ids=ids.float())
    with pytest.raises(IndexError, match="index out of range"):
        pm(input_ids=ids + 1000)
    with pytest.raises(RuntimeError):
        pm(input_ids=tokens(2, 0))  # no tokens
    assert torch.isfinite(pm(input_ids=ids).logits).all()
    assert pm._state.depth == 0  # the per-step state was released by every failed call


def test_nan_in_inputs_propagates_like_the_base_model():
    """A NaN in one row's embeddings gives NaN logits in that row only, exactly where the unwrapped model
    (with its own attention) gives them; no crash."""
    base = llama()
    pm = pk.get_prefix_model(llama(), pk.PrefixTuningConfig(num_virtual_tokens=2, init="zero",
                                                            position_offset=False))
    ids = tokens(2, 5)
    emb = base.get_input_embeddings()(ids).detach()
    emb[0, 1, 3] = float("nan")
    mask = torch.ones(2, 5, dtype=torch.long)
    with torch.no_grad():
        got = pm(inputs_embeds=emb, attention_mask=mask).logits
        want = base(inputs_embeds=emb, attention_mask=mask).logits
    assert torch.isnan(got[0]).any() and not torch.isnan(got[1]).any()
    assert torch.equal(torch.isnan(got), torch.isnan(want))


def test_static_caches_are_refused_with_a_message():
    from transformers import StaticCache

    model = pk.get_prefix_model(llama(), pk.PrefixTuningConfig(num_virtual_tokens=3))
    ids = tokens(2, 5)
    with pytest.raises(NotImplementedError, match="dynamic caches only.*cache_implementation='static'"):
        model.generate(input_ids=ids, max_new_tokens=2, cache_implementation="static")
    with pytest.raises(NotImplementedError, match="dynamic caches only.*StaticCache"):
        model(input_ids=ids, past_key_values=StaticCache(config=model.config, max_cache_len=16))
    assert model.generate(input_ids=ids, max_new_tokens=2, do_sample=False).shape == (2, 7)


# ---------------------------------------------------------------------------------------------- refused at wrap time
def _m2m100():
    from transformers import M2M100Config, M2M100ForConditionalGeneration

    torch.manual_seed(0)
    return M2M100ForConditionalGeneration(M2M100Config(
        vocab_size=64, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64,
        pad_token_id=1, dropout=0.0, attention_dropout=0.0)).eval()


def test_sinusoidal_positions_refuse_the_position_offset():
    from prefix_kernels.transformers import check_position_offset, detect

    model = _m2m100()
    layout = detect(model)
    assert "M2M100SinusoidalPositionalEmbedding" in layout.unshiftable_positions
    with pytest.raises(ValueError, match="position_offset=True .* m2m_100 has sinusoidal positions"):
        check_position_offset(layout, True)
    check_position_offset(layout, False)
    pm = pk.get_prefix_model(model, pk.PrefixTuningConfig(num_virtual_tokens=2, position_offset=False))
    ids = tokens(2, 5, low=3) % 60 + 3
    pm(input_ids=ids, attention_mask=torch.ones_like(ids), decoder_input_ids=ids)


def test_different_key_and_value_head_sizes_are_refused():
    transformers = pytest.importorskip("transformers")
    if not hasattr(transformers, "DeepseekV3Config"):
        pytest.skip("DeepSeek-V3 is not in this transformers")
    cfg = transformers.DeepseekV3Config(
        vocab_size=64, hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=4, n_routed_experts=4, num_experts_per_tok=2, n_group=1,
        topk_group=1, first_k_dense_replace=1, q_lora_rank=16, kv_lora_rank=16, qk_rope_head_dim=8,
        qk_nope_head_dim=8, v_head_dim=12, pad_token_id=0)
    model = transformers.DeepseekV3ForCausalLM(cfg)
    attn = model.config._attn_implementation
    with pytest.raises(ValueError, match="different key and value head sizes .*qk_head_dim 16, v_head_dim 12"):
        pk.get_prefix_model(model, pk.PrefixTuningConfig(num_virtual_tokens=2))
    assert_untouched(model, attn)


@pytest.mark.parametrize("name,value,words", [
    ("some_new_feature", torch.zeros(1), "'some_new_feature'"),
    ("some_new_flag", None, "'some_new_flag'"),
    ("position_bias", torch.zeros(1, 4, 2, 2), "additive position bias (position_bias=tensor of shape (1, 4, 2, 2))"),
    ("cu_seq_lens_q", torch.zeros(3), "packed (varlen) sequences"),
    ("seq_idx", torch.zeros(1, 3), "packed (varlen) sequences"),
])
def test_attention_keywords_outside_the_allowlist_are_refused(name, value, words):
    from prefix_kernels.transformers.attention import check_attention_kwargs

    with pytest.raises(NotImplementedError) as e:
        check_attention_kwargs({name: value})
    assert words in str(e.value)
    # the window, soft-capping and sinks are honoured per call; the packing keywords when the forward is packed
    check_attention_kwargs(dict(position_ids=None, cache_position=None, is_causal=True, output_attentions=False,
                                use_cache=True, sliding_window=4, softcap=30.0, s_aux=torch.zeros(4)))
    check_attention_kwargs(dict(cu_seq_lens_q=torch.zeros(3), max_length_q=2, seq_idx=torch.zeros(1, 3)), packed=True)


def test_mask_patterns_the_op_cannot_apply_are_refused_by_name():
    """The mask function transformers composes is read by its structure: causal or bidirectional, the causal
    sliding window and packed sequences are applied; anything else is named and refused by the layers using it."""
    from transformers import masking_utils as mu

    from prefix_kernels.transformers.attention import MaskPattern, mask_pattern, prefix_mask_function

    assert mask_pattern(mu.causal_mask_function) == MaskPattern(True)
    assert mask_pattern(mu.bidirectional_mask_function) == MaskPattern(False)
    assert mask_pattern(mu.sliding_window_causal_mask_function(7)) == MaskPattern(True, 7)
    packed = mu.and_masks(mu.sliding_window_causal_mask_function(5),
                          mu.packed_sequence_mask_function(torch.zeros(1, 4)))
    assert mask_pattern(packed) == MaskPattern(True, 5, True)
    refused = {
        "chunked attention": mu.chunked_causal_mask_function(4, torch.zeros(1, dtype=torch.long)),
        "a union of mask patterns": mu.or_masks(mu.causal_mask_function, lambda *a: torch.tensor(True)),
        "another mask pattern": lambda b, h, q, kv: q >= kv,
    }
    if hasattr(mu, "sliding_window_bidirectional_overlay"):  # ModernBERT's, from transformers 5.x (not 5.0)
        refused[r"bidirectional \(symmetric\) sliding-window attention"] = mu.and_masks(
            mu.bidirectional_mask_function, mu.sliding_window_bidirectional_overlay(3))
    for words, fn in refused.items():
        mask = prefix_mask_function(1, q_length=4, kv_length=4, q_offset=0, mask_function=fn)
        assert mask.unsupported is not None and __import__("re").search(words, mask.unsupported), mask.unsupported
    # a sliding cache dropped the oldest keys: the key padding is the slice of the mask for the keys kept
    attention_mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1]])
    mask = prefix_mask_function(1, q_length=1, kv_length=4, q_offset=7, kv_offset=4, attention_mask=attention_mask,
                                mask_function=mu.sliding_window_causal_mask_function(4))
    assert mask.unsupported is None and mask.window == 4 and mask.key_padding_mask.tolist() == [[True] * 4]
    mask = prefix_mask_function(1, q_length=1, kv_length=4, q_offset=2, kv_offset=4, attention_mask=attention_mask)
    assert "aligns the queries with the end of the keys" in mask.unsupported


def test_a_window_the_mask_and_the_keyword_disagree_on_is_refused():
    from prefix_kernels.transformers.attention import PrefixMask, attention_features

    assert attention_features({"sliding_window": 4}, PrefixMask(None, True, window=4), True, 10) == (4, None, None)
    assert attention_features({"sliding_window": 4}, PrefixMask(None, True, window=4), True, 4) == (None, None, None)
    with pytest.raises(NotImplementedError, match="sliding_window=4 but its mask has no window"):
        attention_features({"sliding_window": 4}, PrefixMask(None, True), True, 10)
    with pytest.raises(NotImplementedError, match="bidirectional sliding-window"):
        attention_features({"sliding_window": 4}, None, False, 10)


def test_unknown_attention_keyword_in_a_model_is_refused_by_name():
    pm = pk.get_prefix_model(llama(), pk.PrefixTuningConfig(num_virtual_tokens=2))
    module = pm.layout.attention_modules[0][1]
    original = module.forward

    def forward(*args, **kwargs):
        return original(*args, some_new_feature=1, **kwargs)

    module.forward = forward
    with pytest.raises(NotImplementedError, match="'some_new_feature'"):
        pm(input_ids=tokens(1, 4))


def _llava():
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    torch.manual_seed(0)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                              image_size=16, patch_size=8)
    text = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                       vocab_size=64, pad_token_id=0)
    return LlavaForConditionalGeneration(LlavaConfig(vision_config=vision, text_config=text,
                                                     image_token_index=63)).eval()


def test_vision_language_model_binds_the_language_model_only():
    from prefix_kernels.transformers import detect
    from prefix_kernels.transformers.families import current_attn_implementation

    model = _llava()
    model.config.vision_config._attn_implementation = "eager"
    original = current_attn_implementation(model)
    layout = detect(model)
    assert layout.groups == [("self", 2)]
    assert all(name.startswith("model.language_model.") for name, _ in layout.attention_modules)
    assert layout.attn_implementation == {"text_config": "prefix_kernels"}
    # what the wrapper does with it: the vision tower keeps its attention
    model.set_attn_implementation(layout.attn_implementation)
    assert model.config.text_config._attn_implementation == "prefix_kernels"
    assert model.config.vision_config._attn_implementation == "eager"
    model.set_attn_implementation(original)
    assert current_attn_implementation(model) == original
    assert model.config.text_config._attn_implementation != "prefix_kernels"


def _modernbert(global_every=1):
    from transformers import ModernBertConfig, ModernBertForSequenceClassification

    torch.manual_seed(0)
    return ModernBertForSequenceClassification(ModernBertConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        pad_token_id=0, bos_token_id=1, eos_token_id=2, cls_token_id=1, sep_token_id=2,
        global_attn_every_n_layers=global_every, local_attention=8, num_labels=2, attention_dropout=0.0,
        mlp_dropout=0.0, embedding_dropout=0.0, classifier_dropout=0.0)).eval()


def _oracle_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """expand + cat: the layer's prefix keys and values in front of the sequence's, the prefix always seen."""
    binding = module._prefix_kernels
    prefix_k, prefix_v = binding.state.layer_prefix(binding.slot, query.dtype)
    B, L, S, P = query.shape[0], query.shape[2], key.shape[2], prefix_k.shape[1]
    key = torch.cat([prefix_k.expand(B, -1, -1, -1), key], dim=2)
    value = torch.cat([prefix_v.expand(B, -1, -1, -1), value], dim=2)
    seen = torch.ones(B, 1, L, P + S, dtype=torch.bool)
    if attention_mask is not None:
        seen[..., P:] = attention_mask.to(torch.bool).expand(B, 1, L, S)
    out = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=seen, scale=scaling)
    return out.transpose(1, 2), None


def _skip_unless_modernbert_is_on_the_interface():
    from transformers import ModernBertForSequenceClassification

    if not ModernBertForSequenceClassification._can_set_attn_implementation():
        with pytest.raises(ValueError, match="'modernbert' .* is not on transformers' attention interface"):
            pk.get_prefix_model(_modernbert(), pk.PrefixTuningConfig(num_virtual_tokens=2))
        pytest.skip("ModernBERT is not on the attention interface in this transformers (refusal checked)")


def test_modernbert_wraps_trains_and_equals_an_oracle():
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register("prefix_kernels_test_oracle", _oracle_attention)
    AttentionMaskInterface.register("prefix_kernels_test_oracle", sdpa_mask)
    _skip_unless_modernbert_is_on_the_interface()
    pm = pk.get_prefix_model(_modernbert(), pk.PrefixTuningConfig(num_virtual_tokens=3, position_offset=False))
    assert pm.layout.groups == [("self", 2)] and pm.layout.kind == "encoder"
    randomize_prefix(pm, scale=0.5)
    ids = tokens(2, 6) % 60 + 3
    mask = torch.ones_like(ids)
    mask[0, 4:] = 0
    labels = torch.tensor([0, 1])
    pm.train()
    loss = pm(input_ids=ids, attention_mask=mask, labels=labels).loss
    loss.backward()
    grads = [p.grad.clone() for p in pm.prefix_encoder.parameters()]
    assert all(torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)
    pm.zero_grad()
    pm.base_model.set_attn_implementation("prefix_kernels_test_oracle")
    try:
        oracle = pm(input_ids=ids, attention_mask=mask, labels=labels).loss
        oracle.backward()
    finally:
        pm.base_model.set_attn_implementation("prefix_kernels")
    torch.testing.assert_close(loss, oracle, rtol=1e-5, atol=1e-6)
    for g, p in zip(grads, pm.prefix_encoder.parameters()):
        torch.testing.assert_close(g, p.grad, rtol=1e-4, atol=1e-6)


def test_modernbert_local_attention_is_refused_by_name():
    _skip_unless_modernbert_is_on_the_interface()
    model = _modernbert(global_every=2)
    with pytest.raises(ValueError, match=r"bidirectional \(symmetric\) sliding-window attention"):
        pk.get_prefix_model(model, pk.PrefixTuningConfig(num_virtual_tokens=2))
    assert getattr(model, "_prefix_kernels_model", None) is None  # refused before anything was changed


def test_vision_language_model_trains_and_generates_with_an_image():
    """End to end on a LLaVA-style model: the image goes through the vision tower's own attention, the
    prefix through the language model's; generate works and equals a full recompute of its tokens."""
    model = _llava()
    image_tokens = (16 // 8) ** 2
    ids = torch.cat([torch.full((2, image_tokens), 63), tokens(2, 5) % 60 + 3], dim=1)
    pixels = torch.randn(2, 3, 16, 16)
    pm = pk.get_prefix_model(model, pk.PrefixTuningConfig(num_virtual_tokens=3))
    assert model.config.vision_config._attn_implementation != "prefix_kernels"
    out = pm(input_ids=ids, pixel_values=pixels, labels=ids)
    out.loss.backward()
    assert torch.isfinite(out.loss) and pm.prefix_encoder.embedding.weight.grad.abs().sum() > 0
    with torch.no_grad():
        new = pm.generate(input_ids=ids, pixel_values=pixels, max_new_tokens=3, do_sample=False)[:, ids.shape[1]:]
        full = pm(input_ids=torch.cat([ids, new[:, :-1]], dim=1), pixel_values=pixels).logits
    assert torch.equal(full[:, ids.shape[1] - 1:].argmax(-1), new)


def _mistral(sliding_window):
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    return MistralForCausalLM(MistralConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=2,
                                            sliding_window=sliding_window))


def _llama4_chunked():
    from transformers import Llama4ForCausalLM, Llama4TextConfig

    torch.manual_seed(0)
    return Llama4ForCausalLM(Llama4TextConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, intermediate_size_mlp=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_local_experts=2, attention_chunk_size=8))


def _qwen2_layer_types(layer_types):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    return Qwen2ForCausalLM(Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, sliding_window=8,
                                        use_sliding_window=True, layer_types=layer_types))


@pytest.mark.parametrize("make,words", [
    # Llama 4: chunked attention
    (_llama4_chunked, r"layer types \['chunked_attention'\].*chunked attention \(attention_chunk_size=8\)"),
    # any layer type beyond full and sliding attention
    (lambda: _qwen2_layer_types(["full_attention", "chunked_attention"]),
     r"layer types \['chunked_attention'\] \(supported: full_attention, sliding_attention\)"),
], ids=["llama4-chunked", "unknown-layer-type"])
def test_attention_features_the_op_lacks_are_refused_at_wrap_time(make, words):
    model = make()
    attn = model.config._attn_implementation
    with pytest.raises(ValueError, match=words):
        pk.get_prefix_model(model, pk.PrefixTuningConfig(num_virtual_tokens=2))
    assert_untouched(model, attn)


def test_windows_softcapping_and_sinks_wrap():
    """Formerly refused at wrap time, now applied per call (tests/test_transformers_features.py): Mistral-7B-v0.1's
    window, Gemma 2's alternating layers with soft-capping."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    gemma2 = Gemma2ForCausalLM(Gemma2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=2, head_dim=8))
    for model in (_mistral(4096), gemma2):
        pm = pk.get_prefix_model(model, pk.PrefixTuningConfig(num_virtual_tokens=2))
        ids = tokens(2, 5) % 60 + 3
        assert torch.isfinite(pm(input_ids=ids, labels=ids).loss)


def test_configs_without_a_window_in_use_wrap():
    """Mistral with no window, and Qwen2's default (sliding_window set, use_sliding_window False) run."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    qwen = Qwen2ForCausalLM(Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, sliding_window=4096,
                                        use_sliding_window=False))
    for model in (_mistral(None), qwen):
        pm = pk.get_prefix_model(model, pk.PrefixTuningConfig(num_virtual_tokens=2))
        ids = tokens(2, 5) % 60 + 3
        assert torch.isfinite(pm(input_ids=ids, labels=ids).loss)


@pytest.mark.parametrize("variable,mode,words", [
    ("PREFIX_KERNELS_TRITON_BWD", "atomic", "PREFIX_KERNELS_TRITON_BWD=atomic adds dq with fp32 atomics"),
    ("PREFIX_KERNELS_TRITON_BWD", "fusedd", "PREFIX_KERNELS_TRITON_BWD='fusedd': expected one of"),
    ("PREFIX_KERNELS_TRITON_FWD", "tmaa", "PREFIX_KERNELS_TRITON_FWD='tmaa': expected one of pointers, tma"),
])
def test_kernel_mode_the_model_cannot_honour(monkeypatch, variable, mode, words):
    """The wrapped model's attention is deterministic, so the atomic backward (and an unknown mode of either
    setting) is refused when the model is wrapped, not at its first forward or backward; the model is untouched."""
    monkeypatch.setenv(variable, mode)
    model = llama()
    attn = model.config._attn_implementation
    with pytest.raises(ValueError) as e:
        pk.get_prefix_model(model, pk.PrefixTuningConfig(num_virtual_tokens=3))
    assert "get_prefix_model cannot honour the environment" in str(e.value) and words in str(e.value)
    assert_untouched(model, attn)


def test_tma_forward_refused_below_sm90(monkeypatch):
    """PREFIX_KERNELS_TRITON_FWD=tma on a GPU without TMA is refused at wrap time. This machine has no GPU: the
    capability get_prefix_model reads for the model's device is patched to an A100's."""
    from prefix_kernels.methods import prefix_model

    monkeypatch.setenv("PREFIX_KERNELS_TRITON_FWD", "tma")
    monkeypatch.setattr(prefix_model, "cuda_arch", lambda device: 80)
    model = llama()
    attn = model.config._attn_implementation
    with pytest.raises(ValueError, match=r"PREFIX_KERNELS_TRITON_FWD=tma needs a GPU with TMA \(compute capability "
                                         r"9.0 or newer\); this one is 8.0"):
        pk.get_prefix_model(model, pk.PrefixTuningConfig(num_virtual_tokens=3))
    assert_untouched(model, attn)
    monkeypatch.setattr(prefix_model, "cuda_arch", lambda device: 90)
    assert pk.get_prefix_model(model, pk.PrefixTuningConfig(num_virtual_tokens=3)) is not None


@pytest.mark.parametrize("variable,mode", [("PREFIX_KERNELS_TRITON_FWD", "tma"),
                                           ("PREFIX_KERNELS_TRITON_BWD", "fused")])
def test_triton_kernel_mode_with_another_backend_is_refused(monkeypatch, variable, mode):
    """A triton kernel mode in the environment with another backend named in the config would never be read: refused
    at wrap time, naming both; without a named backend (it follows the device at each call) the model wraps."""
    monkeypatch.setenv(variable, mode)
    model = llama()
    attn = model.config._attn_implementation
    with pytest.raises(ValueError, match=rf"cannot honour the environment: {variable}={mode} selects kernels of the "
                                         r"triton backend, but the config names backend 'reference'"):
        pk.get_prefix_model(model, pk.PrefixTuningConfig(num_virtual_tokens=3, backend="reference"))
    assert_untouched(model, attn)
    assert pk.get_prefix_model(model, pk.PrefixTuningConfig(num_virtual_tokens=3)) is not None
