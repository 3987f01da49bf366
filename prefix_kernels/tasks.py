"""P-Tuning v2 task models: a frozen backbone with a deep prefix and one linear head per task.

`PrefixTaskModel(backbone, config, tasks)` takes a transformers *base* model (`AutoModel`: BertModel,
RobertaModel, LlamaModel, ...; no LM or classification head), wraps it with `get_prefix_model` (the fused
prefix in every attention layer) and adds a randomly initialized linear head per task:

- `"seq"` (sequence classification): the head reads one vector per row, chosen by `pooling`:
  `"cls"` (hidden state of the first token, P-Tuning v2's choice for encoders), `"pooler"` (the backbone's
  pooled output: BERT's tanh-dense on [CLS]), `"mean"` (mean over real tokens, what sentence-transformers
  models such as all-MiniLM-L6-v2 were trained with) or `"last"` (the last real token, for decoders; left or
  right padding). `"auto"`: `"last"` for causal backbones, `"cls"` otherwise.
- `"tok"` (token classification): one label per real token. The prefix is not part of the sequence, so
  prefix positions never produce a label; padded positions and labels `-100` are ignored by the loss.

Several tasks share one prefix (P-Tuning v2's multi-task setting): a batch may mix tasks, each row naming its
task through `task_ids` (`[B]` int64, index into `task_names`). Only the prefix (and its MLP, if any) and the
heads train; the backbone is frozen.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from .config import PrefixTuningConfig
from .trainable import TrainableParameters

TASK_KINDS = ("seq", "tok")
POOLINGS = ("auto", "cls", "pooler", "mean", "last")
HEADS_FILE = "task_heads.safetensors"
TASKS_CONFIG = "task_config.json"


@dataclass
class TaskOutput:
    """`loss` (mean over the rows of all tasks, each task's rows weighted by their count), `logits` (a tensor
    when the batch holds one task: `[B, C]` or `[B, T, C]`; else a dict task name -> logits of its rows) and
    `rows` (task name -> indices of its rows in the batch)."""

    loss: torch.Tensor | None
    logits: torch.Tensor | dict
    rows: dict


def _normalize_tasks(tasks) -> dict[str, tuple[str, int]]:
    if isinstance(tasks, int):
        tasks = {"default": ("seq", tasks)}
    if not isinstance(tasks, dict) or not tasks:
        raise TypeError(f"tasks must be a non-empty dict name -> num_labels or (kind, num_labels), got {tasks!r}")
    out = {}
    for name, spec in tasks.items():
        kind, n = ("seq", spec) if isinstance(spec, int) else tuple(spec)
        if kind not in TASK_KINDS:
            raise ValueError(f"task {name!r}: kind must be one of {TASK_KINDS}, got {kind!r}")
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"task {name!r}: num_labels must be an int >= 1, got {n!r}")
        out[str(name)] = (kind, n)
    return out


class PrefixTaskModel(TrainableParameters):
    """Frozen backbone + shared fused prefix + one head per task (P-Tuning v2).

    Args:
        backbone: a transformers base model (hidden states out, no head).
        config: `PTuningV2Config` (or `PrefixTuningConfig`); `modules_to_save` is ignored (heads live here).
        tasks: `{name: num_labels}` (sequence classification) or `{name: ("seq" | "tok", num_labels)}`;
            an int means one sequence-classification task named "default".
        pooling: see the module docstring.
        classifier_dropout: dropout before the heads (default: the backbone's `hidden_dropout_prob` or 0.1).
    """

    def __init__(self, backbone: nn.Module, config: PrefixTuningConfig, tasks, *, pooling: str = "auto",
                 classifier_dropout: float | None = None):
        super().__init__()
        from .transformers import get_prefix_model

        self.tasks = _normalize_tasks(tasks)
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        hidden = getattr(backbone.config, "hidden_size", None) or getattr(backbone.config, "d_model", None)
        if hidden is None:
            raise ValueError(f"cannot read hidden_size from {type(backbone.config).__name__}")
        if config.modules_to_save != []:
            config = type(config).from_dict({**config.to_dict(), "modules_to_save": []})
        self.prefix_model = get_prefix_model(backbone, config)
        causal = any(bool(getattr(m, "is_causal", False)) for _, m in self.prefix_model.layout.attention_modules)
        self.pooling = ("last" if causal else "cls") if pooling == "auto" else pooling
        if classifier_dropout is None:
            classifier_dropout = getattr(backbone.config, "classifier_dropout", None)
        if classifier_dropout is None:
            classifier_dropout = getattr(backbone.config, "hidden_dropout_prob", 0.1)
        self.classifier_dropout = float(classifier_dropout)
        self.dropout = nn.Dropout(self.classifier_dropout)
        dev = next(backbone.parameters()).device
        self.heads = nn.ModuleDict({name: nn.Linear(hidden, n) for name, (_, n) in self.tasks.items()}).to(dev)
        self.task_names = list(self.tasks)

    # ------------------------------------------------------------------ helpers
    @property
    def backbone(self) -> nn.Module:
        return self.prefix_model.base_model

    def _pool(self, out, mask: torch.Tensor) -> torch.Tensor:
        h = out.last_hidden_state
        if self.pooling == "cls":
            return h[:, 0]
        if self.pooling == "pooler":
            pooled = getattr(out, "pooler_output", None)
            if pooled is None:
                raise ValueError(f"{type(self.backbone).__name__} has no pooled output; use pooling='cls'")
            return pooled
        m = mask.to(h.dtype).unsqueeze(-1)
        if self.pooling == "mean":
            return (h * m).sum(1) / m.sum(1).clamp(min=1.0)
        # "last": position of the last real token (works for left and right padding)
        T = mask.shape[1]
        pos = torch.arange(T, device=mask.device).expand_as(mask)
        last = torch.where(mask.bool(), pos, torch.full_like(pos, -1)).max(dim=1).values.clamp(min=0)
        return h[torch.arange(h.shape[0], device=h.device), last]

    def _task_rows(self, task, task_ids, B: int, device) -> dict[str, torch.Tensor]:
        if task_ids is None:
            if task is None:
                if len(self.tasks) != 1:
                    raise ValueError(f"this model has tasks {self.task_names}: pass task=... or task_ids=[B]")
                task = self.task_names[0]
            if task not in self.tasks:
                raise ValueError(f"task must be one of {self.task_names}, got {task!r}")
            return {task: None}
        task_ids = torch.as_tensor(task_ids, device=device)
        if task_ids.shape != (B,):
            raise ValueError(f"task_ids must have shape [batch] = ({B},), got {tuple(task_ids.shape)}")
        if int(task_ids.min()) < 0 or int(task_ids.max()) >= len(self.tasks):
            raise ValueError(f"task_ids must be in [0, {len(self.tasks)}), got range "
                             f"[{int(task_ids.min())}, {int(task_ids.max())}]")
        rows = {}
        for i, name in enumerate(self.task_names):
            idx = (task_ids == i).nonzero(as_tuple=True)[0]
            if idx.numel():
                rows[name] = idx
        return rows

    # ------------------------------------------------------------------ forward
    def forward(self, input_ids=None, attention_mask=None, labels=None, *, task: str | None = None,
                task_ids=None, **kwargs) -> TaskOutput:
        ref = input_ids if input_ids is not None else kwargs.get("inputs_embeds")
        B, T = ref.shape[:2]
        if attention_mask is None:
            attention_mask = torch.ones(B, T, dtype=torch.long, device=ref.device)
        out = self.prefix_model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        rows = self._task_rows(task, task_ids, B, ref.device)
        hidden = out.last_hidden_state
        pooled = None
        losses, count, logits = [], 0, {}
        for name, idx in rows.items():
            kind, n = self.tasks[name]
            sel = (lambda x: x) if idx is None else (lambda x, idx=idx: x.index_select(0, idx))
            if kind == "seq":
                if pooled is None:
                    pooled = self._pool(out, attention_mask)
                lg = self.heads[name](self.dropout(sel(pooled)))
            else:
                lg = self.heads[name](self.dropout(sel(hidden)))
            logits[name] = lg
            if labels is not None:
                y = sel(labels)
                if kind == "tok":
                    y = y.masked_fill(~sel(attention_mask).bool(), -100)
                    valid = int((y != -100).sum())
                    loss = F.cross_entropy(lg.reshape(-1, n).float(), y.reshape(-1), ignore_index=-100,
                                           reduction="sum")
                else:
                    valid = y.shape[0]
                    loss = F.cross_entropy(lg.float(), y, reduction="sum")
                losses.append(loss)
                count += valid
        loss = torch.stack(losses).sum() / max(count, 1) if losses else None
        rows_out = {k: (torch.arange(B, device=ref.device) if v is None else v) for k, v in rows.items()}
        if len(logits) == 1 and task_ids is None:
            return TaskOutput(loss, next(iter(logits.values())), rows_out)
        return TaskOutput(loss, logits, rows_out)

    # ------------------------------------------------------------------ parameters, save/load

    def save_pretrained(self, save_directory, *, training_state: bool = True) -> None:
        """The prefix in PEFT's format (see `PrefixModel.save_pretrained`) + `task_heads.safetensors` +
        `task_config.json` (tasks, pooling, dropout)."""
        from safetensors.torch import save_file

        d = Path(save_directory)
        self.prefix_model.save_pretrained(d, training_state=training_state)
        save_file({k: v.detach().cpu().contiguous() for k, v in self.heads.state_dict().items()},
                  str(d / HEADS_FILE))
        with open(d / TASKS_CONFIG, "w") as f:
            json.dump({"tasks": {k: list(v) for k, v in self.tasks.items()}, "pooling": self.pooling,
                       "classifier_dropout": self.classifier_dropout}, f, indent=2)

    @classmethod
    def from_pretrained(cls, backbone: nn.Module, adapter_dir, *, is_trainable: bool = False,
                        backend: str | None = None) -> "PrefixTaskModel":
        from safetensors.torch import load_file

        from .transformers import PrefixModel

        d = Path(adapter_dir)
        with open(d / TASKS_CONFIG) as f:
            tc = json.load(f)
        pm = PrefixModel.from_pretrained(backbone, d, is_trainable=is_trainable, backend=backend)
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self.tasks = {k: (v[0], int(v[1])) for k, v in tc["tasks"].items()}
        self.task_names = list(self.tasks)
        self.prefix_model = pm
        self.pooling = tc["pooling"]
        self.classifier_dropout = float(tc["classifier_dropout"])
        self.dropout = nn.Dropout(self.classifier_dropout)
        hidden = getattr(backbone.config, "hidden_size", None) or getattr(backbone.config, "d_model", None)
        dev = next(backbone.parameters()).device
        self.heads = nn.ModuleDict({k: nn.Linear(hidden, n) for k, (_, n) in self.tasks.items()}).to(dev)
        self.heads.load_state_dict(load_file(str(d / HEADS_FILE)))
        for p in self.heads.parameters():
            p.requires_grad_(is_trainable)
        return self
