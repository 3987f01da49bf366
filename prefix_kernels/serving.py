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
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from .config import PrefixTuningConfig
from .ops import prefix_attention
from .transformers.attention import PrefixMask, prefix_mask_function
from .transformers.model import PrefixModel

MULTI_ATTN_IMPLEMENTATION = "prefix_kernels_multi"


class _BankState:
    """Like `PrefixState`, for a fixed bank `[L, 2, T, Hkv, P, D]` and the current batch's `prefix_index`."""

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


def multi_prefix_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    binding = getattr(module, "_prefix_kernels", None)
    state = getattr(binding, "state", None)
    if not isinstance(state, _BankState):
        raise RuntimeError(f"attention implementation {MULTI_ATTN_IMPLEMENTATION!r} is set on a module that is not "
                           "part of a MultiPrefixModel")
    if state.prefix_index is None:
        raise ValueError("MultiPrefixModel needs prefix_index=[batch] or adapter_names=[...] in forward/generate")
    if isinstance(attention_mask, PrefixMask):
        padding, causal = attention_mask.key_padding_mask, attention_mask.causal
    elif attention_mask is None:
        padding, causal = None, bool(getattr(module, "is_causal", True))
    else:
        raise TypeError(f"unexpected attention mask {type(attention_mask).__name__}")
    B = query.shape[0]
    index = state.prefix_index
    if index.shape[0] != B:
        raise ValueError(f"prefix_index has {index.shape[0]} rows but the batch has {B} (generate with beams or "
                         "num_return_sequences expands the batch: pass the expanded prefix_index)")
    prefix_k, prefix_v = state.layer_prefix(binding.slot)
    out = prefix_attention(query, key, value, prefix_k.to(query.dtype), prefix_v.to(query.dtype), causal=causal,
                           key_padding_mask=None if padding is None else padding.to(query.device),
                           scale=scaling, prefix_index=index.to(query.device), backend=state.backend)
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(MULTI_ATTN_IMPLEMENTATION, multi_prefix_attention_forward)
AttentionMaskInterface.register(MULTI_ATTN_IMPLEMENTATION, prefix_mask_function)


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
        model.set_attn_implementation(MULTI_ATTN_IMPLEMENTATION)
        self.forward = functools.partial(MultiPrefixModel.forward, self)

    def _patch(self) -> None:
        self._state = _BankState(self.prefix_config.backend)
        super()._patch()

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_pretrained(cls, model: nn.Module, adapters: dict, *, backend: str | None = None) -> "MultiPrefixModel":
        """`adapters`: name -> folder written by `save_pretrained` / `export_merged` (or by PEFT prefix tuning).
        Every adapter must have the same P; heads saved with them are not used (serving shares one model)."""
        import json

        from safetensors.torch import load_file

        embeds, offsets = {}, set()
        for name, d in adapters.items():
            d = Path(d)
            embeds[name] = load_file(str(d / "adapter_model.safetensors"))["prompt_embeddings"]
            ours = d / "prefix_kernels_config.json"
            offsets.add(json.loads(ours.read_text())["config"].get("position_offset", True) if ours.is_file() else True)
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
