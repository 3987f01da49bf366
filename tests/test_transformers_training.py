"""Training with the wrapped model: checkpointing, Trainer, save/resume, merged export, compact masks."""

from __future__ import annotations

import pytest
import torch

import prefix_kernels as pk
from tiny_models import bert, fresh, llama, randomize_prefix, tokens

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")


def wrap(model, P=4, **kw):
    return randomize_prefix(pk.get_prefix_model(model, pk.PrefixTuningConfig(num_virtual_tokens=P, **kw)), scale=0.5)


def _loss_and_grads(pm, batch):
    pm.zero_grad(set_to_none=True)
    loss = pm(**batch).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in pm.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("make,task", [(llama, "causal"), (lambda: bert("seq"), "seq")], ids=["llama", "bert"])
@pytest.mark.parametrize("projection", [False, True])
def test_gradient_checkpointing_gives_same_loss_and_grads(make, task, projection):
    pm = wrap(make(), prefix_projection=projection, encoder_hidden_size=16)
    pm.train()
    ids = tokens(2, 6)
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    labels = ids if task == "causal" else torch.tensor([0, 1])
    batch = dict(input_ids=ids, attention_mask=mask, labels=labels)
    loss0, grads0 = _loss_and_grads(pm, batch)
    pm.gradient_checkpointing_enable()
    assert pm.base_model.is_gradient_checkpointing
    loss1, grads1 = _loss_and_grads(pm, batch)
    torch.testing.assert_close(loss1, loss0)
    assert grads0.keys() == grads1.keys()
    for n in grads0:
        torch.testing.assert_close(grads1[n], grads0[n], rtol=1e-5, atol=1e-6)


def test_trainer_changes_only_prefix_and_head(tmp_path):
    from transformers import Trainer, TrainingArguments

    pm = wrap(bert("seq"))
    before = {n: p.detach().clone() for n, p in pm.named_parameters()}
    data = [dict(input_ids=tokens(1, 6, seed=i)[0], attention_mask=torch.ones(6, dtype=torch.long),
                 labels=torch.tensor(i % 3)) for i in range(8)]
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4,
                             learning_rate=1e-2, report_to=[], save_strategy="no", use_cpu=True,
                             logging_strategy="no", label_names=["labels"], dataloader_num_workers=0)
    Trainer(model=pm, args=args, train_dataset=data).train()
    changed = {n for n, p in pm.named_parameters() if not torch.equal(p.detach(), before[n])}
    assert "prefix_encoder.embedding.weight" in changed
    assert any(n.startswith("base_model.classifier.") for n in changed)
    assert all(n.startswith("prefix_encoder.") or n.startswith("base_model.classifier.") for n in changed), changed


def _sgd_steps(pm, steps, seed=0):
    opt = torch.optim.SGD([p for p in pm.parameters() if p.requires_grad], lr=0.1)
    for i in range(steps):
        ids = tokens(2, 6, seed=seed + i)
        opt.zero_grad()
        pm(input_ids=ids, labels=ids).loss.backward()
        opt.step()


def test_full_training_state_resumes_exactly(tmp_path):
    base = llama()
    a = wrap(fresh(base), P=3, prefix_projection=True, encoder_hidden_size=16)
    a.train()
    _sgd_steps(a, 2)
    a.save_pretrained(tmp_path)
    b = pk.PrefixModel.from_pretrained(fresh(base), tmp_path, is_trainable=True)
    assert b.prefix_encoder.prefix_projection and hasattr(b.prefix_encoder, "transform")
    b.train()
    for (n, p), (m, q) in zip(a.prefix_encoder.named_parameters(), b.prefix_encoder.named_parameters()):
        assert n == m and torch.equal(p, q)
    _sgd_steps(a, 2, seed=10)
    _sgd_steps(b, 2, seed=10)
    for (n, p), (_, q) in zip(a.prefix_encoder.named_parameters(), b.prefix_encoder.named_parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0, msg=n)


def test_export_merged_drops_mlp(tmp_path):
    base = llama()
    a = wrap(fresh(base), P=3, prefix_projection=True, encoder_hidden_size=16)
    ids = tokens(2, 5)
    expected = a(input_ids=ids).logits
    a.export_merged(tmp_path)
    assert not (tmp_path / "prefix_kernels_state.safetensors").exists()
    b = pk.PrefixModel.from_pretrained(fresh(base), tmp_path)
    assert not b.prefix_encoder.prefix_projection and not hasattr(b.prefix_encoder, "transform")
    torch.testing.assert_close(b(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-5)


def test_classifier_head_saved_and_loaded(tmp_path):
    base = bert("seq")
    a = wrap(fresh(base))
    with torch.no_grad():
        a.base_model.classifier.weight.add_(1.0)
    ids = tokens(2, 5)
    expected = a(input_ids=ids).logits
    a.save_pretrained(tmp_path)
    b = pk.PrefixModel.from_pretrained(fresh(base), tmp_path)
    torch.testing.assert_close(b(input_ids=ids).logits, expected)


@pytest.mark.skipif("cpu" not in pk.available_backends("cpu"), reason="the C++ cpu backend is not built")
@pytest.mark.parametrize("make", [llama, lambda: bert("tok")], ids=["llama", "bert"])
def test_no_dense_mask_is_created(make):
    from torch.utils._python_dispatch import TorchDispatchMode

    B, T, P = 3, 7, 5
    pm = wrap(make(), P=P, backend="cpu")
    ids = tokens(B, T)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    mask[2, 5:] = 0
    shapes = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in (out if isinstance(out, (tuple, list)) else (out,)):
                if isinstance(t, torch.Tensor):
                    shapes.append(tuple(t.shape))
            return out

    with Record():
        pm(input_ids=ids, attention_mask=mask)
    dense = [s for s in shapes if len(s) == 4 and s[0] == B and s[2] == T and s[3] in (T, P + T)]
    assert not dense, dense

    # The mask function hands over the compact form: key padding [B, S] + causal flag.
    from transformers.masking_utils import create_causal_mask

    from prefix_kernels.transformers import PrefixMask

    import inspect

    # The keyword names of create_causal_mask changed within transformers 5.x (input(s)_embeds,
    # cache / past_key_values, cache_position); ask the installed one.
    params = inspect.signature(create_causal_mask).parameters
    extra = {"cache": None} if "cache" in params else {"past_key_values": None}
    extra["inputs_embeds" if "inputs_embeds" in params else "input_embeds"] = torch.zeros(B, T, 8)
    if "cache_position" in params:
        extra["cache_position"] = torch.arange(T)
    compact = create_causal_mask(config=pm.base_model.config, attention_mask=mask, **extra)
    assert isinstance(compact, PrefixMask) and compact.causal
    assert compact.key_padding_mask.shape == (B, T) and compact.key_padding_mask.dtype == torch.bool


def test_trainer_with_gradient_checkpointing(tmp_path):
    from transformers import Trainer, TrainingArguments

    pm = wrap(llama())
    before = pm.prefix_encoder.embedding.weight.detach().clone()
    data = [dict(input_ids=tokens(1, 6, seed=i)[0], labels=tokens(1, 6, seed=i)[0]) for i in range(4)]
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2,
                             learning_rate=1e-2, report_to=[], save_strategy="no", use_cpu=True,
                             logging_strategy="no", gradient_checkpointing=True)
    Trainer(model=pm, args=args, train_dataset=data).train()
    assert pm.base_model.is_gradient_checkpointing
    assert not torch.equal(pm.prefix_encoder.embedding.weight.detach(), before)
    with pytest.raises(ValueError, match="use_reentrant=False"):
        pm.gradient_checkpointing_enable({"use_reentrant": True})


def test_prefix_cast_once_per_step_and_backend_resolved_once_per_model(monkeypatch):
    """A bf16 model with an fp32 prefix encoder: each step casts the whole prefix [layers, 2, Hkv, P, D] once,
    never one layer's prefix, and no-grad calls reuse the cast prefix; the op backend is resolved once for the
    model, not per layer or step; and gradient checkpointing recomputes with the same cast prefix."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from prefix_kernels.methods import prefix_model

    resolved = []
    real_resolve = prefix_model.resolve_backend

    def counting_resolve(name, device):
        resolved.append(device)
        return real_resolve(name, device)

    monkeypatch.setattr(prefix_model, "resolve_backend", counting_resolve)
    P = 3
    pm = wrap(llama().to(torch.bfloat16), P=P, backend="reference")
    assert pm.prefix_encoder.embedding.weight.dtype == torch.float32
    layers, Hkv, D = pm.layout.num_layers, pm.layout.num_kv_heads, pm.layout.head_dim
    casts = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func is torch.ops.aten._to_copy.default and kwargs.get("dtype") == torch.bfloat16:
                casts.append(tuple(args[0].shape))
            return func(*args, **kwargs)

    ids = tokens(2, 5)
    with Record(), torch.no_grad():
        for _ in range(2):
            pm(input_ids=ids)
    # Without autograd the prefix is kept across calls: the second call casts nothing.
    assert [s for s in casts if s[-2:] == (P, D)] == [(layers, 2, Hkv, P, D)]
    casts.clear()
    with Record():
        for _ in range(2):
            pm(input_ids=ids)
    assert [s for s in casts if s[-2:] == (P, D)] == [(layers, 2, Hkv, P, D)] * 2
    assert len(resolved) == 1

    pm.train()
    batch = dict(input_ids=ids, labels=ids)
    loss0, grads0 = _loss_and_grads(pm, batch)
    pm.gradient_checkpointing_enable()
    loss1, grads1 = _loss_and_grads(pm, batch)
    torch.testing.assert_close(loss1, loss0)
    for name in grads0:
        assert grads0[name].abs().sum() > 0
        torch.testing.assert_close(grads1[name], grads0[name], msg=name)
    assert len(resolved) == 1
