"""P-Tuning v1 (Liu et al., "GPT Understands, Too"): trainable virtual tokens in the input embeddings.

A template places the virtual tokens anywhere between fixed anchor words and the example's fields:

    "{sentence} It was [P][P][P] [MASK] ."
    "[P][P] {premise} Question: {hypothesis} ? [P] Answer: [MASK]"

(PEFT's P-Tuning can only prepend them.) A prompt encoder produces the P virtual-token embeddings once per
step, with the reparameterizations of the paper and of PEFT: `"lstm"` (bidirectional LSTM, then an MLP) or
`"mlp"` (MLP only); `"none"` is a plain embedding table (what an exported adapter loads as). Masked LMs
predict `[MASK]` through a verbalizer (label -> label word; its first sub-token is scored); causal LMs
predict the next token (classification scores the label words at the last real token; generation continues
the prompt). In generation the virtual tokens are in the prompt once: the prompt goes in as embeddings on
the first step and the cache carries them; they are never re-inserted at later steps.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from transformers.modeling_outputs import SequenceClassifierOutput

from ..transformers import compat
from . import adapter_io
from .adapter_io import ADAPTER_WEIGHTS, PTUNING_CONFIG, PTUNING_ENCODER, read_checkpoint, strip_prefix
from .config import DictConfig
from .pooling import last_real_token
from .trainable import (AdapterStateDict, TrainableParameters, freeze, requires_grad_flags, restore_requires_grad,
                        set_trainable)

REPARAMETERIZATIONS = ("lstm", "mlp", "none")
_PIECE = re.compile(r"(\{[A-Za-z_][A-Za-z0-9_]*\}|\[P\]|\[MASK\])")


@dataclass
class PTuningConfig(DictConfig):
    """P-Tuning v1.

    Args:
        template: text with `{field}` slots, `[P]` virtual tokens (anywhere, any number) and at most one
            `[MASK]` (masked LMs: the position the verbalizer reads).
        encoder_reparameterization_type: "lstm" (paper and PEFT default: bidirectional LSTM + MLP), "mlp"
            (PEFT's MLP-only option) or "none" (free embeddings).
        encoder_hidden_size: hidden size of the LSTM / MLP (default: the model's embedding size).
        encoder_num_layers: LSTM layers (paper: 2).
        encoder_dropout: dropout inside the LSTM.
        verbalizer: label words, one per class, in class order (e.g. ["terrible", "great"]).
        max_length: truncate the fields (longest first) so that the encoded input fits.
        add_special_tokens: add the tokenizer's special tokens ([CLS] ... [SEP]); None: for masked LMs only.
    """

    template: str
    encoder_reparameterization_type: str = "lstm"
    encoder_hidden_size: int | None = None
    encoder_num_layers: int = 2
    encoder_dropout: float = 0.0
    verbalizer: list[str] | None = None
    max_length: int = 256
    add_special_tokens: bool | None = None
    peft_type: str = field(default="P_TUNING", init=False)

    def __post_init__(self) -> None:
        if not isinstance(self.template, str):
            raise TypeError(f"template must be a str, got {type(self.template).__name__}")
        if self.num_virtual_tokens < 1:
            raise ValueError(f"template must hold at least one [P], got {self.template!r}")
        if self.template.count("[MASK]") > 1:
            raise ValueError(f"template may hold at most one [MASK], got {self.template.count('[MASK]')}")
        if self.encoder_reparameterization_type not in REPARAMETERIZATIONS:
            raise ValueError(f"encoder_reparameterization_type must be one of {REPARAMETERIZATIONS}, got "
                             f"{self.encoder_reparameterization_type!r}")
        if self.verbalizer is not None and (isinstance(self.verbalizer, str) or not self.verbalizer):
            raise TypeError(f"verbalizer must be a non-empty list of label words, got {self.verbalizer!r}")

    @property
    def num_virtual_tokens(self) -> int:
        return self.template.count("[P]")

    @property
    def fields(self) -> list[str]:
        return re.findall(r"\{([A-Za-z_][A-Za-z0-9_]*)\}", self.template)


class PromptEncoder(nn.Module):
    """The virtual-token embeddings `[P, d]`, reparameterized as in the paper / PEFT (parameter names as
    PEFT's `PromptEncoder`: `embedding`, `lstm_head`, `mlp_head`). Runs once per step, not once per row."""

    def __init__(self, num_virtual_tokens: int, token_dim: int, *, reparameterization: str = "lstm",
                 hidden_size: int | None = None, num_layers: int = 2, dropout: float = 0.0):
        super().__init__()
        self.num_virtual_tokens = num_virtual_tokens
        self.token_dim = token_dim
        self.reparameterization = reparameterization
        hidden = hidden_size or token_dim
        self.embedding = nn.Embedding(num_virtual_tokens, token_dim)
        if reparameterization == "lstm":
            self.lstm_head = nn.LSTM(token_dim, hidden, num_layers=num_layers, dropout=dropout if num_layers > 1
                                     else 0.0, bidirectional=True, batch_first=True)
            self.mlp_head = nn.Sequential(nn.Linear(2 * hidden, 2 * hidden), nn.ReLU(),
                                          nn.Linear(2 * hidden, token_dim))
        elif reparameterization == "mlp":
            self.mlp_head = nn.Sequential(nn.Linear(token_dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden),
                                          nn.ReLU(), nn.Linear(hidden, token_dim))
        elif reparameterization != "none":
            raise ValueError(f"reparameterization must be one of {REPARAMETERIZATIONS}, got {reparameterization!r}")

    def forward(self) -> torch.Tensor:
        x = self.embedding.weight
        if self.reparameterization == "lstm":
            x = self.mlp_head(self.lstm_head(x.unsqueeze(0))[0]).squeeze(0)
        elif self.reparameterization == "mlp":
            x = self.mlp_head(x)
        return x


class PTuningModel(AdapterStateDict, TrainableParameters):
    """A frozen masked or causal LM with P-Tuning v1 virtual tokens placed by a template.

    `encode(examples)` turns dicts of fields into `input_ids`, `attention_mask`, `virtual_mask` (and
    `mask_index` for masked LMs); `forward(**batch)` replaces the virtual positions by the prompt encoder's
    output and calls the model on `inputs_embeds`; `classify(**batch)` gives `[B, C]` verbalizer logits
    (and the loss with `labels`); `generate(**batch, ...)` continues the prompt (causal LMs).
    """

    # Class labels get a mean loss computed here: transformers.Trainer must scale it for gradient accumulation.
    accepts_loss_kwargs = False

    def __init__(self, model: nn.Module, tokenizer, config: PTuningConfig):
        super().__init__()
        self.base_model = model
        self.tokenizer = tokenizer
        self.ptuning_config = config
        self.is_mlm = "ForMaskedLM" in type(model).__name__
        if self.is_mlm and "[MASK]" not in config.template:
            raise ValueError("a masked LM needs a [MASK] in the template (the position the verbalizer reads)")
        emb = model.get_input_embeddings()
        token_dim = emb.weight.shape[1]
        self.prompt_encoder = PromptEncoder(
            config.num_virtual_tokens, token_dim, reparameterization=config.encoder_reparameterization_type,
            hidden_size=config.encoder_hidden_size, num_layers=config.encoder_num_layers,
            dropout=config.encoder_dropout).to(emb.weight.device)
        with torch.no_grad():  # start from real word embeddings' scale
            idx = torch.randint(0, emb.weight.shape[0], (config.num_virtual_tokens,),
                                generator=torch.Generator().manual_seed(0))
            self.prompt_encoder.embedding.weight.copy_(emb.weight[idx.to(emb.weight.device)])
        freeze(model)
        self.label_word_ids = None
        if config.verbalizer is not None:
            ids = []
            for w in config.verbalizer:
                toks = tokenizer(w if self.is_mlm else " " + w.strip(), add_special_tokens=False)["input_ids"]
                if not toks:
                    raise ValueError(f"verbalizer word {w!r} encodes to no token")
                ids.append(toks[0])
            if len(set(ids)) != len(ids):
                raise ValueError(f"verbalizer words must start with different tokens, got ids {ids}")
            self.label_word_ids = torch.tensor(ids)
        placeholder = tokenizer.unk_token_id if tokenizer.unk_token_id is not None else tokenizer.eos_token_id
        self._placeholder = int(placeholder if placeholder is not None else 0)
        self._register_adapter_state_hooks()

    # ------------------------------------------------------------------ templates
    def _pieces(self):
        """The template as [("text", str) | ("field", name) | ("virtual", None) | ("mask", None)]; whitespace
        before a piece stays attached to it, so BPE tokenizers see " word" as in running text."""
        out, pending = [], ""
        for part in _PIECE.split(self.ptuning_config.template):
            if not part:
                continue
            if part == "[P]":
                out.append(("virtual", None))
            elif part == "[MASK]":
                out.append(("mask", pending))
                pending = ""
            elif part.startswith("{"):
                out.append(("field", (pending, part[1:-1])))
                pending = ""
            else:
                stripped = part.rstrip()
                if stripped:
                    out.append(("text", pending + stripped))
                    pending = part[len(stripped):]
                else:
                    pending += part
        return out

    def _special_tokens(self) -> tuple[list[int], list[int]]:
        """The special tokens the tokenizer puts before and after a single sequence (e.g. [CLS] / [SEP])."""
        plain = self.tokenizer("x", add_special_tokens=False)["input_ids"]
        full = self.tokenizer("x", add_special_tokens=True)["input_ids"]
        for i in range(len(full) - len(plain) + 1):
            if full[i:i + len(plain)] == plain:
                return full[:i], full[i + len(plain):]
        return [], []

    def _encode_one(self, example: dict, target: str | None):
        tok = self.tokenizer
        cfg = self.ptuning_config
        pieces = self._pieces()
        field_ids = {}
        for kind, val in pieces:
            if kind == "field":
                space, name = val
                if name not in example:
                    raise KeyError(f"example has no field {name!r} (template fields: {cfg.fields})")
                text = str(example[name]).strip()
                field_ids[name] = tok(space + text, add_special_tokens=False)["input_ids"]
        add_special = self.is_mlm if cfg.add_special_tokens is None else cfg.add_special_tokens
        fixed = 0
        for kind, val in pieces:
            if kind == "text":
                fixed += len(tok(val, add_special_tokens=False)["input_ids"])
            elif kind in ("virtual", "mask"):
                fixed += 1
        before, after = self._special_tokens()
        fixed += (len(before) + len(after)) if add_special else 0
        target_ids = [] if target is None else tok(" " + target.strip(), add_special_tokens=False)["input_ids"]
        budget = cfg.max_length - fixed - len(target_ids)
        while sum(len(v) for v in field_ids.values()) > max(budget, 0):
            longest = max(field_ids, key=lambda k: len(field_ids[k]))
            if not field_ids[longest]:
                break
            field_ids[longest] = field_ids[longest][:-1]
        ids, virtual, mask_at = [], [], None
        for kind, val in pieces:
            if kind == "text":
                new = tok(val, add_special_tokens=False)["input_ids"]
            elif kind == "field":
                new = field_ids[val[1]]
            elif kind == "virtual":
                new = [self._placeholder]
            else:
                new = [tok.mask_token_id]
                mask_at = len(ids)
            virtual += [kind == "virtual"] * len(new)
            ids += new
        if add_special:
            offset = len(before)
            virtual = [False] * offset + virtual + [False] * len(after)
            mask_at = None if mask_at is None else mask_at + offset
            ids = list(before) + ids + list(after)
        labels = [-100] * len(ids) + list(target_ids)
        virtual += [False] * len(target_ids)
        ids += target_ids
        return ids, virtual, mask_at, labels

    def encode(self, examples, targets=None, *, padding_side: str | None = None, device=None) -> dict:
        """Encode a list of field dicts (and, for causal LMs, optional target texts that become `labels`, the
        template part ignored). Padding: right for masked LMs, left for causal LMs unless given."""
        if isinstance(examples, dict):
            examples = [examples]
        targets = [None] * len(examples) if targets is None else list(targets)
        rows = [self._encode_one(e, t) for e, t in zip(examples, targets)]
        width = max(len(r[0]) for r in rows)
        side = padding_side or ("right" if self.is_mlm else "left")
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self._placeholder
        out = {k: [] for k in ("input_ids", "attention_mask", "virtual_mask", "labels", "mask_index")}
        for ids, virt, mask_at, labels in rows:
            n = width - len(ids)
            def fill(xs, v, n=n):
                return (xs + [v] * n) if side == "right" else ([v] * n + xs)
            out["input_ids"].append(fill(ids, pad))
            out["attention_mask"].append(fill([1] * len(ids), 0))
            out["virtual_mask"].append(fill(virt, False))
            out["labels"].append(fill(labels, -100))
            out["mask_index"].append(-1 if mask_at is None else mask_at + (0 if side == "right" else n))
        batch = {k: torch.tensor(v) for k, v in out.items()}
        if targets[0] is None:
            del batch["labels"]
        if not self.is_mlm:
            del batch["mask_index"]
        if device is not None:
            batch = {k: v.to(device) for k, v in batch.items()}
        return batch

    # ------------------------------------------------------------------ model calls
    def embed(self, input_ids: torch.Tensor, virtual_mask: torch.Tensor) -> torch.Tensor:
        """Word embeddings with the virtual positions replaced, in order, by the prompt encoder's output."""
        P = self.ptuning_config.num_virtual_tokens
        counts = virtual_mask.sum(-1)
        if not bool((counts == P).all()):
            raise ValueError(f"every row must hold exactly {P} virtual tokens, got {counts.tolist()}")
        words = self.base_model.get_input_embeddings()(input_ids)
        prompts = self.prompt_encoder().to(words.dtype)  # [P, d], once per step
        order = (virtual_mask.long().cumsum(-1) - 1).clamp(min=0)
        return torch.where(virtual_mask.unsqueeze(-1), prompts[order], words)

    def forward(self, input_ids, virtual_mask, attention_mask=None, labels=None, mask_index=None, **kwargs):
        """The model on the prompt. `labels` `[B, S]` (token labels, e.g. from `encode(..., targets=...)`): the
        model's own loss. `labels` `[B]` (one class per row): `classify`'s verbalizer loss, with its scores as
        `logits` `[B, C]`, so that `encode` + class labels is a batch for transformers.Trainer."""
        if labels is not None and labels.ndim == 1:
            loss, scores = self.classify(input_ids, virtual_mask, attention_mask, labels, mask_index)
            return SequenceClassifierOutput(loss=loss, logits=scores)
        embeds = self.embed(input_ids, virtual_mask)
        return self.base_model(inputs_embeds=embeds, attention_mask=attention_mask, labels=labels, **kwargs)

    def classify(self, input_ids, virtual_mask, attention_mask=None, labels=None, mask_index=None):
        """Verbalizer logits `[B, C]` at [MASK] (masked LMs) or at the last real token (causal LMs; the next
        token), and the cross-entropy over the label words with `labels` (`[B]` class indices)."""
        if self.label_word_ids is None:
            raise ValueError("classify needs a verbalizer in the PTuningConfig")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        logits = self.forward(input_ids, virtual_mask, attention_mask=attention_mask).logits
        rows = torch.arange(input_ids.shape[0], device=input_ids.device)
        pos = mask_index if self.is_mlm else last_real_token(attention_mask)
        scores = logits[rows, pos][:, self.label_word_ids.to(logits.device)]
        loss = None if labels is None else F.cross_entropy(scores.float(), labels)
        return loss, scores

    def generate(self, input_ids, virtual_mask, attention_mask=None, mask_index=None, labels=None, **kwargs):
        """Continue the prompt (causal LMs): the prompt, virtual tokens included, goes in once as embeddings;
        later steps feed the generated token ids through the cache. Returns the new tokens only."""
        if self.is_mlm:
            raise ValueError("generate is for causal LMs; use classify for masked LMs")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        embeds = self.embed(input_ids, virtual_mask)
        return self.base_model.generate(inputs_embeds=embeds, attention_mask=attention_mask, **kwargs)

    def activation_checkpointing_enable(self, activation_checkpointing_kwargs: dict | None = None, **kwargs):
        """Gradient checkpointing in the (frozen) model; the prompt encoder runs once per step outside it."""
        ckpt = dict(activation_checkpointing_kwargs or {})
        ckpt.setdefault("use_reentrant", False)
        compat.enable_activation_checkpointing(self.base_model, ckpt, **kwargs)

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None, **kwargs):
        self.activation_checkpointing_enable(gradient_checkpointing_kwargs, **kwargs)

    # ------------------------------------------------------------------ parameters, save/load
    def _adapter_modules(self) -> list[str]:
        return ["prompt_encoder"]

    def _adapter_meta(self) -> dict:
        return {"kind": "ptuning", "config": self.ptuning_config.to_dict(), "token_dim": self.prompt_encoder.token_dim}

    def prompt_embeddings(self) -> torch.Tensor:
        """The final virtual-token embeddings `[P, d]` (encoder applied)."""
        with torch.no_grad():
            return self.prompt_encoder().detach().float().cpu().contiguous()

    def save_pretrained(self, save_directory: str | os.PathLike, *, training_state: bool = True,
                        is_main_process: bool = True, **kwargs) -> None:
        """`ptuning_config.json`, `adapter_model.safetensors` (`prompt_embeddings [P, d]`, the encoder's output)
        and, with `training_state`, `prompt_encoder.safetensors` (the full encoder, to resume training).
        Nothing is written when `is_main_process` is False; the other keyword arguments of transformers' and
        PEFT's `save_pretrained` are accepted and not used."""
        if not is_main_process:
            return
        d = Path(save_directory)
        d.mkdir(parents=True, exist_ok=True)
        cfg = self.ptuning_config.to_dict()
        if not training_state:
            cfg["encoder_reparameterization_type"] = "none"
        adapter_io.write_json(d / PTUNING_CONFIG, {"config": cfg, "token_dim": self.prompt_encoder.token_dim,
                                                   "training_state": training_state})
        adapter_io.write_safetensors(d / ADAPTER_WEIGHTS, {"prompt_embeddings": self.prompt_embeddings()})
        if training_state:
            adapter_io.write_safetensors(d / PTUNING_ENCODER, self.prompt_encoder.state_dict())
        elif (d / PTUNING_ENCODER).exists():
            (d / PTUNING_ENCODER).unlink()

    def export_merged(self, save_directory: str | os.PathLike) -> None:
        """Save the final embeddings only (the LSTM/MLP dropped); loads with reparameterization "none"."""
        self.save_pretrained(save_directory, training_state=False)

    @classmethod
    def from_pretrained(cls, model: nn.Module, tokenizer, adapter_dir: str | os.PathLike, *,
                        is_trainable: bool = False) -> "PTuningModel":
        """Loads an adapter saved by `save_pretrained`. Files are read and checked before the model is touched;
        if loading still fails, the model's `requires_grad` flags are restored (nothing is half-loaded)."""
        config, tensors = _read_ptuning_adapter(Path(adapter_dir), model)
        flags = requires_grad_flags(model)
        try:
            pm = cls(model, tokenizer, config)
            expected = {k: tuple(v.shape) for k, v in pm.prompt_encoder.state_dict().items()}
            got = {k: tuple(v.shape) for k, v in tensors.items()}
            if expected != got:
                raise ValueError(f"adapter {adapter_dir} does not fit this model: prompt encoder tensors expected "
                                 f"{expected}, got {got}")
            with torch.no_grad():
                pm.prompt_encoder.load_state_dict(tensors)
        except Exception:
            restore_requires_grad(model, flags)
            raise
        set_trainable(pm.prompt_encoder, is_trainable)
        return pm


def _read_ptuning_adapter(d: Path, model: nn.Module) -> tuple[PTuningConfig, dict[str, torch.Tensor]]:
    """The config and prompt-encoder state of a P-Tuning v1 adapter, checked against the model's embedding
    size: the full encoder when saved with the training state, else the final embeddings as the table of an
    unparameterized encoder. A transformers.Trainer checkpoint (`model.safetensors`, the model's `state_dict`)
    holds the full encoder."""
    checkpoint = None if (d / PTUNING_CONFIG).is_file() else read_checkpoint(d)
    if checkpoint is not None:
        meta, state = checkpoint
        if meta.get("kind") != "ptuning":
            raise ValueError(f"{d} is not a PTuningModel checkpoint (kind {meta.get('kind')!r})")
        tensors = strip_prefix(state, "prompt_encoder.")
    else:
        meta = adapter_io.read_json(d / PTUNING_CONFIG)
        tensors = None
    try:
        config = PTuningConfig.from_dict(meta["config"])
        saved_dim = int(meta["token_dim"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"adapter file {d / PTUNING_CONFIG} is missing or has an invalid field: {exc}") from None
    token_dim = model.get_input_embeddings().weight.shape[1]
    if saved_dim != token_dim:
        raise ValueError(f"adapter does not fit this model: token_dim expected {token_dim}, got {saved_dim}")
    if tensors is not None:
        return config, tensors
    if (d / PTUNING_ENCODER).is_file():
        return config, adapter_io.read_safetensors(d / PTUNING_ENCODER)
    config.encoder_reparameterization_type = "none"
    tensors = adapter_io.read_safetensors(d / ADAPTER_WEIGHTS)
    if "prompt_embeddings" not in tensors:
        raise ValueError(f"adapter file {d / ADAPTER_WEIGHTS} has no tensor 'prompt_embeddings'")
    embeddings = tensors["prompt_embeddings"]
    expected = (config.num_virtual_tokens, token_dim)
    if tuple(embeddings.shape) != expected:
        raise ValueError(f"adapter file {d / ADAPTER_WEIGHTS}: prompt_embeddings must have shape {expected} "
                         f"([P, token_dim]), got {tuple(embeddings.shape)}")
    return config, {"embedding.weight": embeddings}
