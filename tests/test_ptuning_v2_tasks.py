"""P-Tuning v2 task models (sequence / token classification, multi-task) and multi-adapter serving."""

from __future__ import annotations

import pytest
import torch

import prefix_kernels as pk
from prefix_kernels import MultiPrefixModel, PrefixTaskModel
from tiny_models import bert, llama, randomize_prefix, tokens

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")


def bert_base():
    return bert("seq").bert


def llama_base():
    return llama().model


def task_model(backbone, tasks, P=4, dropout=0.0, **kw):
    m = PrefixTaskModel(backbone, pk.PTuningV2Config(num_virtual_tokens=P, prefix_dropout=dropout), tasks, **kw)
    randomize_prefix(m.prefix_model, scale=0.5)
    return m.eval()


def padded(B=3, T=6, seed=0):
    ids = tokens(B, T, seed=seed)
    mask = torch.ones_like(ids)
    mask[1, 4:] = 0
    ids = ids.masked_fill(mask == 0, 0)
    return ids, mask


@pytest.mark.parametrize("pooling", ["cls", "pooler", "mean"])
def test_sequence_classification_trains_only_prefix_and_head(pooling):
    m = task_model(bert_base(), 3, pooling=pooling)
    assert m.pooling == pooling
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert trainable == {"prefix_model.prefix_encoder.embedding.weight", "heads.default.weight", "heads.default.bias"}
    ids, mask = padded()
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2)
    m.train()
    out = m(input_ids=ids, attention_mask=mask, labels=torch.tensor([0, 1, 2]))
    assert out.logits.shape == (3, 3)
    out.loss.backward()
    opt.step()
    changed = {n for n, p in m.named_parameters() if not torch.equal(p.detach(), before[n])}
    assert changed == trainable


def test_default_pooling_cls_for_encoders_last_for_decoders():
    assert task_model(bert_base(), 2).pooling == "cls"
    assert task_model(llama_base(), 2).pooling == "last"


def test_last_token_pooling_left_and_right_padding_agree():
    m = task_model(llama_base(), 2)
    ids = tokens(1, 5)
    right = torch.cat([ids, torch.zeros(1, 2, dtype=torch.long)], 1)
    left = torch.cat([torch.zeros(1, 2, dtype=torch.long), ids], 1)
    mask_r = torch.tensor([[1] * 5 + [0] * 2])
    mask_l = torch.tensor([[0] * 2 + [1] * 5])
    with torch.no_grad():
        a = m(input_ids=ids).logits
        b = m(input_ids=right, attention_mask=mask_r).logits
        c = m(input_ids=left, attention_mask=mask_l).logits
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(c, a, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("make", [bert_base, llama_base], ids=["bert", "llama"])
def test_token_classification_one_label_per_real_token(make):
    m = task_model(make(), {"ner": ("tok", 5)})
    ids, mask = padded()
    labels = torch.randint(0, 5, ids.shape, generator=torch.Generator().manual_seed(0))
    out = m(input_ids=ids, attention_mask=mask, labels=labels)
    assert out.logits.shape == (3, 6, 5)  # real positions only: the prefix produces no label
    other = labels.clone()
    other[1, 4:] = (other[1, 4:] + 1) % 5  # labels on padding are ignored
    out2 = m(input_ids=ids, attention_mask=mask, labels=other)
    torch.testing.assert_close(out2.loss, out.loss)
    keep = mask.bool()
    ref = torch.nn.functional.cross_entropy(out.logits[keep], labels[keep])
    torch.testing.assert_close(out.loss, ref)


def test_multi_task_mixed_batch_matches_separate_batches():
    m = task_model(bert_base(), {"sst": 2, "mnli": 3, "ner": ("tok", 4)})
    ids, mask = padded(B=5, seed=3)
    mask[3, 5:] = 0
    task_ids = torch.tensor([1, 0, 2, 1, 0])
    with torch.no_grad():
        out = m(input_ids=ids, attention_mask=mask, task_ids=task_ids)
    assert set(out.logits) == {"sst", "mnli", "ner"}
    for name, t in [("sst", 0), ("mnli", 1), ("ner", 2)]:
        rows = (task_ids == t).nonzero(as_tuple=True)[0]
        torch.testing.assert_close(out.rows[name], rows)
        with torch.no_grad():
            alone = m(input_ids=ids[rows], attention_mask=mask[rows], task=name).logits
        torch.testing.assert_close(out.logits[name], alone, rtol=1e-5, atol=1e-5)


def test_multi_task_loss_weights_rows_equally():
    m = task_model(bert_base(), {"a": 2, "b": 3})
    ids, mask = padded(B=3)
    labels = torch.tensor([1, 2, 0])
    with torch.no_grad():
        out = m(input_ids=ids, attention_mask=mask, task_ids=torch.tensor([0, 1, 0]), labels=labels)
        la = m(input_ids=ids[[0, 2]], attention_mask=mask[[0, 2]], task="a", labels=labels[[0, 2]]).loss
        lb = m(input_ids=ids[[1]], attention_mask=mask[[1]], task="b", labels=labels[[1]]).loss
    torch.testing.assert_close(out.loss, (2 * la + lb) / 3)


def test_multi_task_gradients_reach_shared_prefix_and_own_heads():
    m = task_model(bert_base(), {"a": 2, "b": 3})
    ids, mask = padded(B=3)
    out = m(input_ids=ids, attention_mask=mask, task_ids=torch.tensor([0, 0, 0]), labels=torch.tensor([1, 0, 1]))
    out.loss.backward()
    assert m.prefix_model.prefix_encoder.embedding.weight.grad.abs().sum() > 0
    assert m.heads["a"].weight.grad.abs().sum() > 0
    assert m.heads["b"].weight.grad is None


def test_prefix_dropout_once_per_step_shared_by_rows():
    m = task_model(bert_base(), 2, dropout=0.5)
    m.dropout.p = 0.0
    m.train()
    ids = tokens(1, 6).expand(4, 6)
    torch.manual_seed(0)
    out = m(input_ids=ids).logits
    for r in range(1, 4):  # the same dropped prefix for every row of the step
        torch.testing.assert_close(out[r], out[0])
    m.eval()
    a = m(input_ids=ids[:1]).logits
    torch.manual_seed(1)
    m.train()
    assert not torch.allclose(m(input_ids=ids[:1]).logits, a)


def test_task_model_save_load_roundtrip(tmp_path):
    m = task_model(bert_base(), {"a": 2, "ner": ("tok", 3)}, pooling="mean")
    with torch.no_grad():
        for p in m.heads.parameters():
            p.add_(0.3)
    ids, mask = padded()
    with torch.no_grad():
        ref = m(input_ids=ids, attention_mask=mask, task="a").logits
    m.save_pretrained(tmp_path)
    m2 = PrefixTaskModel.from_pretrained(bert_base(), tmp_path).eval()
    assert m2.pooling == "mean" and m2.tasks == m.tasks
    with torch.no_grad():
        got = m2(input_ids=ids, attention_mask=mask, task="a").logits
    torch.testing.assert_close(got, ref)
    assert m2.get_nb_trainable_parameters()[0] == 0
    m3 = PrefixTaskModel.from_pretrained(bert_base(), tmp_path, is_trainable=True)
    assert m3.get_nb_trainable_parameters()[0] == m.get_nb_trainable_parameters()[0]


def test_bad_task_arguments():
    m = task_model(bert_base(), {"a": 2, "b": 2})
    ids, _ = padded()
    with pytest.raises(ValueError, match="task="):
        m(input_ids=ids)
    with pytest.raises(ValueError, match="task_ids"):
        m(input_ids=ids, task_ids=torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="kind"):
        PrefixTaskModel(bert_base(), pk.PTuningV2Config(num_virtual_tokens=2), {"x": ("span", 2)})


# ------------------------------------------------------------------ several prefixes in one batch
def _adapters(tmp_path, n=3):
    dirs = {}
    for i in range(n):
        pm = randomize_prefix(pk.get_prefix_model(llama(), pk.PrefixTuningConfig(num_virtual_tokens=3)),
                              seed=10 + i, scale=0.7)
        pm.save_pretrained(tmp_path / f"a{i}")
        dirs[f"a{i}"] = tmp_path / f"a{i}"
    return dirs


def test_prefix_index_serves_several_adapters_in_one_batch(tmp_path):
    dirs = _adapters(tmp_path)
    server = MultiPrefixModel.from_pretrained(llama(), dirs)
    ids, mask = padded(B=4, seed=5)
    names = ["a2", "a0", "a1", "a2"]
    with torch.no_grad():
        got = server(input_ids=ids, attention_mask=mask, adapter_names=names).logits
        got_idx = server(input_ids=ids, attention_mask=mask, prefix_index=torch.tensor([2, 0, 1, 2])).logits
    torch.testing.assert_close(got_idx, got)
    for r, name in enumerate(names):
        single = pk.PrefixModel.from_pretrained(llama(), dirs[name])
        with torch.no_grad():
            want = single(input_ids=ids[r:r + 1], attention_mask=mask[r:r + 1]).logits
        keep = mask[r].bool()
        torch.testing.assert_close(got[r][keep], want[0][keep], rtol=1e-4, atol=1e-5)
    # one bank, laid out once: [layers, 2, T, Hkv, P, D]
    assert tuple(server.prefix_bank.shape) == (2, 2, 3, 2, 3, 16)
    assert sum(p.numel() for p in server.parameters() if p.requires_grad) == 0


def test_prefix_index_generate_matches_single_adapters(tmp_path):
    dirs = _adapters(tmp_path, n=2)
    server = MultiPrefixModel.from_pretrained(llama(), dirs)
    ids = tokens(2, 5, seed=7)
    out = server.generate(input_ids=ids, attention_mask=torch.ones_like(ids), adapter_names=["a1", "a0"],
                          max_new_tokens=4, do_sample=False, pad_token_id=0)
    for r, name in enumerate(["a1", "a0"]):
        single = pk.PrefixModel.from_pretrained(llama(), dirs[name])
        want = single.generate(input_ids=ids[r:r + 1], attention_mask=torch.ones_like(ids[r:r + 1]),
                               max_new_tokens=4, do_sample=False, pad_token_id=0)
        assert torch.equal(out[r], want[0])
    base = server.unload()
    assert base.config._attn_implementation != "prefix_kernels_multi"


def test_prefix_index_errors(tmp_path):
    dirs = _adapters(tmp_path, n=2)
    server = MultiPrefixModel.from_pretrained(llama(), dirs)
    ids = tokens(2, 4)
    with pytest.raises(ValueError, match="unknown adapter"):
        server(input_ids=ids, adapter_names=["a0", "zz"])
    with pytest.raises(ValueError, match="exactly one"):
        server(input_ids=ids)
    with pytest.raises(ValueError, match=r"in \[0, 2\)"):
        server(input_ids=ids, prefix_index=[0, 2])
    with pytest.raises(TypeError, match="prefix_index must hold integers"):
        server(input_ids=ids, prefix_index=[0.5, 1])
    with pytest.raises(ValueError, match="at least one adapter"):
        MultiPrefixModel.from_pretrained(llama(), {})
    with pytest.raises(NotImplementedError, match="dynamic caches only"):
        server.generate(input_ids=ids, adapter_names=["a0", "a1"], max_new_tokens=2, cache_implementation="static")


def test_task_model_from_a_folder_without_its_task_config(tmp_path):
    from prefix_kernels.methods.adapter_io import TASK_CONFIG

    model = PrefixTaskModel(bert_base(), pk.PTuningV2Config(num_virtual_tokens=3), {"sst2": 2})
    model.save_pretrained(tmp_path)
    (tmp_path / TASK_CONFIG).unlink()
    backbone = bert_base()
    with pytest.raises(FileNotFoundError, match=f"adapter file .*{TASK_CONFIG} does not exist"):
        PrefixTaskModel.from_pretrained(backbone, tmp_path)
    assert getattr(backbone, "_prefix_kernels_model", None) is None  # untouched


def test_bank_save_pretrained_round_trip(tmp_path):
    """A saved bank loads back with the same adapters in the same order and gives identical logits per row;
    each of its sub-folders is a prefix adapter that `PrefixModel.from_pretrained` loads."""
    import json

    dirs = _adapters(tmp_path, n=3)
    server = MultiPrefixModel.from_pretrained(llama(), {"a/2": dirs["a2"], "a0": dirs["a0"], "a1": dirs["a1"]})
    server.save_pretrained(tmp_path / "bank")
    index = json.loads((tmp_path / "bank" / "prefix_bank.json").read_text())
    assert [a["name"] for a in index["adapters"]] == ["a/2", "a0", "a1"]
    assert [a["path"] for a in index["adapters"]] == ["adapter_0", "a0", "a1"]  # "a/2" is no folder name

    loaded = MultiPrefixModel.from_pretrained(llama(), tmp_path / "bank")
    assert loaded.adapter_names == server.adapter_names
    assert torch.equal(loaded.merged_prompt_embeddings(), server.merged_prompt_embeddings())
    ids, mask = padded(B=4, seed=5)
    index_rows = torch.tensor([0, 2, 1, 0])
    with torch.no_grad():
        want = server(input_ids=ids, attention_mask=mask, prefix_index=index_rows).logits
        got = loaded(input_ids=ids, attention_mask=mask, prefix_index=index_rows).logits
    assert torch.equal(got, want)

    single = pk.PrefixModel.from_pretrained(llama(), tmp_path / "bank" / "a0")
    original = pk.PrefixModel.from_pretrained(llama(), dirs["a0"])
    with torch.no_grad():
        assert torch.equal(single(input_ids=ids, attention_mask=mask).logits,
                           original(input_ids=ids, attention_mask=mask).logits)
    with pytest.raises(ValueError, match="does not train"):
        MultiPrefixModel.from_pretrained(llama(), tmp_path / "bank", is_trainable=True)
    with pytest.raises(FileNotFoundError, match="prefix_bank.json"):
        MultiPrefixModel.from_pretrained(llama(), dirs["a0"])


def test_bank_builds_no_prefix_encoder_and_rejects_adapters_of_another_model(tmp_path):
    dirs = _adapters(tmp_path, n=2)
    server = MultiPrefixModel.from_pretrained(llama(), dirs)
    assert server.prefix_encoder is None
    assert not any("prefix_encoder" in n for n, _ in server.named_parameters())
    other = pk.get_prefix_model(bert("seq"), pk.PrefixTuningConfig(num_virtual_tokens=3))
    other.save_pretrained(tmp_path / "bert")
    model = llama()
    attn = model.config._attn_implementation
    with pytest.raises(ValueError, match="does not fit this model"):
        MultiPrefixModel.from_pretrained(model, {"a0": dirs["a0"], "bert": tmp_path / "bert"})
    assert model.config._attn_implementation == attn
