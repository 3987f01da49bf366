"""Sliding windows, soft-capping, sinks and packed sequences in real transformers models (issue 13).

Mistral and Phi-3 (one window for every layer), Qwen2 (`use_sliding_window`: full then sliding layers), Gemma 2
(alternating sliding and full layers, logit soft-capping), Gemma 3 (alternating layers) and GPT-OSS (sinks on
every layer, alternating layers, a tiny MoE) wrap, train and generate (greedy = full recompute, through
transformers' sliding-window caches). The oracle is each family's own `eager_attention_forward` over the prefix
keys and values put in front of the sequence's, under transformers' own eager mask for the sequence part (causal +
window + padding) with every prefix column open: the semantics of docs/op.md (the prefix is always visible).
Mistral equals PEFT's prefix tuning whenever P + S <= window. Padding-free batches (DataCollatorWithFlattening)
give the padded batch's loss and prefix gradients, through the op's `cu_seqlens`.

The maximum absolute differences against the oracle are printed (`pytest -s`) and named in assertion messages.
"""

from __future__ import annotations

import sys

import pytest
import torch
from transformers import AttentionInterface, GenerationConfig
from transformers.masking_utils import AttentionMaskInterface, eager_mask

import prefix_kernels as pk
import prefix_kernels.transformers.attention as glue
import tiny_models as tm
from tiny_models import assert_same_prefix_grads, fresh, left_padded, randomize_prefix, recompute_greedy, tokens

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")

P = 3
WINDOW = 6  # the small window of the beyond-window cases
NEW = 6

BUILDERS = {
    "mistral": tm.mistral,
    "phi3": tm.phi3,
    "qwen2": tm.qwen2,  # layer 0 full, layer 1 sliding (max_window_layers=1)
    "gemma2": tm.gemma2,
    "gemma3": tm.gemma3,
    "gpt_oss": tm.gpt_oss,
}
FAMILIES = list(BUILDERS)


def wrap(model, P=P, **kw):
    return randomize_prefix(pk.get_prefix_model(model, pk.PrefixTuningConfig(num_virtual_tokens=P, **kw)), scale=0.5)


# ---------------------------------------------------------------------------------------------------- the oracle
ORACLE = "prefix_kernels_test_family_eager"


def _family_eager_oracle(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """The family's own eager attention (soft-capping, sinks and GQA as the family computes them) over
    [prefix keys] + [sequence keys], under transformers' eager mask for the sequence part (its causal + window +
    padding rules, `eager_mask`) with the prefix columns open to every query."""
    eager = sys.modules[type(module).__module__].eager_attention_forward
    binding = module._prefix_kernels
    prefix_k, prefix_v = binding.state.layer_prefix(binding.slot, query.dtype)
    B, L, S = query.shape[0], query.shape[2], key.shape[2]
    key = torch.cat([prefix_k.expand(B, -1, -1, -1), key], dim=2)
    value = torch.cat([prefix_v.expand(B, -1, -1, -1), value], dim=2)
    assert attention_mask is not None and attention_mask.shape[-1] >= S
    open_prefix = torch.zeros(B, 1, L, prefix_k.shape[1], dtype=attention_mask.dtype)
    mask = torch.cat([open_prefix, attention_mask[..., :S].expand(B, 1, L, S)], dim=-1)
    return eager(module, query, key, value, mask, scaling=scaling, dropout=dropout, **kwargs)


AttentionInterface.register(ORACLE, _family_eager_oracle)
AttentionMaskInterface.register(ORACLE, eager_mask)

def _logits_and_grads(pm, ids, mask):
    pm.zero_grad()
    logits = pm(input_ids=ids, attention_mask=mask).logits
    (logits * mask[..., None]).square().mean().backward()
    return logits.detach(), {n: p.grad.clone() for n, p in pm.prefix_encoder.named_parameters()}


def oracle_diff(pm, ids, mask):
    """(max |logits - oracle|, max |prefix grads - oracle's|), over the real tokens."""
    logits, grads = _logits_and_grads(pm, ids, mask)
    pm.base_model.set_attn_implementation(ORACLE)
    try:
        want, want_grads = _logits_and_grads(pm, ids, mask)
    finally:
        pm.base_model.set_attn_implementation(glue.ATTN_IMPLEMENTATION)
    real = mask.bool()
    assert torch.isfinite(logits[real]).all()
    d_logits = (logits - want)[real].abs().max().item()
    d_grads = max((grads[n] - want_grads[n]).abs().max().item() / want_grads[n].abs().max().item()
                  for n in grads)
    assert all(g.abs().sum() > 0 for g in grads.values())
    return d_logits, d_grads


@pytest.mark.parametrize("case", ["inside", "beyond"])
@pytest.mark.parametrize("family", FAMILIES)
def test_logits_and_prefix_grads_equal_the_family_eager_oracle(family, case):
    """Inside: every row shorter than the window (the window hides nothing); beyond: rows of 14 tokens, window 6
    (left padding in one row, so the window counts padded positions as transformers does)."""
    pm = wrap(BUILDERS[family](sliding_window=WINDOW))
    T = WINDOW - 1 if case == "inside" else 14
    ids, mask = left_padded([T, T - 3], T, seed=3)
    d_logits, d_grads = oracle_diff(pm, ids, mask)
    print(f"\nORACLE {family:8s} {case:6s} window={WINDOW} P={P} S={T}: max|logits diff|={d_logits:.2e} "
          f"max rel prefix-grad diff={d_grads:.2e}")
    assert d_logits < 1e-4, f"{family} {case}: max abs logits difference {d_logits:.3e}"
    assert d_grads < 1e-4, f"{family} {case}: max relative prefix-grad difference {d_grads:.3e}"


def test_the_window_changes_the_result():
    """The beyond-window case is no full-attention case in disguise: the same Mistral without a window differs."""
    ids, mask = left_padded([14, 11], 14, seed=3)
    windowed = wrap(tm.mistral(WINDOW))
    full = wrap(tm.mistral(None))
    a = windowed(input_ids=ids, attention_mask=mask).logits
    b = full(input_ids=ids, attention_mask=mask).logits
    assert (a[0, WINDOW:] - b[0, WINDOW:]).abs().max() > 1e-3


@pytest.mark.parametrize("family,window", [("mistral", 4096), ("phi3", 2047), ("qwen2", 4096), ("gemma2", 4096),
                                           ("gemma3", 4096), ("gpt_oss", 128)])
def test_real_config_windows_wrap_and_equal_the_oracle(family, window):
    """The windows of the released configs (Mistral-7B-v0.1: 4096, Phi-3-mini: 2047, GPT-OSS: 128): they wrap,
    and a window that covers every key is not passed to the op (nothing to hide), so the backend is chosen for
    the other features only."""
    pm = wrap(BUILDERS[family](sliding_window=window))
    ids, mask = left_padded([9, 6], 9, seed=4)
    d_logits, d_grads = oracle_diff(pm, ids, mask)
    print(f"\nORACLE {family:8s} real window={window}: max|logits diff|={d_logits:.2e} rel grad={d_grads:.2e}")
    assert d_logits < 1e-4 and d_grads < 1e-4, (family, d_logits, d_grads)
    assert all("window" not in features for _, features in pm._state._backends)


# ---------------------------------------------------------------------------------------- train and generate
def _greedy(pm, ids, mask):
    config = GenerationConfig(max_new_tokens=NEW, do_sample=False, pad_token_id=0, eos_token_id=None)
    return pm.generate(input_ids=ids, attention_mask=mask, generation_config=config, return_dict_in_generate=True)


@pytest.mark.parametrize("family", FAMILIES + ["mistral-no-window"])
def test_wraps_trains_and_generates_through_sliding_caches(family):
    make = (lambda **kw: tm.mistral(None)) if family == "mistral-no-window" else BUILDERS[family]
    pm = wrap(make(sliding_window=WINDOW))
    ids, mask = left_padded([10, 7], 10, seed=5)
    # train: the loss reaches the prefix
    pm.train()
    out = pm(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100))
    out.loss.backward()
    assert torch.isfinite(out.loss)
    grad = pm.prefix_encoder.embedding.weight.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0
    pm.eval()
    # generate: the prompt (10) and the new tokens run past the window, so sliding layers keep window - 1 keys
    # and the mask function gets kv_offset > 0
    with torch.no_grad():
        out = _greedy(pm, ids, mask)
        expected = recompute_greedy(pm, ids, mask, NEW)
    assert torch.equal(out.sequences, expected), family
    cache = out.past_key_values
    sliding = [type(layer).__name__ == "DynamicSlidingWindowLayer" for layer in cache.layers]
    if family == "mistral-no-window":
        assert not any(sliding)
    else:
        assert any(sliding), [type(layer).__name__ for layer in cache.layers]
        for layer, slides in zip(cache.layers, sliding):
            # the cache holds real tokens only (never the prefix): window - 1 of them in a sliding layer
            assert layer.keys.shape[2] == (WINDOW - 1 if slides else 10 + NEW - 1)


@pytest.mark.parametrize("layer_types", [None, ["sliding_attention", "full_attention", "sliding_attention"]])
def test_qwen2_max_window_layers_and_layer_types(layer_types):
    """Qwen2's use_sliding_window slides the layers from max_window_layers on, or those layer_types names."""
    model = tm.qwen2(WINDOW, max_window_layers=2, num_hidden_layers=3, layer_types=layer_types)
    expected = layer_types or ["full_attention", "full_attention", "sliding_attention"]
    assert model.config.layer_types == expected
    pm = wrap(model)
    calls = _spy_op_calls(pm, lambda: pm(input_ids=tokens(1, 12)))
    assert [c["window"] for c in calls] == [WINDOW if t == "sliding_attention" else None for t in expected]
    ids, mask = left_padded([12, 8], 12, seed=6)
    d_logits, _ = oracle_diff(pm, ids, mask)
    assert d_logits < 1e-4, d_logits


# ---------------------------------------------------------------------------------- what each layer passes the op
def _spy_op_calls(pm, run):
    """The window / softcap / sinks / cu_seqlens / key padding each layer hands the op, in layer order."""
    calls = []
    real = glue.prefix_attention

    def spy(*args, **kwargs):
        calls.append({k: kwargs.get(k) for k in ("window", "softcap", "sinks", "cu_seqlens", "key_padding_mask")})
        return real(*args, **kwargs)

    glue.prefix_attention = spy
    try:
        run()
    finally:
        glue.prefix_attention = real
    return calls


@pytest.mark.parametrize("family,expected", [
    ("mistral", [(WINDOW, None, False)] * 2),
    ("phi3", [(WINDOW, None, False)] * 2),
    ("qwen2", [(None, None, False), (WINDOW, None, False)]),
    ("gemma2", [(WINDOW, 50.0, False), (None, 50.0, False)]),
    ("gemma3", [(WINDOW, None, False), (None, None, False)]),
    ("gpt_oss", [(WINDOW, None, True), (None, None, True)]),
])
def test_each_layer_passes_its_own_features(family, expected):
    """Honoured per call: the layer's window (None for full layers: Qwen2, Gemma 2/3 and GPT-OSS pass it only to
    their sliding layers; Mistral and Phi-3 to every layer), Gemma 2's softcap, GPT-OSS's sinks (the module's own
    `sinks` parameter)."""
    pm = wrap(BUILDERS[family](sliding_window=WINDOW))
    calls = _spy_op_calls(pm, lambda: pm(input_ids=tokens(2, 10)))
    assert [(c["window"], c["softcap"], c["sinks"] is not None) for c in calls] == expected
    if family == "gpt_oss":
        modules = [m for _, m in pm.layout.attention_modules]
        assert all(c["sinks"] is m.sinks for c, m in zip(calls, modules))


def test_backend_is_resolved_once_per_device_and_feature_set(monkeypatch):
    """Gemma 2 alternates sliding (window + softcap) and full (softcap) layers: two records, resolved once each
    however many layers and calls."""
    import prefix_kernels.methods.prefix_model as pm_module

    seen = []
    real = pm_module.resolve_backend

    def counting(name, device, features=()):
        seen.append(tuple(features))
        return real(name, device, features)

    monkeypatch.setattr(pm_module, "resolve_backend", counting)
    pm = wrap(tm.gemma2(WINDOW))
    for _ in range(3):
        pm(input_ids=tokens(2, 10))
    assert sorted(seen) == [("softcap",), ("window", "softcap")]
    with torch.no_grad():
        _greedy(pm, *left_padded([8, 5], 8))
    # decoding steps that the window no longer limits ("softcap" only) reuse the record
    assert sorted(seen) == [("softcap",), ("window", "softcap")]


# --------------------------------------------------------------------------------------------------------- PEFT
def test_mistral_equals_peft_when_prefix_and_sequence_fit_in_the_window():
    """PEFT puts the prefix in the cache at positions 0..P-1, inside the window's count; ours keeps it visible
    to every query. Whenever P + S <= window the two are the same model (logits and prefix gradients); beyond
    that they differ (PEFT's later queries lose prefix keys)."""
    peft = pytest.importorskip("peft")
    window, P_ = 12, 4
    base = tm.mistral(window)
    ours = wrap(fresh(base), P=P_)
    theirs = peft.get_peft_model(fresh(base), peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P_))
    theirs.prompt_encoder["default"].load_state_dict(ours.prefix_encoder.state_dict())
    ids = tokens(2, window - P_)  # P + S == window
    a, b = ours(input_ids=ids).logits, theirs(input_ids=ids).logits
    diff = (a - b).abs().max().item()
    print(f"\nPEFT mistral window={window} P={P_} S={ids.shape[1]}: max|logits diff|={diff:.2e}")
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    target = torch.randn_like(a)
    (a * target).sum().backward()
    (b * target).sum().backward()
    assert_same_prefix_grads(ours, theirs)
    longer = tokens(2, window + 4)  # P + S > window: PEFT's last queries no longer see the first prefix keys
    with torch.no_grad():
        a, b = ours(input_ids=longer).logits, theirs(input_ids=longer).logits
    assert torch.allclose(a[:, : window - P_], b[:, : window - P_], rtol=1e-5, atol=1e-5)
    assert (a[:, -1] - b[:, -1]).abs().max() > 1e-4


# ----------------------------------------------------------------------------------------- padding-free batches
LENGTHS = [7, 3, 5]


def _examples(lengths=LENGTHS, seed=10):
    return [{"input_ids": tokens(1, n, seed=seed + i)[0].tolist()} for i, n in enumerate(lengths)]


def _padded(examples):
    T = max(len(e["input_ids"]) for e in examples)
    ids = torch.zeros(len(examples), T, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, e in enumerate(examples):
        n = len(e["input_ids"])
        ids[b, :n] = torch.tensor(e["input_ids"])
        mask[b, :n] = 1
    labels = ids.masked_fill(mask == 0, -100)
    # as DataCollatorWithFlattening: the first label of every sequence is -100 (it is never predicted; transformers
    # 5.0's Trainer counts the unshifted labels for num_items_in_batch)
    labels[:, 0] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _loss_and_grads(pm, batch):
    pm.zero_grad()
    loss = pm(**batch).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in pm.prefix_encoder.named_parameters()}


@pytest.mark.parametrize("flash_kwargs", [False, True], ids=["position_ids", "flash_kwargs"])
@pytest.mark.parametrize("family", ["llama", "mistral-window", "gemma2", "gpt_oss"])
def test_packed_batch_equals_the_padded_batch(family, flash_kwargs):
    """DataCollatorWithFlattening (position ids restarting per sequence; with return_flash_attn_kwargs also
    cu_seq_lens_q/k and max_length_q/k, and seq_idx): the same loss and prefix gradients as the padded batch of
    the same examples, real tokens at positions P..P+len-1 inside every sequence, the op called with cu_seqlens
    and no key padding mask (never a dense mask)."""
    from transformers import DataCollatorWithFlattening

    make = {"llama": tm.llama, "mistral-window": lambda: tm.mistral(4), "gemma2": lambda: tm.gemma2(4),
            "gpt_oss": lambda: tm.gpt_oss(4)}[family]
    pm = wrap(make())
    examples = _examples()
    collator = DataCollatorWithFlattening(return_flash_attn_kwargs=flash_kwargs, return_seq_idx=flash_kwargs)
    packed = collator(examples)
    assert packed["input_ids"].shape == (1, sum(LENGTHS)) and "attention_mask" not in packed
    want_loss, want_grads = _loss_and_grads(pm, _padded(examples))
    positions = _spy_positions(pm)
    calls = _spy_op_calls(pm, lambda: _loss_and_grads(pm, packed))
    loss, grads = _loss_and_grads(pm, packed)
    assert positions[-1][0].tolist() == [P + i for n in LENGTHS for i in range(n)]
    cu = torch.tensor([0, 7, 10, 15], dtype=torch.int32)
    assert calls and all(torch.equal(c["cu_seqlens"], cu) and c["key_padding_mask"] is None for c in calls)
    d_loss = (loss - want_loss).abs().item()
    d_grad = max((grads[n] - want_grads[n]).abs().max().item() for n in grads)
    print(f"\nPACKED {family} flash_kwargs={flash_kwargs}: |loss diff|={d_loss:.2e} max|prefix grad diff|={d_grad:.2e}")
    torch.testing.assert_close(loss, want_loss, rtol=1e-5, atol=1e-6)
    for n in grads:
        assert grads[n].abs().sum() > 0
        torch.testing.assert_close(grads[n], want_grads[n], rtol=1e-4, atol=1e-6, msg=n)


def _spy_positions(pm):
    seen = []

    def hook(module, args, kwargs):
        pos = kwargs.get("position_ids", args[1] if len(args) > 1 else None)
        seen.append(pos.clone())

    pm.base_model.model.rotary_emb.register_forward_pre_hook(hook, with_kwargs=True)
    return seen


def test_packed_without_position_ids_numbers_each_sequence_from_the_flash_kwargs():
    """cu_seq_lens_q/k alone (no position_ids): positions are derived per sequence, as the padded batch has."""
    pm = wrap(tm.mistral(4))
    examples = _examples()
    packed = __import__("transformers").DataCollatorWithFlattening(
        return_flash_attn_kwargs=True, return_position_ids=False)(examples)
    assert "position_ids" not in packed
    want, _ = _loss_and_grads(pm, _padded(examples))
    positions = _spy_positions(pm)
    loss, _ = _loss_and_grads(pm, packed)
    assert positions[-1][0].tolist() == [P + i for n in LENGTHS for i in range(n)]
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-6)


def test_packed_batches_that_cannot_be_applied_are_refused():
    pm = wrap(tm.llama())
    ids = tokens(2, 6)
    restart = torch.tensor([[0, 1, 2, 0, 1, 2], [0, 1, 2, 3, 4, 5]])
    with pytest.raises(NotImplementedError, match=r"packed sequences .* rows \[0\]\).* got 2 rows"):
        pm(input_ids=ids, position_ids=restart)
    cu = torch.tensor([0, 3, 6], dtype=torch.int32)
    with pytest.raises(ValueError, match="take no attention_mask"):
        pm(input_ids=ids[:1], attention_mask=torch.ones(1, 6), cu_seq_lens_q=cu, cu_seq_lens_k=cu)
    with pytest.raises(ValueError, match=r"end at the 6 tokens .* \[0, 3, 5\]"):
        bad = torch.tensor([0, 3, 5], dtype=torch.int32)
        pm(input_ids=ids[:1], cu_seq_lens_q=bad, cu_seq_lens_k=bad)
    # a plain batch of one row with ordinary positions is not packed
    calls = _spy_op_calls(pm, lambda: pm(input_ids=ids[:1], position_ids=torch.arange(6)[None]))
    assert all(c["cu_seqlens"] is None for c in calls)


def test_trainer_with_flattening_equals_padded_on_the_first_step(tmp_path):
    """transformers.Trainer with DataCollatorWithFlattening on a tiny Mistral (window 4): the logged first-step
    loss is finite and equals the padded run's, and one SGD step moves the prefix to the same values."""
    from transformers import DataCollatorWithFlattening, Trainer, TrainingArguments

    data = _examples([7, 3, 5, 6], seed=20)
    base = tm.mistral(4)

    def run(collator, out):
        pm = wrap(fresh(base))
        args = TrainingArguments(output_dir=str(tmp_path / out), max_steps=1, per_device_train_batch_size=4,
                                 learning_rate=0.5, optim="sgd", report_to=[], save_strategy="no", use_cpu=True,
                                 logging_steps=1, dataloader_num_workers=0, disable_tqdm=True)
        trainer = Trainer(model=pm, args=args, train_dataset=data, data_collator=collator)
        trainer.train()
        loss = next(h["loss"] for h in trainer.state.log_history if "loss" in h)
        return loss, {n: p.detach().clone() for n, p in pm.prefix_encoder.named_parameters()}

    packed_loss, packed_prefix = run(DataCollatorWithFlattening(), "packed")
    padded_loss, padded_prefix = run(_padded, "padded")
    print(f"\nTRAINER mistral window=4: packed loss {packed_loss!r} padded loss {padded_loss!r}")
    assert packed_loss == pytest.approx(padded_loss, rel=1e-5) and torch.isfinite(torch.tensor(packed_loss))
    for n in packed_prefix:
        torch.testing.assert_close(packed_prefix[n], padded_prefix[n], rtol=1e-5, atol=1e-6)
    assert not torch.equal(packed_prefix["embedding.weight"], wrap(fresh(base)).prefix_encoder.embedding.weight)


def test_multi_prefix_model_packed_row_reads_a_prefix_per_sequence():
    """A packed row through a bank of adapters: `prefix_index` has one entry per packed sequence, and each
    sequence gets the logits it gets alone with its adapter."""
    from transformers import DataCollatorWithFlattening

    base = tm.mistral(4)
    embeds = {}
    for seed, name in ((1, "a"), (2, "b")):
        embeds[name] = randomize_prefix(pk.get_prefix_model(fresh(base), pk.PrefixTuningConfig(
            num_virtual_tokens=P)), seed=seed, scale=0.5).merged_prompt_embeddings()
    server = pk.MultiPrefixModel(fresh(base), embeds)
    examples = _examples()
    packed = DataCollatorWithFlattening()(examples)
    names = ["a", "b", "a"]
    with torch.no_grad():
        logits = server(input_ids=packed["input_ids"], position_ids=packed["position_ids"],
                        adapter_names=names).logits[0]
        start = 0
        for e, name in zip(examples, names):
            n = len(e["input_ids"])
            alone = server(input_ids=torch.tensor([e["input_ids"]]), adapter_names=[name]).logits[0]
            torch.testing.assert_close(logits[start:start + n], alone, rtol=1e-5, atol=1e-5)
            start += n
    with pytest.raises(ValueError, match="prefix_index has 2 entries but the packed row holds 3"):
        server(input_ids=packed["input_ids"], position_ids=packed["position_ids"], adapter_names=["a", "b"])


# ------------------------------------------------------------------------------------------- what stays refused
def test_gemma3_bidirectional_attention_is_refused_by_name():
    """Gemma 3 with use_bidirectional_attention (EmbeddingGemma): symmetric windows in non-causal layers."""
    from transformers import Gemma3TextConfig, Gemma3TextModel

    torch.manual_seed(0)
    model = Gemma3TextModel(Gemma3TextConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, sliding_window=8, layer_types=["sliding_attention", "full_attention"],
        use_bidirectional_attention=True))
    with pytest.raises(ValueError, match=r"bidirectional \(symmetric\) sliding-window attention"):
        pk.get_prefix_model(model, pk.PrefixTuningConfig(num_virtual_tokens=2))
    assert getattr(model, "_prefix_kernels_model", None) is None


def test_the_prefix_stays_in_view_beyond_the_window():
    """Window 4, P = 3, 12 tokens, 2 layers: had the prefix slid out of the window with the oldest positions (as
    in PEFT), no token in the last token's receptive field would see it and its logits would be the base
    model's (RoPE is relative, so the position offset alone changes nothing); the prefix stays visible."""
    pm = wrap(tm.mistral(4))
    ids = tokens(1, 12)
    with torch.no_grad():
        with_prefix = pm(input_ids=ids).logits[0, -1]
        with pm.disable_adapter():
            without = pm(input_ids=ids).logits[0, -1]
    assert (with_prefix - without).abs().max() > 1e-3
