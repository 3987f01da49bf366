"""P-Tuning v1: config, prompt encoders, templates with [P] anywhere, verbalizer, generation, save/load/export."""

from __future__ import annotations

import pytest
import torch

from prefix_kernels import PTuningConfig, PTuningModel, PromptEncoder
from tiny_models import VOCAB, bert_mlm, llama

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")

WORDS = ("it was great terrible question answer ? . the movie good bad a is not fun boring yes no "
         "sentiment premise hypothesis review this film").split()
TEMPLATE_MLM = "{sentence} It was [P][P][P] [MASK] ."
TEMPLATE_NLI = "[P][P] {premise} Question: {hypothesis} ? [P] Answer: [MASK]"


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from transformers import BertTokenizer

    d = tmp_path_factory.mktemp("tok")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS + [":"]
    assert len(vocab) <= VOCAB
    (d / "vocab.txt").write_text("\n".join(vocab) + "\n")
    return BertTokenizer(str(d / "vocab.txt"), do_lower_case=True)


EXAMPLES = [{"sentence": "this movie is fun"}, {"sentence": "a boring film"},
            {"sentence": "the film is not good"}, {"sentence": "good"}]
LABELS = torch.tensor([1, 0, 0, 1])


def test_config_counts_virtual_tokens_and_checks_fields():
    c = PTuningConfig(template=TEMPLATE_NLI)
    assert c.num_virtual_tokens == 3 and c.fields == ["premise", "hypothesis"]
    assert c.encoder_reparameterization_type == "lstm"
    with pytest.raises(ValueError, match=r"\[P\]"):
        PTuningConfig(template="{x} [MASK]")
    with pytest.raises(ValueError, match="at most one"):
        PTuningConfig(template="[P] [MASK] [MASK]")
    with pytest.raises(ValueError, match="encoder_reparameterization_type"):
        PTuningConfig(template="[P] {x}", encoder_reparameterization_type="gru")
    assert PTuningConfig.from_dict(c.to_dict()) == c


@pytest.mark.parametrize("kind,names", [
    ("lstm", {"embedding.weight", "lstm_head.weight_ih_l0", "lstm_head.weight_hh_l0_reverse", "mlp_head.0.weight",
              "mlp_head.2.weight"}),
    ("mlp", {"embedding.weight", "mlp_head.0.weight", "mlp_head.2.weight", "mlp_head.4.weight"}),
])
def test_prompt_encoder_reparameterizations(kind, names):
    enc = PromptEncoder(5, 16, reparameterization=kind, hidden_size=8)
    assert names <= set(enc.state_dict())
    out = enc()
    assert out.shape == (5, 16)
    out.sum().backward()
    assert all(p.grad is not None for p in enc.parameters())


def test_template_places_virtual_tokens_between_anchor_words(tokenizer):
    pm = PTuningModel(bert_mlm(), tokenizer, PTuningConfig(template=TEMPLATE_NLI, verbalizer=["no", "yes"]))
    b = pm.encode([{"premise": "the movie is good", "hypothesis": "it is fun"}])
    ids, virt = b["input_ids"][0].tolist(), b["virtual_mask"][0].tolist()
    toks = tokenizer.convert_ids_to_tokens(ids)
    shown = ["[P]" if v else t for t, v in zip(toks, virt)]
    assert shown == ["[CLS]", "[P]", "[P]", "the", "movie", "is", "good", "question", ":", "it", "is", "fun", "?",
                     "[P]", "answer", ":", "[MASK]", "[SEP]"]
    assert b["mask_index"].tolist() == [16]


def test_embed_replaces_virtual_positions_in_order_once_per_step(tokenizer):
    pm = PTuningModel(bert_mlm(), tokenizer, PTuningConfig(template=TEMPLATE_NLI, verbalizer=["no", "yes"]))
    b = pm.encode([{"premise": "good", "hypothesis": "fun"}, {"premise": "a boring film", "hypothesis": "no"}])
    calls = []
    pm.prompt_encoder.register_forward_hook(lambda *a: calls.append(1))
    e = pm.embed(b["input_ids"], b["virtual_mask"])
    assert len(calls) == 1
    prompts = pm.prompt_encoder()
    for r in range(2):
        pos = b["virtual_mask"][r].nonzero().flatten()
        torch.testing.assert_close(e[r, pos], prompts)
    words = pm.base_model.get_input_embeddings()(b["input_ids"])
    keep = ~b["virtual_mask"]
    torch.testing.assert_close(e[keep], words[keep])


@pytest.mark.parametrize("kind", ["lstm", "mlp"])
def test_masked_lm_verbalizer_trains_only_prompt_encoder(tokenizer, kind):
    pm = PTuningModel(bert_mlm(), tokenizer, PTuningConfig(template=TEMPLATE_MLM, verbalizer=["terrible", "great"],
                                                      encoder_reparameterization_type=kind, encoder_hidden_size=16))
    assert {n.split(".")[0] for n, p in pm.named_parameters() if p.requires_grad} == {"prompt_encoder"}
    b = pm.encode(EXAMPLES)
    base = {n: p.clone() for n, p in pm.base_model.named_parameters()}
    opt = torch.optim.Adam([p for p in pm.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(15):
        loss, scores = pm.classify(**b, labels=LABELS)
        assert scores.shape == (4, 2)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss))
    assert losses[-1] < losses[0]
    assert all(torch.equal(p, base[n]) for n, p in pm.base_model.named_parameters())


def test_causal_lm_next_token_classification_and_targets(tokenizer):
    pm = PTuningModel(llama(), tokenizer, PTuningConfig(template="[P] {sentence} [P][P] sentiment :",
                                                        verbalizer=["bad", "good"]))
    b = pm.encode(EXAMPLES)
    assert (b["attention_mask"][:, -1] == 1).all()  # left padded for causal LMs
    loss, scores = pm.classify(**b, labels=LABELS)
    assert scores.shape == (4, 2)
    loss.backward()
    assert pm.prompt_encoder.embedding.weight.grad.abs().sum() > 0
    t = pm.encode(EXAMPLES[:2], targets=["good", "bad"])
    assert (t["labels"] != -100).sum(-1).tolist() == [1, 1]
    assert t["labels"][0, -1] == tokenizer.convert_tokens_to_ids("good")
    pm.zero_grad()
    pm(**t).loss.backward()
    assert pm.prompt_encoder.embedding.weight.grad.abs().sum() > 0


def test_generate_keeps_virtual_tokens_once_equals_full_recompute(tokenizer):
    pm = PTuningModel(llama(), tokenizer, PTuningConfig(template="[P] {sentence} [P][P] sentiment :",
                                                        encoder_reparameterization_type="mlp"))
    with torch.no_grad():
        for p in pm.prompt_encoder.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    pm.base_model.generation_config.eos_token_id = None  # run all steps
    b = pm.encode(EXAMPLES[:3])  # left padded
    n_new = 6
    with torch.no_grad():
        got = pm.generate(**b, max_new_tokens=n_new, do_sample=False, pad_token_id=0)
        # full recompute: re-embed the whole sequence (virtual tokens in the prompt only) at every step
        ids, virt, mask = b["input_ids"], b["virtual_mask"], b["attention_mask"]
        want = []
        for _ in range(n_new):
            pos = (mask.cumsum(-1) - 1).clamp(min=0)
            logits = pm.base_model(inputs_embeds=pm.embed(ids, virt), attention_mask=mask, position_ids=pos,
                                   use_cache=False).logits
            nxt = logits[:, -1].argmax(-1, keepdim=True)
            want.append(nxt)
            ids = torch.cat([ids, nxt], 1)
            virt = torch.cat([virt, torch.zeros_like(nxt, dtype=torch.bool)], 1)
            mask = torch.cat([mask, torch.ones_like(nxt)], 1)
    assert torch.equal(got[:, -n_new:], torch.cat(want, 1))


def test_save_resume_and_export_without_encoder(tokenizer, tmp_path):
    cfg = PTuningConfig(template=TEMPLATE_MLM, verbalizer=["terrible", "great"], encoder_hidden_size=8)
    pm = PTuningModel(bert_mlm(), tokenizer, cfg)
    with torch.no_grad():
        for p in pm.prompt_encoder.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    b = pm.encode(EXAMPLES)
    with torch.no_grad():
        ref = pm.classify(**b)[1]
    pm.save_pretrained(tmp_path / "full")
    resumed = PTuningModel.from_pretrained(bert_mlm(), tokenizer, tmp_path / "full", is_trainable=True)
    assert resumed.prompt_encoder.reparameterization == "lstm"
    for (n, p), (n2, q) in zip(pm.prompt_encoder.state_dict().items(), resumed.prompt_encoder.state_dict().items()):
        assert n == n2 and torch.equal(p, q)
    assert resumed.get_nb_trainable_parameters()[0] == pm.get_nb_trainable_parameters()[0]
    pm.export_merged(tmp_path / "merged")
    assert not (tmp_path / "merged" / "prompt_encoder.safetensors").exists()
    merged = PTuningModel.from_pretrained(bert_mlm(), tokenizer, tmp_path / "merged")
    assert merged.prompt_encoder.reparameterization == "none"
    assert merged.get_nb_trainable_parameters()[0] == 0
    assert sum(p.numel() for p in merged.prompt_encoder.parameters()) == 3 * 32
    with torch.no_grad():
        torch.testing.assert_close(resumed.classify(**b)[1], ref)
        torch.testing.assert_close(merged.classify(**b)[1], ref, rtol=1e-5, atol=1e-5)


def test_bad_inputs(tokenizer):
    with pytest.raises(ValueError, match=r"\[MASK\]"):
        PTuningModel(bert_mlm(), tokenizer, PTuningConfig(template="[P] {sentence}"))
    pm = PTuningModel(bert_mlm(), tokenizer, PTuningConfig(template=TEMPLATE_MLM, verbalizer=["terrible", "great"]))
    with pytest.raises(KeyError, match="sentence"):
        pm.encode([{"text": "good"}])
    b = pm.encode(EXAMPLES[:1])
    with pytest.raises(ValueError, match="exactly 3 virtual"):
        pm.embed(b["input_ids"], torch.zeros_like(b["virtual_mask"]))


@pytest.mark.parametrize("damage", ["truncate-encoder", "bad-json", "wrong-shape"])
def test_corrupt_adapter_is_refused_and_leaves_the_model_untouched(tokenizer, tmp_path, damage):
    from safetensors.torch import load_file, save_file

    cfg = PTuningConfig(template=TEMPLATE_MLM, verbalizer=["terrible", "great"], encoder_hidden_size=8)
    PTuningModel(bert_mlm(), tokenizer, cfg).save_pretrained(tmp_path)
    encoder_file = tmp_path / "prompt_encoder.safetensors"
    if damage == "truncate-encoder":
        encoder_file.write_bytes(encoder_file.read_bytes()[:100])
    elif damage == "bad-json":
        config_file = next(p for p in tmp_path.glob("*.json") if "config" in p.name)
        config_file.write_text(config_file.read_text()[:20])
    else:
        tensors = load_file(str(encoder_file))
        name = next(iter(tensors))
        tensors[name] = torch.zeros(tensors[name].shape[0] + 1, *tensors[name].shape[1:])
        save_file(tensors, str(encoder_file))
    model = bert_mlm()
    before = {n: (p.requires_grad, p.detach().clone()) for n, p in model.named_parameters()}
    words = {"truncate-encoder": "safetensors", "bad-json": "JSON", "wrong-shape": "prompt encoder tensors expected"}
    with pytest.raises(ValueError, match=words[damage]):
        PTuningModel.from_pretrained(model, tokenizer, tmp_path)
    for n, p in model.named_parameters():
        assert p.requires_grad == before[n][0] and torch.equal(p, before[n][1]), n
