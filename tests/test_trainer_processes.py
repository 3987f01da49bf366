"""transformers.Trainer with several processes: a wrapped tiny Llama trained under `torchrun` and under
`accelerate launch` (2 CPU processes, gloo) ends with the same prefix as one process on the whole batch, and the
checkpoint the main process writes loads with `PrefixModel.from_pretrained`. TRL's SFTTrainer on a wrapped
model (only where trl is installed).

The launched script is tests/trainer_worker.py; the one-process run calls the same function in this process."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import prefix_kernels as pk
import trainer_worker as worker
from tiny_models import VOCAB, llama, tokens

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")]

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
WORLD = 2
PER_DEVICE = 4
LAUNCH_TIMEOUT = 120
META = "prefix_kernels_meta"
OPTIMS = ("sgd", "adamw_torch")
# SGD: the update is linear in the gradient, so only fp32 rounding separates the runs (measured ~1.5e-8).
# AdamW divides by sqrt(v): an element whose gradient is small against its history turns a 1e-7 relative
# difference of the gradient into a larger one of the update (measured 2.2e-5 on one element out of 5,408,
# with the prefix moved by 3e-2).
BOUND = {"sgd": 1e-5, "adamw_torch": 1e-4}


def launch(cmd: list[str], hf_home: Path) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1",
               # an accelerate default_config.yaml in the user's cache would override the command line
               HF_HOME=str(hf_home))
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"{' '.join(cmd)} ran past {LAUNCH_TIMEOUT} s\n{e.stdout}\n{e.stderr}")
    if proc.returncode != 0:
        pytest.fail(f"{' '.join(cmd)} exited {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}\n"
                    f"--- stderr\n{proc.stderr[-8000:]}")


def ranks(out_dir: Path) -> list[dict]:
    files = sorted(out_dir.glob("rank*.pt"))
    assert [f.name for f in files] == [f"rank{r}.pt" for r in range(WORLD)], files
    return [torch.load(f, weights_only=False) for f in files]


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """One process, batch WORLD * PER_DEVICE, per optimizer (computed on first use)."""
    cache = {}

    def get(optim: str) -> dict:
        if optim not in cache:
            threads = torch.get_num_threads()
            torch.set_num_threads(1)  # as in the launched processes
            try:
                cache[optim] = worker.run(str(tmp_path_factory.mktemp(f"single-{optim}")), WORLD * PER_DEVICE, optim)
            finally:
                torch.set_num_threads(threads)
        return cache[optim]

    return get


def check_against_single(out_dir: Path, one: dict, label: str, bound: float) -> None:
    rs = ranks(out_dir)
    for r in rs:
        # the Trainer really ran data-parallel: gloo process group, the wrapped model inside DDP
        assert (r["world_size"], r["parallel_mode"], r["backend"]) == (WORLD, "ParallelMode.DISTRIBUTED", "gloo")
        assert r["wrapped"] == "DistributedDataParallel" and r["model_is_pm"]
        assert r["global_step"] == worker.STEPS
        assert all(n.startswith("prefix_encoder.") for n in r["trainable"]) and r["trainable"]
    assert (one["world_size"], one["wrapped"]) == (1, "PrefixModel")
    # each process trained on its half of the rows the single process took in the same step
    for step in range(worker.STEPS):
        halves = [r["rows"][step] for r in rs]
        assert all(len(h) == PER_DEVICE for h in halves)
        assert sorted(halves[0] + halves[1]) == sorted(one["rows"][step]), (step, halves, one["rows"][step])
    assert max_diff(rs[0]["start"], one["start"]) == 0.0
    assert max_diff(rs[0]["prefix"], rs[1]["prefix"]) == 0.0  # DDP keeps the replicas bit for bit equal
    moved = max_diff(one["start"], one["prefix"])
    assert moved > 1e-3  # the steps really changed the prefix
    diff = max_diff(rs[0]["prefix"], one["prefix"])
    print(f"{label}: 2 x {PER_DEVICE} rows vs 1 x {WORLD * PER_DEVICE} rows, {worker.STEPS} steps: "
          f"max |diff| of the prefix = {diff:.3e} (prefix moved by {moved:.3e})")
    assert diff < bound
    # the logged loss is the mean over the processes: the whole batch's loss
    assert len(rs[0]["losses"]) == len(one["losses"]) == worker.STEPS
    for a, b in zip(rs[0]["losses"], one["losses"]):
        assert abs(a - b) < 1e-5

    ckpt = out_dir / f"checkpoint-{worker.STEPS}"
    keys = set(load_file(str(ckpt / "model.safetensors")))
    assert keys == {META} | {f"prefix_encoder.{n}" for n in rs[0]["prefix"]}  # the adapter, not the base model
    loaded = pk.PrefixModel.from_pretrained(llama(), ckpt)
    got = worker.prefix_params(loaded)
    assert max_diff(got, rs[0]["prefix"]) == 0.0
    assert max_diff(got, one["prefix"]) < bound


def check_launch(out: Path, single, launcher: str) -> None:
    for optim in OPTIMS:
        check_against_single(out / optim, single(optim), f"Trainer + {launcher}, {optim}", BOUND[optim])


def test_trainer_under_torchrun_equals_one_process_on_the_whole_batch(tmp_path, single):
    out = tmp_path / "out"
    out.mkdir()
    launch([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(WORLD), "--standalone",
            str(TESTS / "trainer_worker.py"), str(out), str(PER_DEVICE), ",".join(OPTIMS)], tmp_path / "hf")
    check_launch(out, single, "torchrun")


def test_trainer_under_accelerate_launch_equals_one_process_on_the_whole_batch(tmp_path, single):
    # accelerate 1.x: `--cpu --num_processes 2` starts ONE process unless mpirun is given a hostfile; the
    # torchrun-based launcher behind `--multi_gpu` starts the 2 processes, which run on CPU/gloo because the
    # script's TrainingArguments say use_cpu=True.
    out = tmp_path / "out"
    out.mkdir()
    launch([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(WORLD),
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
            str(TESTS / "trainer_worker.py"), str(out), str(PER_DEVICE), ",".join(OPTIMS)], tmp_path / "hf")
    check_launch(out, single, "accelerate launch")


# ------------------------------------------------------------------------------------------ TRL

HAS_TRL = importlib.util.find_spec("trl") is not None
needs_trl = pytest.mark.skipif(not HAS_TRL, reason="trl is not installed")


def sft_setup(tmp_path):
    from datasets import Dataset
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from trl import SFTConfig

    # a word-level tokenizer over the tiny model's vocabulary: w3 ... w127 are token ids 3 ... 127
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, VOCAB)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", bos_token="<s>")
    texts = [" ".join(f"w{int(t)}" for t in tokens(1, 4 + i % 5, seed=i)[0]) for i in range(8)]
    args = SFTConfig(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4, learning_rate=1e-2,
                     use_cpu=True, report_to=[], save_strategy="no", logging_steps=1, disable_tqdm=True,
                     dataloader_num_workers=0)
    pm = worker.build()
    return pm, args, Dataset.from_dict({"text": texts}), tokenizer


def use_fused_head_inside(pm, own_forward) -> None:
    """SFTTrainer replaces the forward of the model it is given with its fused LM head, which calls
    `model.base_model` as the decoder backbone; for a PrefixModel that is the whole causal LM. Give the wrapper
    its own forward back and put the fused head on the causal LM inside, whose forward the prefix hooks."""
    from trl.trainer import add_fused_lm_head

    pm.forward = own_forward
    add_fused_lm_head(pm.base_model, outputs=("log_probs", "entropy", "is_top1"))


@needs_trl
def test_sft_trainer_as_is_fails_on_the_fused_lm_head(tmp_path):
    """Pins the current incompatibility (trl 1.16): if it goes away, drop the workaround from the docs."""
    from trl import SFTTrainer

    pm, args, ds, tokenizer = sft_setup(tmp_path)
    trainer = SFTTrainer(model=pm, args=args, train_dataset=ds, processing_class=tokenizer)
    with pytest.raises(AttributeError, match="last_hidden_state"):
        trainer.train()


@needs_trl
def test_sft_trainer_trains_a_wrapped_model_with_the_fused_head_inside(tmp_path):
    from trl import SFTTrainer

    pm, args, ds, tokenizer = sft_setup(tmp_path)
    own_forward = pm.forward
    trainer = SFTTrainer(model=pm, args=args, train_dataset=ds, processing_class=tokenizer)
    assert trainer.model is pm
    use_fused_head_inside(pm, own_forward)
    start = worker.prefix_params(pm)
    trainer.train()
    assert trainer.state.global_step == 2
    assert all(n.startswith("prefix_encoder.") for n, p in pm.named_parameters() if p.requires_grad)
    moved = max_diff(start, worker.prefix_params(pm))
    assert moved > 1e-4

    # TRL's fused loss is the wrapped model's own loss: the prefix is in it
    ids = tokens(2, 7, seed=50)
    with torch.no_grad():
        fused = pm(input_ids=ids, labels=ids, fused_lm_head=True).loss
        plain = pm(input_ids=ids, labels=ids).loss
        with pm.disable_adapter():
            base = pm(input_ids=ids, labels=ids).loss
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-5)
    assert abs(fused.item() - base.item()) > 1e-4

    trainer.save_model(str(tmp_path / "final"))
    loaded = pk.PrefixModel.from_pretrained(llama(), tmp_path / "final")
    assert max_diff(worker.prefix_params(loaded), worker.prefix_params(pm)) == 0.0
