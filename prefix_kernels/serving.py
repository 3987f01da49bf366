"""Several prefixes in one batch: different adapters served together through the op's `prefix_index`.

    server = MultiPrefixModel.from_pretrained(base_model, {"sst2": "adapters/sst2", "imdb": "adapters/imdb"})
    out = server(input_ids=ids, attention_mask=mask, adapter_names=["sst2", "imdb", "sst2"])
    text = server.generate(input_ids=ids, attention_mask=mask, adapter_names=[...], max_new_tokens=20)

The T adapters' merged prefixes are laid out once, when the server is built, as one bank
`[layers, 2, T, Hkv, P, D]`; every layer hands the fused op its `[T, Hkv, P, D]` slice plus `prefix_index [B]`,
and the kernel reads each row's prefix in place: no adapter is copied per row or per step, and no
`[B, Hkv, P, D]` tensor exists. All adapters must have the same P and fit the same base model.
Serving is inference only (the bank is a buffer). The rows of a `generate` call with `num_beams` or
`num_return_sequences` > 1 are expanded by transformers: pass `prefix_index` for the expanded rows.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch
from torch import nn

from .config import PrefixTuningConfig
from .transformers.model import PrefixModel


class _BankState:
    """Like `PrefixState`, for a fixed bank `[L, 2, T, Hkv, P, D]` and the current batch's `prefix_index` (which
    the "prefix_kernels" attention function passes to the op)."""

    def __init__(self, backend: str | None):
        self.backend = backend
        self.kv: torch.Tensor | None = None
        self.prefix_index: torch.Tensor | None = None

    def enter(self) -> None:
        pass

    def exit(self) -> None:
        pass

    def layer_prefix(self, slot: int):
        return self.kv[slot, 0], self.kv[slot, 1]


class MultiPrefixModel(PrefixModel):
    """A base model serving T prefixes at once; each row of a batch picks one (`prefix_index` or
    `adapter_names`). Build it with `from_pretrained(model, {name: adapter_dir})` or
    `from_prompt_embeddings(model, {name: [P, L*2*Hkv*D]})`; `unload()` restores the model."""

    def __init__(self, model: nn.Module, prompt_embeddings: dict, *, position_offset: bool = True,
                 backend: str | None = None):
        if not prompt_embeddings:
            raise ValueError("prompt_embeddings must name at least one adapter")
        names = list(prompt_embeddings)
        shapes = {n: tuple(t.shape) for n, t in prompt_embeddings.items()}
        if len(set(shapes.values())) != 1:
            raise ValueError(f"all adapters must have the same prompt_embeddings shape [P, L*2*Hkv*D], got {shapes}")
        P = shapes[names[0]][0]
        config = PrefixTuningConfig(num_virtual_tokens=P, position_offset=position_offset, modules_to_save=[],
                                    backend=backend)
        super().__init__(model, config)
        L, H, D = self.layout.num_layers, self.layout.num_kv_heads, self.layout.head_dim
        if shapes[names[0]] != (P, L * 2 * H * D):
            raise ValueError(f"adapters do not fit this model: prompt_embeddings shape expected "
                             f"{(P, L * 2 * H * D)}, got {shapes[names[0]]}")
        dev = next(model.parameters()).device
        dtype = next(model.parameters()).dtype
        flat = torch.stack([prompt_embeddings[n].detach() for n in names]).to(dev, dtype)  # [T, P, L*2*H*D]
        bank = flat.view(len(names), P, L, 2, H, D).permute(2, 3, 0, 4, 1, 5).contiguous()  # [L, 2, T, H, P, D]
        for p in self.prefix_encoder.parameters():
            p.requires_grad_(False)
        self.prefix_encoder = None  # the bank replaces it
        self.register_buffer("prefix_bank", bank, persistent=False)
        self._state.kv = bank
        self.adapter_names = names
        self.forward = functools.partial(MultiPrefixModel.forward, self)

    def _patch(self) -> None:
        self._state = _BankState(self.prefix_config.backend)
        super()._patch()

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_pretrained(cls, model: nn.Module, adapters: dict, *, backend: str | None = None) -> "MultiPrefixModel":
        """`adapters`: name -> folder written by `save_pretrained` / `export_merged` (or by PEFT prefix tuning).
        Every adapter must have the same P; heads saved with them are not used (serving shares one model)."""
        from .transformers.adapter import _read_json, _read_safetensors

        embeds, offsets = {}, set()
        for name, d in adapters.items():
            d = Path(d)
            tensors = _read_safetensors(d / "adapter_model.safetensors")
            if "prompt_embeddings" not in tensors:
                raise ValueError(f"adapter {name!r}: {d / 'adapter_model.safetensors'} has no 'prompt_embeddings'")
            embeds[name] = tensors["prompt_embeddings"]
            ours = d / "prefix_kernels_config.json"
            config = _read_json(ours).get("config", {}) if ours.is_file() else {}
            offsets.add(config.get("position_offset", True))
        if len(offsets) != 1:
            raise ValueError("all adapters must use the same position_offset")
        return cls(model, embeds, position_offset=offsets.pop(), backend=backend)

    @classmethod
    def from_prompt_embeddings(cls, model, prompt_embeddings: dict, **kw) -> "MultiPrefixModel":
        return cls(model, prompt_embeddings, **kw)

    # ------------------------------------------------------------------ the model's API
    def _select(self, prefix_index, adapter_names) -> None:
        if (prefix_index is None) == (adapter_names is None):
            raise ValueError("pass exactly one of prefix_index=[batch] (int) or adapter_names=[batch] (str)")
        if adapter_names is not None:
            unknown = [n for n in adapter_names if n not in self.adapter_names]
            if unknown:
                raise ValueError(f"unknown adapter names {unknown}; this server has {self.adapter_names}")
            prefix_index = [self.adapter_names.index(n) for n in adapter_names]
        index = torch.as_tensor(prefix_index, dtype=torch.long, device=self.prefix_bank.device)
        if index.ndim != 1:
            raise ValueError(f"prefix_index must be 1D [batch], got shape {tuple(index.shape)}")
        if index.numel() and (int(index.min()) < 0 or int(index.max()) >= len(self.adapter_names)):
            raise ValueError(f"prefix_index must be in [0, {len(self.adapter_names)}), got {index.tolist()}")
        self._state.prefix_index = index

    def forward(self, *args, prefix_index=None, adapter_names=None, **kwargs):
        self._select(prefix_index, adapter_names)
        return self.base_model(*args, **kwargs)

    def generate(self, *args, prefix_index=None, adapter_names=None, **kwargs):
        self._select(prefix_index, adapter_names)
        return self.base_model.generate(*args, **kwargs)

    def save_pretrained(self, *a, **k):  # pragma: no cover - explicit refusal
        raise NotImplementedError("MultiPrefixModel serves saved adapters; save each one with its PrefixModel")

    def merged_prompt_embeddings(self):  # pragma: no cover
        raise NotImplementedError("MultiPrefixModel holds several prefixes; see prefix_bank")
