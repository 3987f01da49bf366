"""Adapter files: only safetensors and JSON are read (never pickle); a truncated or corrupted file, a wrong
shape or dtype, or a config for another model gives a clear error and leaves the model exactly as it was
(nothing half-loaded); two models with different prefixes in one process do not interfere."""

from __future__ import annotations

import json
import pickle
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import prefix_kernels as pk
from prefix_kernels.methods import adapter_io
from tiny_models import bert, llama, randomize_prefix, tokens

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


class Snapshot:
    """Everything loading could touch: weights (bitwise), requires_grad, attention implementation, hooks."""

    def __init__(self, model):
        self.model = model
        self.state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        self.grad = {n: p.requires_grad for n, p in model.named_parameters()}
        self.attn = model.config._attn_implementation

    def assert_untouched(self):
        m = self.model
        assert m.config._attn_implementation == self.attn
        assert {n: p.requires_grad for n, p in m.named_parameters()} == self.grad
        now = m.state_dict()
        assert now.keys() == self.state.keys()
        for k, v in self.state.items():
            assert torch.equal(now[k], v), k
        assert not any(mod._forward_pre_hooks or mod._forward_hooks for mod in m.modules())
        assert not any(hasattr(mod, "_prefix_kernels") for mod in m.modules())
        assert not hasattr(m, "_prefix_kernels_model")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A BERT classifier adapter (MLP prefix + trained classifier head), saved with the full training state."""
    d = tmp_path_factory.mktemp("adapter")
    pm = pk.get_prefix_model(bert(), pk.PrefixTuningConfig(num_virtual_tokens=3, prefix_projection=True))
    randomize_prefix(pm, seed=3, scale=0.5)
    with torch.no_grad():
        pm.base_model.classifier.weight.add_(1.0)
    pm.save_pretrained(d)
    return d


@pytest.fixture
def copy_of(saved, tmp_path):
    def make():
        d = tmp_path / "copy"
        shutil.copytree(saved, d)
        return d
    return make


@pytest.fixture
def no_pickle(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("pickle was used to read an adapter")

    for mod, name in [(pickle, "load"), (pickle, "loads"), (torch, "load")]:
        monkeypatch.setattr(mod, name, refuse)


def test_files_are_json_and_safetensors_and_load_without_pickle(saved, no_pickle):
    assert sorted(p.suffix for p in saved.iterdir()) == [".json", ".json", ".safetensors", ".safetensors"]
    model = bert()
    pm = pk.PrefixModel.from_pretrained(model, saved)
    ids = tokens(2, 6)
    assert torch.isfinite(pm(input_ids=ids).logits).all()
    want = load_file(str(saved / "adapter_model.safetensors"))["prompt_embeddings"]
    torch.testing.assert_close(pm.merged_prompt_embeddings(), want)


def test_pickle_files_are_never_read(tmp_path, saved, no_pickle):
    """A directory with PEFT's old pickle weights (adapter_model.bin) only: refused, the .bin never opened."""
    shutil.copy(saved / "adapter_config.json", tmp_path / "adapter_config.json")
    (tmp_path / "adapter_model.bin").write_bytes(b"not opened")
    model = bert()
    snap = Snapshot(model)
    with pytest.raises(FileNotFoundError, match="adapter_model.safetensors"):
        pk.PrefixModel.from_pretrained(model, tmp_path)
    snap.assert_untouched()


def _truncate(name):
    def f(d):
        data = (d / name).read_bytes()
        (d / name).write_bytes(data[: len(data) // 2])
    return f


def _garbage(name):
    def f(d):
        (d / name).write_bytes(b"\x00\xff" * 40)
    return f


def _edit_json(name, change):
    def f(d):
        data = json.loads((d / name).read_text())
        change(data)
        (d / name).write_text(json.dumps(data))
    return f


def _edit_tensors(name, change):
    def f(d):
        tensors = load_file(str(d / name))
        change(tensors)
        save_file(tensors, str(d / name))
    return f


def _set(key, value):
    def f(t):
        t[key] = value(t[key]) if callable(value) else value
    return f


CORRUPTIONS = [
    # (id, corruption, exception, message excerpt)
    ("truncated-weights", _truncate("adapter_model.safetensors"), ValueError,
     "adapter_model.safetensors is not a readable safetensors file"),
    ("truncated-state", _truncate("prefix_kernels_state.safetensors"), ValueError,
     "prefix_kernels_state.safetensors is not a readable safetensors file"),
    ("garbage-weights", _garbage("adapter_model.safetensors"), ValueError, "truncated or corrupted"),
    ("truncated-adapter-config", _truncate("adapter_config.json"), ValueError,
     "adapter_config.json is not valid JSON"),
    ("truncated-our-config", _truncate("prefix_kernels_config.json"), ValueError,
     "prefix_kernels_config.json is not valid JSON"),
    ("binary-config", _garbage("adapter_config.json"), ValueError, "not valid JSON"),
    ("config-not-an-object", lambda d: (d / "adapter_config.json").write_text("[1, 2]"), ValueError,
     "must hold a JSON object, got list"),
    ("config-missing-field", _edit_json("adapter_config.json", lambda c: c.pop("num_layers")), ValueError,
     "missing the field 'num_layers'"),
    ("config-field-type", _edit_json("adapter_config.json", lambda c: c.update(token_dim="wide")), ValueError,
     "field 'token_dim' must be int"),
    ("wrong-peft-type", _edit_json("adapter_config.json", lambda c: c.update(peft_type="LORA")), ValueError,
     "peft_type expected 'PREFIX_TUNING', got 'LORA'"),
    ("other-model-layers", _edit_json("adapter_config.json", lambda c: c.update(num_layers=5)), ValueError,
     "num_layers expected 2, got 5"),
    ("other-model-heads", _edit_json("adapter_config.json", lambda c: c.update(num_attention_heads=8)),
     ValueError, "num_attention_heads (KV heads) expected 4, got 8"),
    ("other-model-groups", _edit_json("prefix_kernels_config.json", lambda c: c.update(groups=[[0, 1, 2]])),
     ValueError, "attention layers per stack"),
    ("our-config-bad-value",
     _edit_json("prefix_kernels_config.json", lambda c: c["config"].update(num_virtual_tokens="3")), TypeError,
     "num_virtual_tokens must be an int, got str"),
    ("our-config-missing", _edit_json("prefix_kernels_config.json", lambda c: c.pop("config")), ValueError,
     "must hold the fields 'config'"),
    ("virtual-tokens-disagree", _edit_json("adapter_config.json", lambda c: c.update(num_virtual_tokens=4)),
     ValueError, "prompt_embeddings shape"),
    ("weights-int-dtype", _edit_tensors("adapter_model.safetensors", _set("prompt_embeddings", lambda t: t.long())),
     TypeError, "'prompt_embeddings' must be floating point, got torch.int64"),
    ("state-int-dtype", _edit_tensors("prefix_kernels_state.safetensors",
                                      _set("prefix_encoder.embedding.weight", lambda t: t.to(torch.int32))),
     TypeError, "'prefix_encoder.embedding.weight' must be floating point, got torch.int32"),
    ("weights-wrong-shape", _edit_tensors("adapter_model.safetensors", _set("prompt_embeddings", torch.zeros(3, 7))),
     ValueError, "expected (3, 256), got (3, 7)"),
    ("weights-missing-key",
     _edit_tensors("adapter_model.safetensors", lambda t: t.update(x=t.pop("prompt_embeddings"))),
     ValueError, "must hold 'prompt_embeddings'"),
    ("encoder-wrong-shape", _edit_tensors("prefix_kernels_state.safetensors",
                                          _set("prefix_encoder.transform.0.weight", torch.zeros(5, 5))),
     ValueError, "prefix encoder tensors"),
    ("head-wrong-shape", _edit_tensors("prefix_kernels_state.safetensors",
                                       _set("base_model.classifier.weight", torch.zeros(2, 64))),
     ValueError, "shape of classifier.weight expected (3, 64), got (2, 64)"),
    ("head-unknown", _edit_tensors("prefix_kernels_state.safetensors", _set("base_model.pooler.extra", torch.zeros(3))),
     ValueError, "head weight expected a parameter of the model, got pooler.extra"),
]


@pytest.mark.parametrize("corrupt,exc,words", [c[1:] for c in CORRUPTIONS], ids=[c[0] for c in CORRUPTIONS])
def test_bad_file_gives_a_clear_error_and_leaves_the_model_untouched(saved, copy_of, corrupt, exc, words, no_pickle):
    d = copy_of()
    corrupt(d)
    model = bert()
    snap = Snapshot(model)
    with pytest.raises(exc) as info:
        pk.PrefixModel.from_pretrained(model, d, is_trainable=True)
    assert words in str(info.value), str(info.value)
    snap.assert_untouched()
    # the model is still usable, and the intact adapter still loads onto it
    pk.PrefixModel.from_pretrained(model, saved, is_trainable=True)


def test_failure_while_applying_rolls_everything_back(saved, monkeypatch):
    """A failure after the model was patched (here: the second head tensor cannot be moved) restores the
    head weights already copied and removes the patch."""

    class Boom(torch.Tensor):
        def to(self, *args, **kwargs):
            raise RuntimeError("simulated failure while copying a head tensor")

    original = adapter_io.read_safetensors

    def flaky(path):
        tensors = original(path)
        if path.name == adapter_io.PREFIX_KERNELS_STATE:
            heads = [k for k in tensors if k.startswith("base_model.")]
            assert len(heads) == 2
            tensors[heads[-1]] = tensors[heads[-1]].as_subclass(Boom)
        return tensors

    monkeypatch.setattr(adapter_io, "read_safetensors", flaky)
    model = bert()
    snap = Snapshot(model)
    with pytest.raises(RuntimeError, match="simulated failure"):
        pk.PrefixModel.from_pretrained(model, saved)
    snap.assert_untouched()
    monkeypatch.undo()
    pm = pk.PrefixModel.from_pretrained(model, saved)  # and it loads cleanly afterwards
    assert pm.base_model is model


# ---- no shared mutable state -----------------------------------------------------------------------------


def test_two_models_with_different_prefixes_do_not_interfere():
    ids = tokens(2, 7)
    a = randomize_prefix(pk.get_prefix_model(llama(), pk.PrefixTuningConfig(num_virtual_tokens=3)), seed=1)
    b = randomize_prefix(pk.get_prefix_model(llama(), pk.PrefixTuningConfig(num_virtual_tokens=5,
                                                                            prefix_projection=True)), seed=2)
    with torch.no_grad():
        alone_a = a(input_ids=ids).logits
        alone_b = b(input_ids=ids).logits
    assert not torch.allclose(alone_a, alone_b)
    # interleaved calls, a training step on b: a is unaffected, b's own results are its own
    with torch.no_grad():
        for _ in range(2):
            assert torch.equal(a(input_ids=ids).logits, alone_a)
            assert torch.equal(b(input_ids=ids).logits, alone_b)
    before = [p.detach().clone() for p in a.prefix_encoder.parameters()]
    loss = b(input_ids=ids, labels=ids).loss
    a_out = a(input_ids=ids).logits  # a forward of a between b's forward and backward
    loss.backward()
    assert all(p.grad is None for p in a.prefix_encoder.parameters())
    assert all(p.grad is not None for p in b.prefix_encoder.parameters())
    assert torch.equal(a_out.detach(), alone_a)
    for p, q in zip(before, a.prefix_encoder.parameters()):
        assert torch.equal(p, q)
    # generation with one model does not leak its prefix into the other
    a.generate(input_ids=ids[:1], max_new_tokens=3, do_sample=False)
    with torch.no_grad():
        assert torch.equal(b(input_ids=ids).logits, alone_b)


def test_one_adapter_loaded_twice_gives_independent_models(saved):
    m1 = pk.PrefixModel.from_pretrained(bert(), saved, is_trainable=True)
    m2 = pk.PrefixModel.from_pretrained(bert(), saved, is_trainable=True)
    ids = tokens(2, 6)
    with torch.no_grad():
        base2 = m2(input_ids=ids).logits
        for p in m1.prefix_encoder.parameters():
            p.add_(1.0)
        m1.base_model.classifier.weight.zero_()
        assert torch.equal(m2(input_ids=ids).logits, base2)
        assert not torch.equal(m1(input_ids=ids).logits, base2)
    for p1, p2 in zip(m1.prefix_encoder.parameters(), m2.prefix_encoder.parameters()):
        assert p1.data_ptr() != p2.data_ptr()
