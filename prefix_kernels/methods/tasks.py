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

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from transformers.utils import ModelOutput

from . import adapter_io
from .config import PrefixTuningConfig
from . import pooling as _pooling
from .prefix_model import PrefixModel, checkpoint_files, get_prefix_model
from .adapter_io import CHECKPOINT_META, decode_meta, read_checkpoint, strip_prefix
from .trainable import (AdapterStateDict, TrainableParameters, model_device, set_trainable)

TASK_KINDS = ("seq", "tok")
POOLINGS = ("auto", *_pooling.POOLINGS)


@dataclass
class TaskOutput(ModelOutput):
    """`loss` (mean over the rows of all tasks, each task's rows weighted by their count), `logits` (a tensor
    when the batch holds one task: `[B, C]` or `[B, S, C]`; else a dict task name -> logits of its rows) and
    `rows` (task name -> indices of its rows in the batch). A `ModelOutput`, as transformers.Trainer expects
    (`out["loss"]`, `out[0]`)."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | dict | None = None
    rows: dict | None = None


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


class PrefixTaskModel(AdapterStateDict, TrainableParameters):
    """Frozen backbone + shared fused prefix + one head per task (P-Tuning v2).

    Args:
        backbone: a transformers base model (hidden states out, no head), or a `PrefixModel` already wrapping
            one (used as is; `config` is then None).
        config: `PTuningV2Config` (or `PrefixTuningConfig`); `modules_to_save` is ignored (heads live here).
        tasks: `{name: num_labels}` (sequence classification) or `{name: ("seq" | "tok", num_labels)}`;
            an int means one sequence-classification task named "default".
        pooling: see the module docstring.
        classifier_dropout: dropout before the heads (default: the backbone's `hidden_dropout_prob` or 0.1).
    """

    # The loss is a mean over this batch's rows: transformers.Trainer must scale it for gradient accumulation.
    accepts_loss_kwargs = False

    def __init__(self, backbone: nn.Module, config: PrefixTuningConfig | None, tasks, *, pooling: str = "auto",
                 classifier_dropout: float | None = None):
        super().__init__()
        self.tasks = _normalize_tasks(tasks)
        self.task_names = list(self.tasks)
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        base = backbone.base_model if isinstance(backbone, PrefixModel) else backbone
        hidden = getattr(base.config, "hidden_size", None) or getattr(base.config, "d_model", None)
        if hidden is None:
            raise ValueError(f"cannot read hidden_size from {type(base.config).__name__}")
        if isinstance(backbone, PrefixModel):
            if config is not None:
                raise TypeError("config must be None when the backbone is already a PrefixModel (it has its config)")
            self.prefix_model = backbone
        else:
            if isinstance(config, PrefixTuningConfig) and config.modules_to_save != []:
                config = type(config).from_dict({**config.to_dict(), "modules_to_save": []})
            self.prefix_model = get_prefix_model(backbone, config)
        causal = any(bool(getattr(m, "is_causal", False)) for _, m in self.prefix_model.layout.attention_modules)
        self.pooling = ("last" if causal else "cls") if pooling == "auto" else pooling
        if classifier_dropout is None:
            classifier_dropout = getattr(base.config, "classifier_dropout", None)
        if classifier_dropout is None:
            classifier_dropout = getattr(base.config, "hidden_dropout_prob", 0.1)
        self.classifier_dropout = float(classifier_dropout)
        self.dropout = nn.Dropout(self.classifier_dropout)
        self.heads = nn.ModuleDict({name: nn.Linear(hidden, n) for name, (_, n) in self.tasks.items()})
        self.heads.to(model_device(base))
        self._register_adapter_state_hooks()

    # ------------------------------------------------------------------ helpers
    @property
    def backbone(self) -> nn.Module:
        return self.prefix_model.base_model

    def pool(self, out, attention_mask: torch.Tensor) -> torch.Tensor:
        """`[B, hidden]`: the vector a sequence-classification head reads from a backbone output (`pooling`)."""
        return _pooling.pool(out, attention_mask, self.pooling)

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
        B, seq_len = ref.shape[:2]
        if attention_mask is None:
            attention_mask = torch.ones(B, seq_len, dtype=torch.long, device=ref.device)
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
                    pooled = self.pool(out, attention_mask)
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

    def activation_checkpointing_enable(self, activation_checkpointing_kwargs: dict | None = None, **kwargs):
        """Gradient checkpointing in the backbone (non-reentrant only; see `PrefixModel`)."""
        self.prefix_model.activation_checkpointing_enable(activation_checkpointing_kwargs, **kwargs)

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None, **kwargs):
        self.prefix_model.activation_checkpointing_enable(gradient_checkpointing_kwargs, **kwargs)

    # ------------------------------------------------------------------ parameters, save/load
    def _adapter_modules(self) -> list[str]:
        return ["prefix_model", "heads"]

    def _adapter_meta(self) -> dict:
        return {"kind": "tasks", **self._task_spec()}

    def _task_spec(self) -> dict:
        return {"tasks": {k: list(v) for k, v in self.tasks.items()}, "pooling": self.pooling,
                "classifier_dropout": self.classifier_dropout}

    def save_pretrained(self, save_directory: str | os.PathLike, *, training_state: bool = True,
                        is_main_process: bool = True, **kwargs) -> None:
        """The prefix in PEFT's format (see `PrefixModel.save_pretrained`) + `task_heads.safetensors` +
        `task_config.json` (tasks, pooling, dropout). Other keyword arguments as `PrefixModel.save_pretrained`."""
        if not is_main_process:
            return
        d = Path(save_directory)
        self.prefix_model.save_pretrained(d, training_state=training_state)
        adapter_io.write_safetensors(d / adapter_io.TASK_HEADS, self.heads.state_dict())
        adapter_io.write_json(d / adapter_io.TASK_CONFIG, self._task_spec())

    @classmethod
    def from_pretrained(cls, backbone: nn.Module, adapter_dir: str | os.PathLike, *, is_trainable: bool = False,
                        backend: str | None = None) -> "PrefixTaskModel":
        """Load a task model saved by `save_pretrained` (or a transformers.Trainer checkpoint of one) onto
        `backbone`. The files are read first; if building the model still fails, the backbone is unwrapped
        again."""
        d = Path(adapter_dir)
        checkpoint = None if (d / adapter_io.TASK_CONFIG).is_file() else read_checkpoint(d)
        if checkpoint is not None:
            spec, state = checkpoint
            if spec.get("kind") != "tasks":
                raise ValueError(f"{d} is not a PrefixTaskModel checkpoint (kind {spec.get('kind')!r})")
            head_state = strip_prefix(state, "heads.")
            inner = strip_prefix(state, "prefix_model.")
            if CHECKPOINT_META not in inner:
                raise ValueError(f"{d}: the checkpoint holds no prefix_model.{CHECKPOINT_META}")
            files = checkpoint_files(d, decode_meta(inner.pop(CHECKPOINT_META), d), inner)
        else:
            spec = adapter_io.read_json(d / adapter_io.TASK_CONFIG)
            head_state = adapter_io.read_safetensors(d / adapter_io.TASK_HEADS)
            files = PrefixModel._read_files(d)
        missing = [k for k in ("tasks", "pooling", "classifier_dropout") if k not in spec]
        if missing:
            raise ValueError(f"adapter file {d / adapter_io.TASK_CONFIG} is missing the fields {missing}")
        prefix_model = PrefixModel._from_files(backbone, files, is_trainable=is_trainable, backend=backend)
        try:
            model = cls(prefix_model, None, spec["tasks"], pooling=spec["pooling"],
                        classifier_dropout=float(spec["classifier_dropout"]))
            model.heads.load_state_dict(head_state)
        except BaseException:
            prefix_model.unload()
            raise
        set_trainable(model.heads, is_trainable)
        return model
