"""End to end: padding-free (packed) against padded training of the same examples, tokens/s and peak memory.

    python benchmarks/e2e_packing.py [--steps N] [--batch 32] [--quick] [--out DIR] [--no-record]

The examples are the demo's Rotten Tomatoes snippets (its seed-0 training split, tokenized by all-MiniLM-L6-v2's
tokenizer, at most 64 tokens: real lengths, 27 tokens on average), `--batch` of them per step, the same
batches for every method. The model is the Llama-like causal LM of `e2e.py` (built from a config, random
weights; its vocabulary sized to the tokenizer's), prefix-tuned with P = 16, trained as a language model on
the snippets. Methods, timed side by side step by step, in one process:
- `padded`: `DataCollatorWithPadding` (a [batch, longest] batch and its attention mask; labels -100 on padding);
- `padding-free`: `DataCollatorWithFlattening` (one row of the batch's tokens, position ids restarting per
  snippet), which the wrapper turns into the op's `cu_seqlens`;
each with the fastest backend here and with the `reference` backend. tokens/s counts real tokens only.
Appends to <out>/e2e_packing.csv and writes <out>/e2e_packing_<device>.md.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (  # noqa: E402
    append_csv, git_commit, machine_description, markdown_table, peak_memory_mib, results_dir, time_side_by_side,
    utc_stamp, versions,
)

import torch  # noqa: E402

import prefix_kernels as pk  # noqa: E402
from prefix_kernels.apps.demo import default_data_path, default_model_path, load_rotten_tomatoes  # noqa: E402
from prefix_kernels.ops import resolve_backend  # noqa: E402

P = 16


def snippets(n: int, max_length: int = 64) -> tuple[list[dict], object]:
    from transformers import AutoTokenizer

    train, _, _ = load_rotten_tomatoes(default_data_path(), seed=0)
    tokenizer = AutoTokenizer.from_pretrained(str(default_model_path()))
    return [tokenizer(text, truncation=True, max_length=max_length) for text, _ in train[:n]], tokenizer


def model_for(vocab_size: int, size: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    dims = {"quick": dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                          intermediate_size=344),
            "cpu": dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=2,
                        intermediate_size=1376)}[size]
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab_size, max_position_embeddings=512, pad_token_id=0, attn_implementation="sdpa",
                      **dims)
    return LlamaForCausalLM(cfg).eval()  # dropout off: the same arithmetic in every method


def collate(examples: list[dict], how: str, tokenizer) -> dict:
    from transformers import DataCollatorWithFlattening, DataCollatorWithPadding

    if how == "padding-free":
        features = [dict(input_ids=e["input_ids"]) for e in examples]
        return DataCollatorWithFlattening(return_tensors="pt")(features)
    batch = DataCollatorWithPadding(tokenizer, return_tensors="pt")([dict(input_ids=e["input_ids"]) for e in examples])
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    return dict(batch, labels=labels)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=8, help="timed steps per method (each on its own batch)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--quick", action="store_true", help="a tiny model, 2 steps (a smoke test)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--no-record", action="store_true")
    args = ap.parse_args()
    device, size = "cpu", "quick" if args.quick else "cpu"
    steps = 2 if args.quick else args.steps
    examples, tokenizer = snippets(args.batch * (steps + 1))
    chunks = [examples[i * args.batch:(i + 1) * args.batch] for i in range(steps + 1)]
    base = model_for(tokenizer.vocab_size, size)
    fastest = resolve_backend(None, device, ("packed",)).name
    methods = [(how, backend) for backend in dict.fromkeys([fastest, "reference"])
               for how in ("padded", "padding-free")]
    batches = {how: [collate(c, how, tokenizer) for c in chunks] for how in ("padded", "padding-free")}
    calls, losses = {}, {}
    for how, backend in methods:
        torch.manual_seed(1)  # the same prefix in every method
        model = pk.get_prefix_model(copy.deepcopy(base), pk.PrefixTuningConfig(num_virtual_tokens=P, backend=backend))
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        feed = iter(batches[how] * 3)

        def step(model=model, opt=opt, feed=feed):
            opt.zero_grad(set_to_none=True)
            loss = model(**next(feed)).loss
            loss.backward()
            opt.step()
            return loss.detach()

        losses[(how, backend)] = float(step())  # warm-up on the first batch, and its loss
        calls[(how, backend)] = step
    spread = max(losses.values()) - min(losses.values())
    if spread > 1e-4:  # no time is reported for methods that do not compute the same training step
        raise SystemExit(f"the methods' first-batch losses differ by {spread:.2e}: {losses}")
    times = time_side_by_side(calls, device, steps, warmup=0)
    memory = {key: peak_memory_mib(fn, device) for key, fn in calls.items()}
    real_tokens = sum(len(e["input_ids"]) for c in chunks[1:] for e in c) / steps
    padded_tokens = sum(b["input_ids"].numel() for b in batches["padded"][1:]) / steps
    machine, stamp, commit, vers = machine_description(device), utc_stamp(), git_commit(), versions()
    rows, table = [], []
    for (how, backend), (ms, p20, p80) in times.items():
        padded_ms = times[("padded", backend)][0]
        rows.append(dict(timestamp=stamp, machine=machine, versions=vers, commit=commit, device=device, model=size,
                         batch=args.batch, P=P, method=how, backend=backend, step_ms=round(ms, 1),
                         p20_ms=round(p20, 1), p80_ms=round(p80, 1), real_tokens=round(real_tokens, 1),
                         positions=round(real_tokens if how == "padding-free" else padded_tokens, 1),
                         tokens_per_s=round(real_tokens / (ms * 1e-3), 1), speedup_vs_padded=round(padded_ms / ms, 3),
                         peak_mib=round(memory[(how, backend)], 1), first_loss=round(losses[(how, backend)], 5),
                         steps=steps))
        table.append([how, backend, f"{ms:.0f} ({p20:.0f}-{p80:.0f})", f"{real_tokens / (ms * 1e-3):.0f}",
                      f"{padded_ms / ms:.2f}x", f"{memory[(how, backend)]:.0f}", f"{losses[(how, backend)]:.4f}"])
    header = ["batches", "backend", "step ms median (p20-p80)", "real tokens/s", "vs padded (same backend)",
              "peak MiB", "first-batch loss"]
    print(f"{machine}; {vers}; commit {commit}; {args.batch} snippets per step: {real_tokens:.0f} real tokens, "
          f"{padded_tokens:.0f} padded positions on average")
    print(markdown_table(header, table))
    if args.no_record:
        return
    out = results_dir(args.out)
    os.makedirs(out, exist_ok=True)
    append_csv(os.path.join(out, "e2e_packing.csv"), rows)
    with open(os.path.join(out, f"e2e_packing_{device}.md"), "w") as f:
        f.write(f"# Padding-free against padded training ({device})\n\n{machine}; {vers}; commit {commit}; {stamp}. "
                f"Llama-like LM ({size} size of benchmarks/e2e_packing.py), prefix tuning P = {P}, {args.batch} Rotten "
                f"Tomatoes snippets per step ({real_tokens:.0f} real tokens, {padded_tokens:.0f} positions padded), "
                f"{steps} timed steps per method, alternating. Every method starts from the same prefix, so the "
                "first-batch losses must agree: packed and padded batches compute the same loss.\n\n")
        f.write(markdown_table(header, table))
    print(f"appended {len(rows)} rows to {out}/e2e_packing.csv")


if __name__ == "__main__":
    main()
