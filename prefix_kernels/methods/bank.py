"""Several prefixes in one batch: different adapters served together through the op's `prefix_index`.

    server = MultiPrefixModel.from_pretrained(base_model, {"sst2": "adapters/sst2", "imdb": "adapters/imdb"})
    out = server(input_ids=ids, attention_mask=mask, adapter_names=["sst2", "imdb", "sst2"])
    text = server.generate(input_ids=ids, attention_mask=mask, adapter_names=[...], max_new_tokens=20)
    server.save_pretrained("bank/")          # later: MultiPrefixModel.from_pretrained(base_model, "bank/")

The T adapters' merged prefixes are laid out once, when the server is built, as one bank
`[layers, 2, T, Hkv, P, D]`; every layer hands the fused op its `[T, Hkv, P, D]` slice plus `prefix_index [B]`,
and the kernel reads each row's prefix in place: no adapter is copied per row or per step, and no
`[B, Hkv, P, D]` tensor exists. All adapters must have the same P and fit the same base model.
Serving is inference only (the bank is a buffer). The rows of a `generate` call with `num_beams` or
`num_return_sequences` > 1 are expanded by transformers: pass `prefix_index` for the expanded rows.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from ..transformers.families import ModelLayout, detect
from . import adapter_io
from .config import PrefixTuningConfig
from .prefix_model import PrefixModel, PrefixState, refuse_static_cache_generation
from .trainable import model_device


class BankState(PrefixState):
    """`PrefixState` for a fixed bank `[layers, 2, T, Hkv, P, D]`: `layer_prefix` gives `[T, Hkv, P, D]` and
    `prefix_index` (int64 `[B]`, on the bank's device, range checked) says which prefix each row reads. Both are
    set once per model call by `select`, never per step or layer."""

    def __init__(self, backend_name: str | None):
        super().__init__(None, backend_name)

    def begin_step(self) -> None:
        pass  # nothing to compute: the bank is fixed

    def select(self, bank: torch.Tensor, prefix_index: torch.Tensor) -> None:
        if bank is not self._kv:  # a new bank tensor (the model was moved or cast): drop the old casts
            self.set_kv(bank)
        self.prefix_index = prefix_index


def _stack(prompt_embeddings: dict[str, torch.Tensor]) -> tuple[list[str], torch.Tensor]:
    """The adapters' names and their prefixes stacked `[T, P, layers*2*Hkv*D]`; all must have one shape."""
    if not prompt_embeddings:
        raise ValueError("prompt_embeddings must name at least one adapter")
    shapes = {n: tuple(t.shape) for n, t in prompt_embeddings.items()}
    if len(set(shapes.values())) != 1 or len(next(iter(shapes.values()))) != 2:
        raise ValueError(f"all adapters must have the same prompt_embeddings shape [P, layers*2*Hkv*D], got {shapes}")
    names = list(prompt_embeddings)
    return names, torch.stack([prompt_embeddings[n].detach() for n in names])


class MultiPrefixModel(PrefixModel):
    """A base model serving T prefixes at once; each row of a batch picks one (`prefix_index` or
    `adapter_names`). Build it with `from_pretrained(model, {name: adapter_dir})`, `from_pretrained(model,
    bank_dir)` (a bank written by `save_pretrained`) or `MultiPrefixModel(model, {name: [P, layers*2*Hkv*D]})`;
    `unload()` restores the model. It has no prefix encoder: `prefix_bank` holds the merged prefixes."""

    def __init__(self, model: nn.Module, prompt_embeddings: dict[str, torch.Tensor], *, position_offset: bool = True,
                 backend: str | None = None, layout: ModelLayout | None = None):
        names, flat = _stack(prompt_embeddings)
        T, P = flat.shape[:2]
        layout = layout or detect(model)
        layers, Hkv, D = layout.num_layers, layout.num_kv_heads, layout.head_dim
        if tuple(flat.shape[1:]) != (P, layers * 2 * Hkv * D):
            raise ValueError(f"adapters do not fit this model: prompt_embeddings shape [P, layers*2*Hkv*D] expected "
                             f"{(P, layers * 2 * Hkv * D)}, got {tuple(flat.shape[1:])}")
        config = PrefixTuningConfig(num_virtual_tokens=P, position_offset=position_offset, modules_to_save=[],
                                    backend=backend)
        super().__init__(model, config, layout=layout)
        self.adapter_names = names
        flat = flat.to(model_device(model), next(model.parameters()).dtype)
        bank = flat.view(T, P, layers, 2, Hkv, D).permute(2, 3, 0, 4, 1, 5).contiguous()
        self.register_buffer("prefix_bank", bank, persistent=False)  # [layers, 2, T, Hkv, P, D]

    # A bank serves fixed prefixes and is no Trainer's model: its state_dict is nn.Module's.
    state_dict = nn.Module.state_dict

    def _build_prefix(self) -> BankState:
        self.prefix_encoder = None  # the bank is the prefix
        return BankState(self.prefix_config.backend)

    # ------------------------------------------------------------------ the model's API
    def _select(self, prefix_index, adapter_names) -> None:
        """Which prefix each row reads, checked once per call (the attention layers do not check it again)."""
        if (prefix_index is None) == (adapter_names is None):
            raise ValueError("pass exactly one of prefix_index=[batch] (int) or adapter_names=[batch] (str)")
        if adapter_names is not None:
            unknown = [n for n in adapter_names if n not in self.adapter_names]
            if unknown:
                raise ValueError(f"unknown adapter names {unknown}; this server has {self.adapter_names}")
            prefix_index = [self.adapter_names.index(n) for n in adapter_names]
        index = torch.as_tensor(prefix_index, device=self.prefix_bank.device)
        if index.dtype.is_floating_point or index.dtype.is_complex or index.dtype == torch.bool:
            raise TypeError(f"prefix_index must hold integers, got {index.dtype}")
        index = index.long()
        if index.ndim != 1:
            raise ValueError(f"prefix_index must be 1D [batch], got shape {tuple(index.shape)}")
        if index.numel() and (int(index.min()) < 0 or int(index.max()) >= len(self.adapter_names)):
            raise ValueError(f"prefix_index must be in [0, {len(self.adapter_names)}), got {index.tolist()}")
        self._state.select(self.prefix_bank, index)

    def forward(self, *args, prefix_index=None, adapter_names=None, **kwargs):
        self._select(prefix_index, adapter_names)
        return self.base_model(*args, **kwargs)

    def generate(self, *args, prefix_index=None, adapter_names=None, **kwargs):
        self._select(prefix_index, adapter_names)
        refuse_static_cache_generation(self.base_model, kwargs)
        return self.base_model.generate(*args, **kwargs)

    # ------------------------------------------------------------------ save / load
    def merged_prompt_embeddings(self) -> torch.Tensor:
        """The bank's prefixes as PEFT saves one: `[T, P, layers * 2 * Hkv * D]`, in `adapter_names` order."""
        bank = self.prefix_bank.detach()  # [layers, 2, T, Hkv, P, D]
        T, P = bank.shape[2], bank.shape[4]
        return bank.permute(2, 4, 0, 1, 3, 5).reshape(T, P, -1).float().cpu().contiguous()

    def save_pretrained(self, save_directory: str | os.PathLike, *, training_state: bool = True) -> None:
        """One prefix adapter per sub-folder (each loads with `PrefixModel.from_pretrained`) and
        `prefix_bank.json` with the adapters' names in bank order. A bank holds merged prefixes only, so
        `training_state` changes nothing."""
        d = Path(save_directory)
        folders = adapter_io.bank_folders(self.adapter_names)
        for folder, prompt in zip(folders.values(), self.merged_prompt_embeddings()):
            adapter_io.save_prefix_adapter(d / folder, model=self.base_model, config=self.prefix_config,
                                           layout=self.layout, prompt_embeddings=prompt)
        adapter_io.write_bank_index(d, folders)

    @classmethod
    def from_pretrained(cls, model: nn.Module, adapters: dict | str | os.PathLike, *, is_trainable: bool = False,
                        backend: str | None = None) -> "MultiPrefixModel":
        """`adapters`: `{name: folder}` of adapters written by `PrefixModel.save_pretrained` / `export_merged`
        (or by PEFT prefix tuning), or the folder of a bank written by `MultiPrefixModel.save_pretrained`.
        Every adapter must have the same P and position offset; heads saved with them are not used (serving
        shares one model), and a bank does not train (`is_trainable` must be False)."""
        if is_trainable:
            raise ValueError("a MultiPrefixModel serves adapters and does not train: is_trainable must be False")
        if not isinstance(adapters, dict):
            adapters = adapter_io.read_bank_index(adapters)
        if not adapters:
            raise ValueError("adapters must name at least one adapter folder, got none")
        layout = detect(model)
        embeds, offsets = {}, set()
        for name, d in adapters.items():
            files = adapter_io.read_prefix_adapter(d, with_state=False)
            adapter_io.check_prefix_geometry(files, layout)
            embeds[name] = files.prompt_embeddings
            offsets.add(adapter_io.prefix_config_from(files).position_offset)
        if len(offsets) != 1:
            raise ValueError("all adapters must use the same position_offset")
        return cls(model, embeds, position_offset=offsets.pop(), backend=backend, layout=layout)
