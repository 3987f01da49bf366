"""End to end: training step time, tokens/s and peak memory of prefix-tuned models with this library against
Hugging Face PEFT prefix tuning (same prefix values, same data), and generation throughput with a shared
prefix.

    python benchmarks/e2e.py [--device cpu|cuda] [--steps N] [--quick] [--out DIR]

Models are built from configs (random weights; no download): a Llama-like causal LM (GQA, RoPE) and a
BERT-like encoder with a classification head (P-Tuning v2 NLU). Methods, measured side by side, step by step
alternating, in one process:

- `prefix_kernels`: `get_prefix_model` with the fastest backend for the device;
- `prefix_kernels[reference]`: the same wrapper with the `reference` backend (expand + cat + softmax inside
  the fused-op slot: PEFT's arithmetic without PEFT's wrapper);
- `peft`: `peft.get_peft_model(PrefixTuningConfig)` with the prefix copied from ours, on the model's default
  attention (sdpa). Where PEFT fails (on transformers 5 it refuses sequence classification with a prefix),
  the error is reported instead of a time.

Generation: greedy `generate` throughput (new tokens/s) of ours against the base model without a prefix;
PEFT's `generate` on transformers 5 ignores the prefix, which this script checks (two different prefixes give
the same tokens) and reports instead of a throughput. Appends to <out>/e2e.csv and writes <out>/e2e_<device>.md.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
import warnings

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (  # noqa: E402
    append_csv, git_commit, machine_description, markdown_table, peak_memory_mib, progress,
    results_dir, synchronize, time_side_by_side, utc_stamp, versions,
)

import torch  # noqa: E402

import prefix_kernels as pk  # noqa: E402

VOCAB = 8192


def llama_model(size: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    dims = {"quick": dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                          intermediate_size=344),
            "cpu": dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=2,
                        intermediate_size=1376),
            "gpu": dict(hidden_size=2048, num_hidden_layers=8, num_attention_heads=32, num_key_value_heads=8,
                        intermediate_size=5632)}[size]
    cfg = LlamaConfig(vocab_size=VOCAB, max_position_embeddings=8192, pad_token_id=0, bos_token_id=1,
                      eos_token_id=2, attn_implementation="sdpa", **dims)
    return LlamaForCausalLM(cfg)


def bert_model(size: str):
    from transformers import BertConfig, BertForSequenceClassification

    dims = {"quick": dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=2, intermediate_size=512),
            "cpu": dict(hidden_size=768, num_hidden_layers=4, num_attention_heads=12, intermediate_size=3072),
            "gpu": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096)}[size]
    cfg = BertConfig(vocab_size=VOCAB, max_position_embeddings=512, num_labels=2, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0, attn_implementation="sdpa", **dims)
    return BertForSequenceClassification(cfg)


# (model builder, task, B, T, P) per size; T + P <= 512 for BERT's absolute positions.
WORKLOADS = {
    "quick": [("llama", 2, 32, 4), ("bert", 2, 32, 4)],
    "cpu": [("llama", 2, 256, 32), ("bert", 8, 128, 64)],
    "gpu": [("llama", 4, 2048, 64), ("bert", 32, 128, 128)],
}
GENERATION = {"quick": (2, 8, 4), "cpu": (8, 64, 16), "gpu": (32, 512, 64)}  # B, prompt length, new tokens


def _ours(base, P, backend):
    model = pk.get_prefix_model(copy.deepcopy(base), pk.PrefixTuningConfig(num_virtual_tokens=P, backend=backend))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.prefix_encoder.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return model


def _peft(base, P, task, ours_model):
    import peft

    cfg = peft.PrefixTuningConfig(task_type=task, num_virtual_tokens=P)
    model = peft.get_peft_model(copy.deepcopy(base), cfg)
    model.prompt_encoder["default"].load_state_dict(ours_model.prefix_encoder.state_dict())
    return model


def _batch(kind, B, T, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (B, T), generator=g).to(device)
    mask = torch.ones_like(ids)
    if kind == "llama":
        return dict(input_ids=ids, attention_mask=mask, labels=ids)
    return dict(input_ids=ids, attention_mask=mask, labels=torch.randint(0, 2, (B,), generator=g).to(device))


def _train_step(model, batch, opt):
    def step():
        opt.zero_grad(set_to_none=True)
        model(**batch).loss.backward()
        opt.step()
    return step


def _cast(model, device, dtype):
    return model.to(device=device, dtype=dtype)


def train_benchmarks(size, device, dtype, steps, skipped, rows) -> list[dict]:
    machine, stamp, commit, vers = machine_description(device), utc_stamp(), git_commit(), versions()
    for kind, B, T, P in progress(WORKLOADS[size], "e2e training", "model"):
        torch.manual_seed(0)
        with torch.device(device):  # initialized where it runs (a 400M model initializes slowly on a CPU)
            base = llama_model(size) if kind == "llama" else bert_model(size)
        base.eval()  # dropout off everywhere: the same arithmetic in every method
        task = "CAUSAL_LM" if kind == "llama" else "SEQ_CLS"
        batch = _batch(kind, B, T, device)
        models = {"prefix_kernels": _ours(base, P, None), "prefix_kernels[reference]": _ours(base, P, "reference")}
        try:
            models["peft"] = _peft(base, P, task, models["prefix_kernels"])
        except Exception as e:  # noqa: BLE001
            skipped.append(f"peft on {kind}: {type(e).__name__}: {_first_line(e)}")
        steps_fn, losses = {}, {}
        for name, model in list(models.items()):
            model = _cast(model, device, dtype)
            params = [p for p in model.parameters() if p.requires_grad]
            opt = torch.optim.AdamW(params, lr=1e-3)
            try:
                with torch.no_grad():
                    losses[name] = float(model(**batch).loss)
                steps_fn[name] = _train_step(model, batch, opt)
                steps_fn[name]()  # warm-up (compiles, autotunes) and a check that it runs
                synchronize(device)
            except Exception as e:  # noqa: BLE001
                skipped.append(f"{name} on {kind}: {type(e).__name__}: {_first_line(e)}")
                steps_fn.pop(name, None)
        if "prefix_kernels" not in steps_fn:
            continue
        times = time_side_by_side(steps_fn, device, steps, warmup=0)
        memory = {name: peak_memory_mib(fn, device) for name, fn in steps_fn.items()}
        ref_ms = times.get("peft", times.get("prefix_kernels[reference]"))[0]
        ref_name = "peft" if "peft" in times else "prefix_kernels[reference]"
        for name, (ms, p20, p80) in times.items():
            rows.append(dict(timestamp=stamp, machine=machine, versions=vers, commit=commit, device=device,
                             dtype=str(dtype).replace("torch.", ""), model=kind,
                             params_m=round(sum(p.numel() for p in base.parameters()) / 1e6, 1), B=B, T=T, P=P,
                             method=name, step_ms=round(ms, 2), p20_ms=round(p20, 2), p80_ms=round(p80, 2),
                             tokens_per_s=round(B * T / (ms * 1e-3), 1), speedup_vs=ref_name,
                             speedup=round(ref_ms / ms, 3), peak_mib=round(memory[name], 1),
                             first_loss=round(losses[name], 5), steps=steps))
        del models, steps_fn
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    return rows


def generation_benchmark(size, device, dtype, reps, notes) -> list[dict]:
    B, T0, new = GENERATION[size]
    torch.manual_seed(0)
    with torch.device(device):
        base = llama_model(size).eval()
    P = WORKLOADS[size][0][3]
    ids = _batch("llama", B, T0, device, seed=3)["input_ids"]
    kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new, do_sample=False,
              pad_token_id=0)
    models = {"prefix_kernels": _ours(base, P, None), "prefix_kernels[reference]": _ours(base, P, "reference"),
              "no prefix (sdpa)": copy.deepcopy(base)}
    calls = {}
    for name, model in models.items():
        model = _cast(model, device, dtype)
        calls[name] = (lambda m=model: m.generate(ids, **kw))
    with torch.no_grad():
        times = time_side_by_side(calls, device, reps)
    notes.append(peft_generate_note(base, P, models["prefix_kernels"], ids, kw, device, dtype))
    rows = []
    stamp, machine, commit, vers = utc_stamp(), machine_description(device), git_commit(), versions()
    for name, (ms, p20, p80) in times.items():
        rows.append(dict(timestamp=stamp, machine=machine, versions=vers, commit=commit, device=device,
                         dtype=str(dtype).replace("torch.", ""), model="llama-generate", B=B, prompt=T0,
                         new_tokens=new, P=P, method=name, ms=round(ms, 1), p20_ms=round(p20, 1),
                         p80_ms=round(p80, 1), new_tokens_per_s=round(B * new / (ms * 1e-3), 1), reps=reps))
    return rows


def peft_generate_note(base, P, ours, ids, kw, device, dtype) -> str:
    """Does PEFT's `generate` use the prefix? Generate with two different prefixes: the same tokens mean no.

    Left padding on one row, as in batched generation: PEFT prepends P ones to the 2-d mask while its cache
    holds no prefix, so padded rows also differ from the base model (they see padding), which is why a check
    against the base model's output alone can look as if PEFT used the prefix.
    """
    try:
        ids = ids[:4].clone()
        mask = torch.ones_like(ids)
        mask[0, :ids.shape[1] // 2] = 0
        one = dict(kw, attention_mask=mask, max_new_tokens=4, min_new_tokens=4)
        peft_model = _cast(_peft(base, P, "CAUSAL_LM", ours), device, dtype).eval()
        with torch.no_grad():
            first = peft_model.generate(input_ids=ids, **one)
            for p in peft_model.prompt_encoder["default"].parameters():
                p.mul_(-2.0)
            second = peft_model.generate(input_ids=ids, **one)
        plain = _cast(copy.deepcopy(base), device, dtype).eval()
        with torch.no_grad():
            base_out = plain.generate(input_ids=ids, **one)
        if torch.equal(first, second):
            same_as_base = torch.equal(first[1:], base_out[1:])
            return ("PEFT generate ignores the prefix (transformers " + _version("transformers") + "): the same "
                    "tokens for two different prefixes" + ("; unpadded rows equal the base model's" if same_as_base
                                                           else "") + "; not timed")
        return "PEFT generate uses the prefix (two different prefixes give different tokens)"
    except Exception as e:  # noqa: BLE001
        return f"PEFT generate check failed: {type(e).__name__}: {_first_line(e)}"


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0][:200] if lines else ""


def _version(pkg):
    import importlib.metadata as md

    try:
        return md.version(pkg)
    except md.PackageNotFoundError:
        return "?"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per method (default 10)")
    ap.add_argument("--quick", action="store_true", help="tiny models, 1 step (a smoke test)")
    ap.add_argument("--size", choices=("quick", "cpu", "gpu"), default=None, help="model sizes (default by device)")
    ap.add_argument("--parts", nargs="+", choices=("train", "generate"), default=["train", "generate"])
    ap.add_argument("--out", default=None)
    ap.add_argument("--no-record", action="store_true")
    args = ap.parse_args()
    device = args.device
    gpu = device.startswith("cuda")
    size = args.size or ("quick" if args.quick else ("gpu" if gpu else "cpu"))
    steps = args.steps or (1 if args.quick else 10)
    dtype = torch.bfloat16 if gpu else torch.float32
    warnings.filterwarnings("ignore")
    print(f"{machine_description(device)}; {versions()}; commit {git_commit()}; size {size}; {steps} steps")
    skipped, notes = [], []
    t0 = time.time()
    train, gen = [], []
    try:  # SIGINT (`timeout -s INT`) keeps what was measured
        if "train" in args.parts:
            train = train_benchmarks(size, device, dtype, steps, skipped, train)
        if "generate" in args.parts:
            gen = generation_benchmark(size, device, dtype, min(steps, 3), notes)
    except KeyboardInterrupt:
        skipped.append(f"interrupted after {time.time() - t0:.0f} s: results incomplete")
    print(f"e2e done in {time.time() - t0:.0f} s")
    train_table = [[r["model"], f"B={r['B']} T={r['T']} P={r['P']} ({r['params_m']}M params)", r["method"],
                    f"{r['step_ms']:.1f} ({r['p20_ms']:.1f}-{r['p80_ms']:.1f})", f"{r['tokens_per_s']:.0f}",
                    f"{r['speedup']:.2f}x vs {r['speedup_vs']}", f"{r['peak_mib']:.0f}"] for r in train]
    gen_table = [[f"B={r['B']} prompt={r['prompt']} new={r['new_tokens']} P={r['P']}", r["method"],
                  f"{r['ms']:.0f} ({r['p20_ms']:.0f}-{r['p80_ms']:.0f})", f"{r['new_tokens_per_s']:.0f}"] for r in gen]
    text = (markdown_table(["model", "workload", "method", "step ms median (p20-p80)", "tokens/s", "speedup",
                            "peak MiB"], train_table)
            + "\nGeneration (greedy, shared prefix):\n\n"
            + markdown_table(["workload", "method", "ms per generate (p20-p80)", "new tokens/s"], gen_table)
            + "".join(f"\n- {line}" for line in skipped + notes) + "\n")
    print(text)
    if args.no_record:
        return
    out = results_dir(args.out)
    os.makedirs(out, exist_ok=True)
    if train:
        append_csv(os.path.join(out, "e2e.csv"), train)
    if gen:
        append_csv(os.path.join(out, "e2e_generate.csv"), gen)
    name = "cuda" if gpu else "cpu"
    md_name = f"e2e_{name}{'' if len(args.parts) == 2 else '_' + args.parts[0]}"
    with open(os.path.join(out, f"{md_name}.md"), "w") as f:
        f.write(f"# End to end ({name}, {size} models)\n\n{machine_description(device)}; {versions()}; commit "
                f"{git_commit()}; {utc_stamp()}; {steps} timed steps per method, methods alternating; peak memory "
                "of one training step above what was allocated before it (benchmarks/common.py).\n\n" + text)
    with open(os.path.join(out, f"{md_name}.json"), "w") as f:
        json.dump({"train": train, "generate": gen, "skipped": skipped, "notes": notes}, f, indent=1)
    print(f"wrote under {out}: e2e.csv, e2e_generate.csv, {md_name}.md, {md_name}.json")


if __name__ == "__main__":
    main()
