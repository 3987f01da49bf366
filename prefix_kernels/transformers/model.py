"""`PrefixModel` / `get_prefix_model`: wrap a transformers model so that it trains a prefix with the fused op.

The wrapper freezes the base model, attaches a `PrefixEncoder`, switches the model's attention to the
"prefix_kernels" attention function (`AttentionInterface` + `AttentionMaskInterface`) and hooks the model's
entry points (its forward, and for encoder-decoders its encoder, which `generate` calls directly):

- a forward pre-hook runs the prefix encoder once per step and keeps its output `[layers, 2, Hkv, P, D]` in
  this model's `PrefixState` (each attention module holds a binding to the state and its slot, so two wrapped
  models never share anything); the state stays until the next step, so gradient checkpointing recomputes
  with the same prefix;
- the same hook shifts the positions of real tokens by P (`position_offset=True`, what PEFT and the P-Tuning
  v2 code do) and derives them from the attention mask, so that left padding gives the same results as no
  padding. The prefix never enters the KV cache: the cache holds real tokens only.
"""

from __future__ import annotations

import functools
import inspect
import os

import torch
from torch import nn

from ..config import PrefixTuningConfig
from ..encoders import PrefixEncoder
from ..trainable import TrainableParameters
from .attention import ATTN_IMPLEMENTATION, LayerBinding
from .families import (ModelLayout, default_heads, detect, model_device, task_type_of, validate_positions)


class PrefixState:
    """Per-model state for the current forward step: the prefix keys/values of every layer."""

    def __init__(self, encoder: PrefixEncoder, backend: str | None):
        self.encoder = encoder
        self.backend = backend
        self.kv: torch.Tensor | None = None
        self.depth = 0

    def enter(self) -> None:
        if self.depth == 0:
            self.kv = self.encoder()
        self.depth += 1

    def exit(self) -> None:
        self.depth = max(0, self.depth - 1)

    def layer_prefix(self, slot: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.kv is None:
            raise RuntimeError("the prefix has not been computed for this step: call the model through its "
                               "PrefixModel (forward/generate), not a submodule")
        return self.kv[slot, 0], self.kv[slot, 1]


def _resolve_heads(model: nn.Module, config: PrefixTuningConfig) -> list[str]:
    names = default_heads(model) if config.modules_to_save is None else list(config.modules_to_save)
    for name in names:
        try:
            model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"modules_to_save names {name!r}, which is not a submodule of "
                             f"{type(model).__name__}") from None
    return names


class PrefixModel(TrainableParameters):
    """A transformers model with a trainable prefix on every attention layer, computed by the fused op.

    Use `prefix_kernels.get_prefix_model(model, config)` to build one and `PrefixModel.from_pretrained(model,
    adapter_dir)` to load a saved adapter. It keeps the model's API (`forward`, `generate`, `config`, ...:
    attributes it does not define are the base model's) and adds `save_pretrained`, `export_merged`,
    `print_trainable_parameters` and `unload` (which restores the original attention and returns the model).
    """

    def __init__(self, model: nn.Module, config: PrefixTuningConfig, *, layout: ModelLayout | None = None):
        super().__init__()
        if not isinstance(config, PrefixTuningConfig):
            raise TypeError(f"config must be a PrefixTuningConfig or PTuningV2Config, got {type(config).__name__}")
        config.validate()
        if getattr(model, "_prefix_kernels_model", None) is not None:
            raise ValueError(f"{type(model).__name__} is already wrapped by a PrefixModel; unload() it first")
        # Everything that can fail is checked before the model is touched.
        layout = layout or detect(model)
        validate_positions(layout, config.num_virtual_tokens, config.position_offset)
        heads = _resolve_heads(model, config)
        if config.backend is not None:
            from ..ops.dispatch import unavailable_reason

            reason = unavailable_reason(config.backend, model_device(model))
            if reason is not None:
                raise ValueError(f"backend {config.backend!r} cannot run this model: {reason}")

        self.base_model = model
        self.prefix_config = config
        self.layout = layout
        self.heads = heads
        self.prefix_encoder = PrefixEncoder(
            config.num_virtual_tokens, layout.num_layers, layout.num_kv_heads, layout.head_dim,
            projection=config.prefix_projection, encoder_hidden_size=config.encoder_hidden_size,
            init=config.init, dropout=config.prefix_dropout,
        ).to(model_device(model))
        self._state = PrefixState(self.prefix_encoder, config.backend)
        self._patch()
        # Expose the base model's forward signature (the HF Trainer reads it to choose the input columns).
        self.forward = functools.update_wrapper(functools.partial(PrefixModel.forward, self), model.forward)

    # ------------------------------------------------------------------ patching
    def _patch(self) -> None:
        model = self.base_model
        self._requires_grad = {n: p.requires_grad for n, p in model.named_parameters()}
        for p in model.parameters():
            p.requires_grad_(False)
        for name in self.heads:
            for p in model.get_submodule(name).parameters():
                p.requires_grad_(True)
        self._original_attn = model.config._attn_implementation
        model.set_attn_implementation(ATTN_IMPLEMENTATION)
        for slot, (_, module) in enumerate(self.layout.attention_modules):
            module._prefix_kernels = LayerBinding(self._state, slot)
        self._signature = inspect.signature(model.forward)
        self._hooks = [
            model.register_forward_pre_hook(self._pre_forward, with_kwargs=True),
            model.register_forward_hook(self._post_forward, always_call=True),
        ]
        encoder = model.get_encoder() if getattr(model.config, "is_encoder_decoder", False) else None
        if encoder is not None and encoder is not model:
            self._hooks += [
                encoder.register_forward_pre_hook(self._pre_encoder, with_kwargs=True),
                encoder.register_forward_hook(self._post_forward, always_call=True),
            ]
        if self.prefix_config.position_offset and self.layout.position_style == "embed_positions":
            for module in self.layout.position_modules:
                self._hooks.append(module.register_forward_pre_hook(self._shift_embed_positions, with_kwargs=True))
        model._prefix_kernels_model = True

    def unload(self) -> nn.Module:
        """Undo the patch: original attention, no hooks, original `requires_grad`; returns the base model."""
        model = self.base_model
        for h in self._hooks:
            h.remove()
        self._hooks = []
        for _, module in self.layout.attention_modules:
            if hasattr(module, "_prefix_kernels"):
                del module._prefix_kernels
        model.set_attn_implementation(self._original_attn)
        for n, p in model.named_parameters():
            p.requires_grad_(self._requires_grad.get(n, p.requires_grad))
        if hasattr(model, "_prefix_kernels_model"):
            del model._prefix_kernels_model
        self._state.kv = None
        return model

    # ------------------------------------------------------------------ hooks
    def _as_kwargs(self, args: tuple, kwargs: dict) -> dict:
        if not args:
            return dict(kwargs)
        names = [p.name for p in self._signature.parameters.values()
                 if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        if len(args) > len(names):
            raise TypeError(f"{type(self.base_model).__name__}.forward got {len(args)} positional arguments")
        out = dict(zip(names, args))
        out.update(kwargs)
        return out

    def _pre_forward(self, module, args, kwargs):
        self._check_mask_batch(self._as_kwargs(args, kwargs))
        style = self.layout.position_style
        if style in ("position_ids", "roberta"):
            kwargs = self._as_kwargs(args, kwargs)
            args = ()
            positions = self._positions(kwargs)
            if positions is not None:
                kwargs["position_ids"] = positions
        self._state.enter()
        return args, kwargs

    @staticmethod
    def _check_mask_batch(kw: dict) -> None:
        ref = kw.get("input_ids") if kw.get("input_ids") is not None else kw.get("inputs_embeds")
        mask = kw.get("attention_mask")
        if ref is not None and isinstance(mask, torch.Tensor) and mask.ndim == 2 and mask.shape[0] != ref.shape[0]:
            raise ValueError(f"attention_mask must have one row per sequence: expected batch {ref.shape[0]}, "
                             f"got attention_mask of shape {tuple(mask.shape)}")

    def _pre_encoder(self, module, args, kwargs):
        self._state.enter()
        return args, kwargs

    def _post_forward(self, module, args, output):
        self._state.exit()
        return output

    def _positions(self, kw: dict) -> torch.Tensor | None:
        P = self.prefix_config.num_virtual_tokens if self.prefix_config.position_offset else 0
        ids, embeds = kw.get("input_ids"), kw.get("inputs_embeds")
        ref = ids if ids is not None else embeds
        if ref is None:
            return None
        position_ids = kw.get("position_ids")
        T = ref.shape[1]
        roberta = self.layout.position_style == "roberta"
        if position_ids is not None:
            positions = position_ids + P
        else:
            cache = kw.get("cache", kw.get("past_key_values"))
            past = cache.get_seq_length() if cache is not None and hasattr(cache, "get_seq_length") else 0
            mask = kw.get("attention_mask")
            device = ref.device
            if isinstance(mask, torch.Tensor) and mask.ndim == 2 and mask.shape[1] == past + T:
                real = mask.to(torch.bool)
                count = real.long().cumsum(-1)
                if roberta:
                    pad = self.layout.padding_idx
                    positions = torch.where(real, count + pad + P, torch.full_like(count, pad))[:, -T:]
                else:
                    positions = ((count - 1).clamp(min=0) + P)[:, -T:]
            elif roberta and ids is not None and past == 0:
                pad = self.layout.padding_idx
                real = ids.ne(pad)
                count = real.long().cumsum(-1)
                positions = torch.where(real, count + pad + P, torch.full_like(count, pad))
            else:
                positions = torch.arange(past, past + T, device=device).unsqueeze(0) + P
                if roberta:
                    positions = positions + self.layout.padding_idx + 1
        self._check_positions(positions, T)
        return positions

    def _check_positions(self, positions: torch.Tensor, T: int) -> None:
        limit = self.layout.max_positions
        if limit is None or positions.numel() == 0:
            return
        top = int(positions.max())
        if self.layout.position_style == "roberta":
            top = top - self.layout.padding_idx - 1
        if top >= limit:
            P = self.prefix_config.num_virtual_tokens
            raise ValueError(
                f"{self.layout.model_type} has {limit} absolute positions, but this input needs position {top} "
                f"(P={P} virtual tokens{' before the tokens' if self.prefix_config.position_offset else ''}, "
                f"T={T} tokens): shorten the input to at most "
                f"{limit - (P if self.prefix_config.position_offset else 0)} tokens or use fewer virtual tokens")

    def _shift_embed_positions(self, module, args, kwargs):
        # BART-style learned positions: forward(input_ids, cache_length=0, position_ids=None), position_ids 1D.
        input_ids = args[0] if args else kwargs.get("input_ids")
        cache_length = args[1] if len(args) > 1 else kwargs.get("cache_length", 0)
        position_ids = kwargs.get("position_ids")
        if position_ids is None:
            T = input_ids.shape[1]
            position_ids = torch.arange(cache_length, cache_length + T, device=module.weight.device)
        position_ids = position_ids + self.prefix_config.num_virtual_tokens
        self._check_positions(position_ids, position_ids.shape[-1])
        return (input_ids,), {"cache_length": cache_length, "position_ids": position_ids}

    # ------------------------------------------------------------------ the model's API
    def forward(self, *args, **kwargs):
        return self.base_model(*args, **kwargs)

    def generate(self, *args, **kwargs):
        return self.base_model.generate(*args, **kwargs)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
            return getattr(self.base_model, name)

    def get_base_model(self) -> nn.Module:
        return self.base_model

    def activation_checkpointing_enable(self, activation_checkpointing_kwargs: dict | None = None, **kwargs):
        """Enable gradient (activation) checkpointing in the base model. Non-reentrant only: every layer's
        prefix comes from one prefix-encoder graph, which reentrant checkpointing would back-propagate through
        once per layer."""
        ckpt = dict(activation_checkpointing_kwargs or {})
        if ckpt.setdefault("use_reentrant", False):
            raise ValueError("PrefixModel supports non-reentrant gradient checkpointing only: expected "
                             "use_reentrant=False, got True")
        self.base_model.activation_checkpointing_enable(activation_checkpointing_kwargs=ckpt, **kwargs)

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None, **kwargs):
        """Alias of `activation_checkpointing_enable` (transformers' older name)."""
        self.activation_checkpointing_enable(gradient_checkpointing_kwargs, **kwargs)


    def merged_prompt_embeddings(self) -> torch.Tensor:
        """The prefix as PEFT saves it: `[P, L * 2 * Hkv * D]`, the MLP (if any) applied, no dropout."""
        with torch.no_grad():
            return self.prefix_encoder.prompt_embeddings().detach().float().cpu().contiguous()

    @property
    def task_type(self) -> str:
        return task_type_of(self.base_model)

    def save_pretrained(self, save_directory: str | os.PathLike, *, training_state: bool = True) -> None:
        """Write PEFT's adapter format (`adapter_config.json`, `adapter_model.safetensors` with
        `prompt_embeddings [P, L*2*Hkv*D]`), plus `prefix_kernels_config.json` and, in
        `prefix_kernels_state.safetensors`, the trainable head weights and (with `training_state`) the full
        prefix encoder, MLP included, so that training resumes exactly."""
        from .adapter import save_adapter

        save_adapter(self, save_directory, training_state=training_state)

    def export_merged(self, save_directory: str | os.PathLike) -> None:
        """Save the merged prefix only (MLP dropped): loads as a plain prefix here and in PEFT."""
        self.save_pretrained(save_directory, training_state=False)

    @classmethod
    def from_pretrained(cls, model: nn.Module, adapter_dir: str | os.PathLike, *, is_trainable: bool = False,
                        backend: str | None = None) -> "PrefixModel":
        """Load an adapter saved by `save_pretrained` / `export_merged` or by PEFT (prefix tuning) onto `model`.
        Everything is checked against the model before it is modified."""
        from .adapter import load_adapter

        return load_adapter(cls, model, adapter_dir, is_trainable=is_trainable, backend=backend)


def get_prefix_model(model: nn.Module, config: PrefixTuningConfig) -> PrefixModel:
    """Freeze `model`, attach a prefix encoder and switch its attention to the fused prefix op."""
    return PrefixModel(model, config)
