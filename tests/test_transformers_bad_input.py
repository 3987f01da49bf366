"""Bad input: clear errors naming expected and got, raised before the model is modified."""

from __future__ import annotations

import pytest
import torch

import prefix_kernels as pk
from tiny_models import bert, gpt2, llama, tokens

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
