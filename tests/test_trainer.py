"""The ordinary transformers.Trainer on wrapped models: eval loss, checkpoints that hold the adapter, exact
resume, best model, early stopping, gradient checkpointing / bf16 / accumulation, for PrefixModel,
PrefixTaskModel and PTuningModel; the prefix kept across no-grad calls; set_attn_implementation refused."""

from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import load_file

import prefix_kernels as pk
from prefix_kernels import PrefixTaskModel, PTuningConfig, PTuningModel
from tiny_models import VOCAB, bert, bert_mlm, fresh, gpt2, llama, randomize_prefix, tokens

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")

META = "prefix_kernels_meta"


def wrap(model, P=4, seed=1, **kw):
    return randomize_prefix(pk.get_prefix_model(model, pk.PrefixTuningConfig(num_virtual_tokens=P, **kw)),
                            seed=seed, scale=0.5)


def args(tmp_path, **kw):
    from transformers import TrainingArguments

    base = dict(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2, learning_rate=1e-2,
                report_to=[], save_strategy="no", use_cpu=True, logging_strategy="no", dataloader_num_workers=0,
                disable_tqdm=True)
    base.update(kw)
    return TrainingArguments(**base)


def lm_data(n=8, T=6):
    return [dict(input_ids=tokens(1, T, seed=i)[0], labels=tokens(1, T, seed=i)[0]) for i in range(n)]


def seq_data(n=8, T=6, classes=3):
    return [dict(input_ids=tokens(1, T, seed=i)[0], attention_mask=torch.ones(T, dtype=torch.long),
                 labels=torch.tensor(i % classes)) for i in range(n)]


def tied_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
                      intermediate_size=128, vocab_size=VOCAB, pad_token_id=0, tie_word_embeddings=True)
    return LlamaForCausalLM(cfg).eval()


def prefix_of(model):
    enc = model.prefix_model.prefix_encoder if isinstance(model, PrefixTaskModel) else model.prefix_encoder
    return {n: p.detach().clone() for n, p in enc.named_parameters()}


def file_size(path):
    return os.path.getsize(path)


def base_size(model):
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


# ------------------------------------------------------------------------------------------ eval loss


@pytest.mark.parametrize("make,data", [(llama, lm_data), (lambda: bert("seq"), seq_data)], ids=["causal", "seq"])
def test_default_arguments_report_eval_loss(tmp_path, make, data):
    from transformers import Trainer

    trainer = Trainer(model=wrap(make()), args=args(tmp_path), train_dataset=data(), eval_dataset=data(4))
    assert trainer.label_names == ["labels"]
    metrics = trainer.evaluate()
    assert "eval_loss" in metrics and torch.isfinite(torch.tensor(metrics["eval_loss"]))


def test_best_model_at_end_and_early_stopping(tmp_path, monkeypatch):
    from transformers import EarlyStoppingCallback, Trainer

    loads = []
    monkeypatch.setattr(Trainer, "_issue_warnings_after_load", lambda self, result: loads.append(result))

    pm = wrap(llama())
    a = args(tmp_path, max_steps=8, eval_strategy="steps", eval_steps=2, save_strategy="steps", save_steps=2,
             load_best_model_at_end=True, metric_for_best_model="eval_loss", greater_is_better=True,
             learning_rate=0.5)
    trainer = Trainer(model=pm, args=a, train_dataset=lm_data(), eval_dataset=lm_data(4),
                      callbacks=[EarlyStoppingCallback(early_stopping_patience=1, early_stopping_threshold=10.0)])
    trainer.train()
    # greater_is_better makes the first checkpoint (the loss falls) the best, so that loading it is seen; a
    # threshold of 10 nats stops training at patience 1.
    assert trainer.state.global_step == 4
    best = trainer.state.best_model_checkpoint
    assert best is not None and best.endswith("checkpoint-2")
    saved = load_file(os.path.join(best, "model.safetensors"))
    for n, p in pm.prefix_encoder.named_parameters():
        assert torch.equal(p.detach(), saved[f"prefix_encoder.{n}"]), n
    assert len(loads) == 1 and loads[0].missing_keys == [] and loads[0].unexpected_keys == []
    assert trainer.evaluate()["eval_loss"] == pytest.approx(trainer.state.best_metric, rel=1e-6)


# ------------------------------------------------------------------------------------------ checkpoints


@pytest.mark.parametrize("make", [gpt2, tied_llama, llama], ids=["gpt2-tied", "llama-tied", "llama-untied"])
def test_checkpoint_holds_the_adapter_and_loads_with_from_pretrained(tmp_path, make):
    from transformers import Trainer

    base = make()
    assert (base.get_input_embeddings().weight is base.get_output_embeddings().weight) == (make is not llama)
    pm = wrap(fresh(base), prefix_projection=True, encoder_hidden_size=16)
    trainer = Trainer(model=pm, args=args(tmp_path, save_strategy="steps", save_steps=1), train_dataset=lm_data())
    trainer.train()
    ckpt = tmp_path / "checkpoint-2"
    tensors = load_file(str(ckpt / "model.safetensors"))
    assert set(tensors) == {META} | {f"prefix_encoder.{n}" for n, _ in pm.prefix_encoder.named_parameters()}
    size, full = file_size(ckpt / "model.safetensors"), base_size(base)
    print(f"{make.__name__}: checkpoint model.safetensors {size} bytes, base model {full} bytes")
    assert size < full / 4
    trainer.save_model(str(tmp_path / "final"))
    ids = tokens(2, 5, seed=99)
    with torch.no_grad():
        expected = pm(input_ids=ids).logits
    for folder in (ckpt, tmp_path / "final"):
        loaded = pk.PrefixModel.from_pretrained(fresh(base), folder)
        assert loaded.prefix_encoder.prefix_projection
        with torch.no_grad():
            torch.testing.assert_close(loaded(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-5)


def test_checkpoint_keeps_the_head_of_a_classifier(tmp_path):
    from transformers import Trainer

    base = bert("seq")
    pm = wrap(fresh(base))
    Trainer(model=pm, args=args(tmp_path), train_dataset=seq_data()).save_model(str(tmp_path / "m"))
    keys = set(load_file(str(tmp_path / "m" / "model.safetensors")))
    assert keys == {META, "prefix_encoder.embedding.weight", "base_model.classifier.weight",
                    "base_model.classifier.bias"}
    with torch.no_grad():
        pm.base_model.classifier.weight.add_(1.0)
    sd = pm.state_dict()
    other = wrap(fresh(base), seed=7)
    result = other.load_state_dict(sd)
    assert result.missing_keys == [] and result.unexpected_keys == []
    torch.testing.assert_close(other.base_model.classifier.weight, pm.base_model.classifier.weight)
    wrong = wrap(fresh(base), P=5)
    with pytest.raises(RuntimeError, match="different PrefixModel"):
        wrong.load_state_dict(sd, strict=False)


def test_resume_from_checkpoint_continues_exactly(tmp_path):
    from transformers import Trainer

    base = llama()
    common = dict(max_steps=4, save_strategy="steps", save_steps=2, lr_scheduler_type="linear", warmup_steps=1,
                  weight_decay=0.01)
    straight = wrap(fresh(base), prefix_projection=True, encoder_hidden_size=16)
    Trainer(model=straight, args=args(tmp_path / "a", **common), train_dataset=lm_data()).train()
    # A different initial prefix: only the checkpoint can make the resumed run equal the straight one.
    resumed = wrap(fresh(base), seed=5, prefix_projection=True, encoder_hidden_size=16)
    trainer = Trainer(model=resumed, args=args(tmp_path / "b", **common), train_dataset=lm_data())
    trainer.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-2"))
    assert trainer.state.global_step == 4
    for n, p in prefix_of(straight).items():
        torch.testing.assert_close(prefix_of(resumed)[n], p, rtol=0, atol=1e-6, msg=n)


def _resume_matches(tmp_path, build, data, **kw):
    """N steps straight against N/2, a checkpoint, and N/2 resumed on a model built with another seed."""
    from transformers import Trainer

    common = dict(max_steps=4, save_strategy="steps", save_steps=2, lr_scheduler_type="linear", warmup_steps=1,
                  **kw)
    straight = build(0)
    Trainer(model=straight, args=args(tmp_path / "a", **common), train_dataset=data).train()
    resumed = build(5)
    trainer = Trainer(model=resumed, args=args(tmp_path / "b", **common), train_dataset=data)
    trainer.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-2"))
    assert trainer.state.global_step == 4
    a, b = straight.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys()
    assert any(not torch.equal(v, build(0).state_dict()[k]) for k, v in a.items()), "nothing trained"
    for n in a:
        torch.testing.assert_close(b[n], a[n], rtol=0, atol=1e-6, msg=n)


def test_task_model_resumes_exactly(tmp_path):
    def build(seed):
        backbone = bert("seq").bert
        torch.manual_seed(seed)  # the prefix and the heads
        return PrefixTaskModel(backbone, pk.PTuningV2Config(num_virtual_tokens=3, prefix_dropout=0.0,
                                                            prefix_projection=True), {"a": 2, "b": 3})

    data = [dict(input_ids=tokens(1, 6, seed=i)[0], task_ids=torch.tensor(i % 2), labels=torch.tensor(i % 2))
            for i in range(8)]
    _resume_matches(tmp_path, build, data)


# ------------------------------------------------------------------------------------------ P-Tuning v2 tasks


def test_task_model_multi_task_trainer(tmp_path, monkeypatch):
    from transformers import Trainer

    loads = []
    monkeypatch.setattr(Trainer, "_issue_warnings_after_load", lambda self, result: loads.append(result))

    def backbone():
        return bert("seq").bert

    model = PrefixTaskModel(backbone(), pk.PTuningV2Config(num_virtual_tokens=3, prefix_dropout=0.0),
                            {"a": 2, "b": 3})
    data = [dict(input_ids=tokens(1, 6, seed=i)[0], attention_mask=torch.ones(6, dtype=torch.long),
                 task_ids=torch.tensor(i % 2), labels=torch.tensor(i % 2)) for i in range(8)]
    before = prefix_of(model)
    trainer = Trainer(model=model, args=args(tmp_path, save_strategy="steps", save_steps=2, eval_strategy="steps",
                                             eval_steps=2, load_best_model_at_end=True,
                                             metric_for_best_model="eval_loss", gradient_checkpointing=True),
                      train_dataset=data, eval_dataset=data[:4])
    assert trainer.label_names == ["labels"]
    trainer.train()
    assert model.backbone.is_gradient_checkpointing
    assert len(loads) == 1 and loads[0].missing_keys == [] and loads[0].unexpected_keys == []  # the best model
    assert "eval_loss" in trainer.evaluate()
    assert any(not torch.equal(before[n], p) for n, p in prefix_of(model).items())
    ckpt = tmp_path / "checkpoint-2"
    keys = set(load_file(str(ckpt / "model.safetensors")))
    assert all(k.startswith(("heads.", "prefix_model.prefix_encoder.")) or k.endswith(META) for k in keys), keys
    batch = dict(input_ids=tokens(4, 6, seed=50), task_ids=torch.tensor([0, 1, 1, 0]))
    model.eval()
    with torch.no_grad():
        expected = model(**batch).logits
    loaded = PrefixTaskModel.from_pretrained(backbone(), ckpt).eval()
    with torch.no_grad():
        got = loaded(**batch).logits
    for name in expected:
        torch.testing.assert_close(got[name], expected[name])


# ------------------------------------------------------------------------------------------ P-Tuning v1


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from transformers import BertTokenizer

    words = "it was great terrible the movie good bad a is not fun boring film this".split()
    d = tmp_path_factory.mktemp("tok")
    (d / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + words + ["."]) + "\n")
    return BertTokenizer(str(d / "vocab.txt"), do_lower_case=True)


def test_ptuning_v1_trainer_with_encode_output(tmp_path, tokenizer):
    from transformers import Trainer

    cfg = PTuningConfig(template="{sentence} It was [P][P] [MASK] .", verbalizer=["bad", "good"],
                        encoder_reparameterization_type="mlp", encoder_hidden_size=16)
    model = PTuningModel(bert_mlm(), tokenizer, cfg)
    sentences = ["this movie is fun", "a boring film", "the film is not good", "good", "bad movie", "fun"]
    batch = model.encode([{"sentence": s} for s in sentences])
    labels = [1, 0, 0, 1, 0, 1]
    data = [{**{k: v[i] for k, v in batch.items()}, "labels": torch.tensor(y)} for i, y in enumerate(labels)]
    before = model.prompt_encoder.embedding.weight.detach().clone()
    trainer = Trainer(model=model, args=args(tmp_path, save_strategy="steps", save_steps=2,
                                             gradient_checkpointing=True),
                      train_dataset=data, eval_dataset=data)
    assert "eval_loss" in trainer.evaluate()
    trainer.train()
    assert model.base_model.is_gradient_checkpointing
    assert not torch.equal(model.prompt_encoder.embedding.weight.detach(), before)
    keys = set(load_file(str(tmp_path / "checkpoint-2" / "model.safetensors")))
    assert keys == {META} | {f"prompt_encoder.{k}" for k in model.prompt_encoder.state_dict()}
    with torch.no_grad():
        expected = model.classify(**batch)[1]
        loaded = PTuningModel.from_pretrained(bert_mlm(), tokenizer, tmp_path / "checkpoint-2")
        torch.testing.assert_close(loaded.classify(**batch)[1], expected)


def test_ptuning_v1_causal_lm_resumes_exactly(tmp_path):

    tok = _bert_tokenizer(tmp_path)
    cfg = PTuningConfig(template="[P] {sentence} It was [P]", encoder_reparameterization_type="lstm",
                        encoder_hidden_size=8)

    def build(seed):
        model = PTuningModel(llama(), tok, cfg)
        randomize_encoder(model.prompt_encoder, seed)
        return model

    probe = build(0)
    batch = probe.encode([{"sentence": s} for s in ("a fun film", "boring", "not good", "good movie")],
                         targets=["great", "bad", "bad", "great"])
    data = [{k: v[i] for k, v in batch.items()} for i in range(4)]
    _resume_matches(tmp_path, build, data)


def randomize_encoder(encoder, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in encoder.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def _bert_tokenizer(tmp_path):
    from transformers import BertTokenizer

    words = "it was great bad a fun film boring not good movie".split()
    (tmp_path / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + words) + "\n")
    return BertTokenizer(str(tmp_path / "vocab.txt"), do_lower_case=True)


# ------------------------------------------------------------------------------------------ training options


@pytest.mark.parametrize("make,data,gc,bf16", [
    (llama, lm_data, True, False),
    (lambda: bert("seq"), seq_data, True, True),
    (llama, lm_data, False, True),
], ids=["llama-checkpointing", "bert-checkpointing-bf16", "llama-bf16"])
def test_gradient_checkpointing_and_bf16_on_cpu(tmp_path, make, data, gc, bf16):
    from transformers import Trainer

    pm = wrap(make())
    before = prefix_of(pm)
    trainer = Trainer(model=pm, args=args(tmp_path, gradient_checkpointing=gc, bf16=bf16, logging_strategy="steps",
                                          logging_steps=1), train_dataset=data())
    trainer.train()
    assert pm.base_model.is_gradient_checkpointing == gc
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert losses and all(torch.isfinite(torch.tensor(x)) for x in losses)
    assert any(not torch.equal(before[n], p) for n, p in prefix_of(pm).items())


@pytest.mark.parametrize("make,data", [(llama, lm_data), (lambda: bert("seq"), seq_data)], ids=["causal", "seq"])
def test_gradient_accumulation_equals_the_large_batch(tmp_path, make, data):
    from transformers import Trainer

    base = make()
    results = []
    for bs, acc in ((4, 1), (2, 2)):
        pm = wrap(fresh(base))
        a = args(tmp_path / f"{bs}", max_steps=2, per_device_train_batch_size=bs, gradient_accumulation_steps=acc,
                 learning_rate=0.1, optim="sgd")
        Trainer(model=pm, args=a, train_dataset=data()).train()
        results.append(prefix_of(pm))
    moved = prefix_of(wrap(fresh(base)))
    for n, p in results[0].items():
        assert not torch.equal(p, moved[n])
        torch.testing.assert_close(results[1][n], p, rtol=1e-5, atol=1e-6, msg=n)


# ------------------------------------------------------------------------------------------ prefix reuse


def test_generate_runs_the_prefix_encoder_once_and_an_optimizer_step_is_seen():
    pm = wrap(llama())
    calls = []
    pm.prefix_encoder.register_forward_hook(lambda *a: calls.append(1))
    ids = tokens(2, 5)
    out = pm.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False)
    assert out.shape[1] == 9 and len(calls) == 1
    with torch.no_grad():
        logits0 = pm(input_ids=ids).logits
    assert len(calls) == 1

    pm.train()
    opt = torch.optim.SGD([p for p in pm.parameters() if p.requires_grad], lr=1.0)
    pm(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    pm.eval()
    with torch.no_grad():
        logits1 = pm(input_ids=ids).logits
    assert len(calls) == 3  # the training call, then the new parameters
    assert not torch.allclose(logits1, logits0)
    with torch.no_grad():
        pm.prefix_encoder.embedding.weight.mul_(2.0)
        pm(input_ids=ids)
        pm.prefix_encoder.to(torch.float64)
        pm(input_ids=ids)
    assert len(calls) == 5  # an in-place change, a cast

    dropped = wrap(llama(), prefix_dropout=0.1).train()
    calls.clear()
    dropped.prefix_encoder.register_forward_hook(lambda *a: calls.append(1))
    with torch.no_grad():
        dropped(input_ids=ids)
        dropped(input_ids=ids)
        dropped.eval()
        dropped(input_ids=ids)
        dropped(input_ids=ids)
    assert len(calls) == 3  # dropout in training mode: every call; in eval mode: once


def test_set_attn_implementation_is_refused():
    pm = wrap(llama())
    with pytest.raises(ValueError, match=r"unload\(\)"):
        pm.set_attn_implementation("sdpa")
    assert pm.base_model.config._attn_implementation == "prefix_kernels"
    base = pm.unload()
    base.set_attn_implementation("sdpa")


def test_save_pretrained_takes_the_keywords_trainer_and_peft_pass(tmp_path):
    pm = wrap(llama())
    pm.save_pretrained(tmp_path / "no", state_dict=pm.state_dict(), is_main_process=False)
    assert not (tmp_path / "no").exists()
    pm.save_pretrained(tmp_path / "yes", state_dict=pm.state_dict(), safe_serialization=True,
                       selected_adapters=["default"], is_main_process=True)
    assert (tmp_path / "yes" / "adapter_model.safetensors").is_file()
    loaded = pk.PrefixModel.from_pretrained(llama(), tmp_path / "yes")
    for n, p in pm.prefix_encoder.named_parameters():
        assert torch.equal(dict(loaded.prefix_encoder.named_parameters())[n], p), n


def test_state_dict_loads_across_runtime_settings_only():
    base = llama()
    sd = wrap(fresh(base), prefix_projection=True, encoder_hidden_size=16).state_dict()
    same = wrap(fresh(base), seed=3, prefix_projection=True, encoder_hidden_size=16, prefix_dropout=0.2,
                backend="reference")
    assert same.load_state_dict(sd).missing_keys == []
    for changed in (dict(encoder_hidden_size=16, position_offset=False), dict(encoder_hidden_size=8)):
        other = wrap(fresh(base), prefix_projection=True, **changed)
        with pytest.raises(RuntimeError, match="different PrefixModel"):
            other.load_state_dict(sd)
