"""PEFT's habits on a PrefixModel: disable_adapter / disable_adapters / enable_adapters, merge_and_unload,
from_pretrained with a Hub id (offline, from a hand-made Hub cache), encoder-decoder adapters refused by PEFT."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

import prefix_kernels as pk
from prefix_kernels.methods import adapter_io
from prefix_kernels.methods.peft_compat import PeftCompatMixin
from tiny_models import bart, bert, fresh, gpt2, llama, randomize_prefix, roberta, tokens

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


# PrefixModel itself once it has the mixin among its bases.
_M = (pk.PrefixModel if issubclass(pk.PrefixModel, PeftCompatMixin)
      else type("_M", (PeftCompatMixin, pk.PrefixModel), {}))


def _inputs(model, left_pad=True):
    ids = tokens(2, 7)
    mask = torch.ones_like(ids)
    if left_pad:
        mask[0, :2] = 0
    kw = dict(input_ids=ids, attention_mask=mask)
    if getattr(model.config, "is_encoder_decoder", False):
        kw["decoder_input_ids"] = tokens(2, 5, seed=1)
    return kw


def _logits(model, kw):
    with torch.no_grad():
        return model(**kw).logits


CASES = {"llama": llama, "gpt2": gpt2, "bert": bert, "roberta": roberta, "bart": bart}


@pytest.mark.parametrize("family", list(CASES))
@pytest.mark.parametrize("position_offset", [True, False])
def test_disable_adapter_runs_the_base_model(family, position_offset):
    base = CASES[family]()
    reference = fresh(base)
    pm = randomize_prefix(_M(base, pk.PrefixTuningConfig(num_virtual_tokens=3, position_offset=position_offset)))
    kw = _inputs(base, left_pad=family != "gpt2")
    expected = _logits(reference, kw)
    with_prefix = _logits(pm, kw)
    assert not torch.allclose(with_prefix, expected, atol=1e-3)
    with pm.disable_adapter():
        torch.testing.assert_close(_logits(pm, kw), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(_logits(pm, kw), with_prefix, rtol=0, atol=0)


def test_disable_adapter_restores_the_prefix_on_exceptions():
    pm = randomize_prefix(_M(llama(), pk.PrefixTuningConfig(num_virtual_tokens=3)))
    kw = _inputs(pm.base_model)
    with_prefix = _logits(pm, kw)
    with pytest.raises(KeyError):
        with pm.disable_adapter():
            _logits(pm, kw)
            raise KeyError("boom")
    torch.testing.assert_close(_logits(pm, kw), with_prefix, rtol=0, atol=0)


def test_disable_adapters_and_enable_adapters():
    base = llama()
    reference = fresh(base)
    pm = randomize_prefix(_M(base, pk.PrefixTuningConfig(num_virtual_tokens=3)))
    kw = _inputs(base)
    with_prefix = _logits(pm, kw)
    pm.disable_adapters()
    torch.testing.assert_close(_logits(pm, kw), _logits(reference, kw), rtol=1e-5, atol=1e-5)
    with pm.disable_adapter():  # nests: still disabled after the block
        pass
    torch.testing.assert_close(_logits(pm, kw), _logits(reference, kw), rtol=1e-5, atol=1e-5)
    pm.enable_adapters()
    torch.testing.assert_close(_logits(pm, kw), with_prefix, rtol=0, atol=0)


def test_disabled_training_step_and_generate():
    base = llama()
    reference = fresh(base)
    pm = randomize_prefix(_M(base, pk.PrefixTuningConfig(num_virtual_tokens=3)))
    ids = tokens(2, 6)
    pm.train()
    with pm.disable_adapter():
        loss = pm(input_ids=ids, labels=ids).loss
    assert not loss.requires_grad  # a reference pass: nothing trainable takes part
    pm.eval()
    with pm.disable_adapter():
        ours = pm.generate(input_ids=ids, max_new_tokens=4, do_sample=False)
    torch.testing.assert_close(ours, reference.generate(input_ids=ids, max_new_tokens=4, do_sample=False))
    # the prefix is back: its gradient flows again
    pm.train()
    pm(input_ids=ids, labels=ids).loss.backward()
    assert all(p.grad is not None for p in pm.prefix_encoder.parameters())


def test_merge_and_unload_names_the_alternatives():
    pm = _M(llama(), pk.PrefixTuningConfig(num_virtual_tokens=3))
    with pytest.raises(NotImplementedError) as e:
        pm.merge_and_unload()
    assert "unload()" in str(e.value) and "export_merged(" in str(e.value)


# ---------------------------------------------------------------------------------------------- Hub ids
def _hub_cache(root, repo_id, folder, revision_hash="0123456789abcdef0123456789abcdef01234567"):
    """huggingface_hub's cache layout: models--org--name/refs/main + snapshots/<hash>/<files>."""
    repo = root / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(revision_hash)
    shutil.copytree(folder, repo / "snapshots" / revision_hash)
    return repo / "snapshots" / revision_hash


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    import huggingface_hub.constants as hub_constants

    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))
    return cache


def test_resolve_adapter_dir_reads_the_hub_cache_offline(tmp_path, offline_hub, monkeypatch):
    src = tmp_path / "src"
    src.mkdir()
    (src / "adapter_config.json").write_text("{}")
    snapshot = _hub_cache(offline_hub, "org/my-prefix", src)
    assert adapter_io.resolve_adapter_dir("org/my-prefix").resolve() == snapshot.resolve()
    # a local folder of the same name wins
    monkeypatch.chdir(tmp_path)
    (tmp_path / "org" / "my-prefix").mkdir(parents=True)
    assert adapter_io.resolve_adapter_dir("org/my-prefix").resolve() == (tmp_path / "org" / "my-prefix").resolve()
    with pytest.raises(FileNotFoundError, match="org/not-cached"):
        adapter_io.resolve_adapter_dir("org/not-cached")
    missing = tmp_path / "missing" / "deeper" / "folder"
    assert adapter_io.resolve_adapter_dir(missing) == missing  # not a Hub id: the reader names what is missing
    with pytest.raises(FileNotFoundError, match="must hold adapter_config.json"):
        _M.from_pretrained(llama(), missing)


def test_from_pretrained_takes_a_hub_id(tmp_path, offline_hub):
    pm = randomize_prefix(_M(llama(), pk.PrefixTuningConfig(num_virtual_tokens=3)))
    kw = _inputs(pm.base_model)
    expected = _logits(pm, kw)
    pm.save_pretrained(tmp_path / "adapter")
    _hub_cache(offline_hub, "org/llama-prefix", tmp_path / "adapter")
    loaded = _M.from_pretrained(llama(), "org/llama-prefix")
    torch.testing.assert_close(_logits(loaded, kw), expected, rtol=0, atol=0)
    other_cache = tmp_path / "other"
    _hub_cache(other_cache, "org/llama-prefix", tmp_path / "adapter")
    loaded = _M.from_pretrained(llama(), "org/llama-prefix", cache_dir=other_cache, revision="main")
    torch.testing.assert_close(_logits(loaded, kw), expected, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------- enc-dec adapters
def test_encoder_decoder_adapter_is_refused_by_peft_and_loads_here(tmp_path):
    from peft import PeftModel

    pm = randomize_prefix(_M(bart(), pk.PrefixTuningConfig(num_virtual_tokens=3)))
    kw = _inputs(pm.base_model)
    expected = _logits(pm, kw)
    pm.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["peft_type"] == adapter_io.ENCODER_DECODER_PEFT_TYPE and "PEFT" in cfg["prefix_kernels_note"]
    with pytest.raises(Exception) as e:
        PeftModel.from_pretrained(bart(), tmp_path)
    assert adapter_io.ENCODER_DECODER_PEFT_TYPE in str(e.value)
    loaded = _M.from_pretrained(bart(), tmp_path)
    torch.testing.assert_close(_logits(loaded, kw), expected, rtol=0, atol=0)


def test_decoder_only_adapter_still_loads_in_peft(tmp_path):
    from peft import PeftModel

    pm = _M(llama(), pk.PrefixTuningConfig(num_virtual_tokens=3))
    pm.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["peft_type"] == "PREFIX_TUNING"
    PeftModel.from_pretrained(llama(), tmp_path)
