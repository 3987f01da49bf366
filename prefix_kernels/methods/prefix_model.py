"""`PrefixModel` / `get_prefix_model`: wrap a transformers model so that it trains a prefix with the fused op.

The wrapper freezes the base model, attaches a `PrefixEncoder`, switches the model's attention to the
"prefix_kernels" attention function (`prefix_kernels.transformers`) and hooks the model's entry points (its
forward, and for encoder-decoders its encoder, which `generate` calls directly):

- a forward pre-hook runs the prefix encoder once per step and keeps its output `[layers, 2, Hkv, P, D]` in
  this model's `PrefixState` (each attention module holds a `LayerBinding` to the state and its slot, so two
  wrapped models never share anything); the state stays until the next step, so gradient checkpointing
  recomputes with the same prefix, and without autograd or dropout it is reused while the encoder's
  parameters are unchanged (every decoding step of `generate` is a model call);
- the same hook shifts the positions of real tokens by P (`position_offset=True`, what PEFT and the P-Tuning
  v2 code do) and derives them from the attention mask, so that left padding gives the same results as no
  padding. The prefix never enters the KV cache: the cache holds real tokens only;
- and it finds packed sequences (padding-free batches: `DataCollatorWithFlattening`'s position ids that restart
  per sequence, or its `cu_seq_lens_q/k`), once per forward, as the op's `cu_seqlens` in the state: every layer
  then attends within each sequence, with no dense mask.

`state_dict()` / `load_state_dict()` hold the adapter only (`AdapterStateDict`), so that transformers.Trainer
checkpoints are the adapter, loadable with `PrefixModel.from_pretrained(base, checkpoint_dir)`.
"""

from __future__ import annotations

import functools
import inspect
import os
from pathlib import Path

import torch
from torch import nn

from ..ops import Backend, resolve_backend
from ..ops.backends import (TRITON_BWD_ENV, TRITON_FWD_ENV, cuda_arch, triton_bwd_mode, triton_fwd_mode,
                            unavailable_reason)
from ..transformers.attention import ATTN_IMPLEMENTATION, LayerBinding
from ..transformers import compat, families
from ..transformers.families import ModelLayout, default_heads, detect, task_type_of
from . import adapter_io
from .config import PrefixTuningConfig
from .encoders import PrefixEncoder
from .peft_compat import PeftCompatMixin
from .adapter_io import CHECKPOINT_WEIGHTS, read_checkpoint, strip_prefix
from .trainable import (AdapterStateDict, TrainableParameters, freeze, model_device, requires_grad_flags,
                        restore_requires_grad, set_trainable)


class PrefixState:
    """What the "prefix_kernels" attention function reads through a module's `LayerBinding(state, slot)`.

    - `layer_prefix(slot, dtype)`: that layer's prefix keys and values `[Hkv, P, D]` for the current step, in
      `dtype`. The step's prefix `[layers, 2, Hkv, P, D]` is cast once per (step, dtype), not once per layer.
    - `prefix_index`: None here (every row reads the one prefix); see `BankState`.
    - `cu_seqlens`: int32 `[n + 1]` when the current forward packs n sequences in one row (set by the
      wrapper's pre-forward hook, values checked there once), else None.
    - `backend_for(device, features)`: the op's `Backend` record for a device and the op features a layer
      uses (`ops.backends.features_of`: window, softcap, sinks, packed), resolved once per (device, features)
      for the model's lifetime: Gemma 2's sliding and full layers resolve one record each, once.

    `enter`/`exit` bracket a model call (calls nest: an encoder-decoder's encoder inside its forward); the
    prefix encoder runs on the outermost `enter`, except that without autograd and dropout its last output is
    reused while its parameters are unchanged (`_reuse_key`): `generate` runs it once, not once per token.
    """

    def __init__(self, encoder: nn.Module | None, backend_name: str | None):
        self.encoder = encoder
        self.backend_name = backend_name
        self.prefix_index: torch.Tensor | None = None
        self.cu_seqlens: torch.Tensor | None = None
        self.depth = 0
        self._kv: torch.Tensor | None = None
        self._kv_by_dtype: dict[torch.dtype, torch.Tensor] = {}
        self._backends: dict[tuple[torch.device, tuple[str, ...]], Backend] = {}
        self._kv_key: tuple | None = None

    def set_kv(self, kv: torch.Tensor | None, key: tuple | None = None) -> None:
        """The prefix of every layer, `[layers, 2, ...]`, for the steps to come (None: none). `key`: what it
        was computed from, when it may be reused (`begin_step`)."""
        self._kv = kv
        self._kv_by_dtype = {}
        self._kv_key = key

    def enter(self) -> None:
        if self.depth == 0:
            self.begin_step()
        self.depth += 1

    def exit(self) -> None:
        self.depth = max(0, self.depth - 1)

    def begin_step(self) -> None:
        key = self._reuse_key()
        if key is None or key != self._kv_key:
            self.set_kv(self.encoder(), key)

    def _reuse_key(self) -> tuple | None:
        """Without autograd and without active dropout the encoder is a pure function of its parameters, so
        its output is kept across calls (every decoding step of `generate` is a model call) until a parameter changes:
        in place (`_version`: optimizer steps, `load_state_dict`, `copy_`), replaced, moved or cast. None: the
        output must be computed (active dropout; autograd: the graph belongs to one step)."""
        if torch.is_grad_enabled() or self.encoder is None:
            return None
        if self.encoder.training and any(isinstance(m, nn.Dropout) and m.p > 0 for m in self.encoder.modules()):
            return None
        params = list(self.encoder.parameters())
        if not params:
            return None
        kind = params[0].device.type
        autocast = (torch.is_autocast_enabled(kind), torch.get_autocast_dtype(kind)) \
            if torch.amp.is_autocast_available(kind) else None
        tensors = tuple((id(p), p._version, p.data_ptr(), p.dtype, p.device, p.shape) for p in params)
        return self.encoder.training, torch.is_inference_mode_enabled(), autocast, tensors

    def layer_prefix(self, slot: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        kv = self._kv_by_dtype.get(dtype)
        if kv is None:
            if self._kv is None:
                raise RuntimeError("the prefix has not been computed for this step: call the model through its "
                                   "PrefixModel (forward/generate), not a submodule")
            kv = self._kv_by_dtype[dtype] = self._kv.to(dtype)
        return kv[slot, 0], kv[slot, 1]

    def backend_for(self, device: torch.device, features: tuple[str, ...] = ()) -> Backend:
        key = (device, features)
        record = self._backends.get(key)
        if record is None:
            record = self._backends[key] = (resolve_backend(self.backend_name, device, features=features) if features
                                            else resolve_backend(self.backend_name, device))
        return record


def refuse_static_cache(cache) -> None:
    """The fused op reads the real tokens' keys as they are, S of them; a static cache holds max_length slots
    whose unused tail only a dense mask could hide."""
    if cache is None:
        return
    parts = [cache, getattr(cache, "self_attention_cache", None), getattr(cache, "cross_attention_cache", None)]
    kinds = {type(p).__name__ for p in parts if p is not None}
    kinds |= {type(layer).__name__ for p in parts for layer in (getattr(p, "layers", None) or [])}
    static = sorted(k for k in kinds if "Static" in k)
    if static:
        raise NotImplementedError(f"prefix_kernels supports dynamic caches only (the default), got {static[0]}: "
                                  "a static cache keeps unused key slots that only a dense mask could hide")


def refuse_static_cache_generation(model: nn.Module, kwargs: dict) -> None:
    """`generate` builds its cache from `cache_implementation`: only the default dynamic cache is supported."""
    config = kwargs.get("generation_config") or getattr(model, "generation_config", None)
    implementation = kwargs.get("cache_implementation", getattr(config, "cache_implementation", None))
    if implementation not in (None, "dynamic"):
        raise NotImplementedError(f"prefix_kernels supports dynamic caches only (the default), got "
                                  f"cache_implementation={implementation!r}")
    refuse_static_cache(kwargs.get("past_key_values"))


def validate_positions(layout: ModelLayout, num_virtual_tokens: int, position_offset: bool) -> None:
    """Can this model's real tokens be shifted by P positions (`position_offset`)?"""
    families.check_position_offset(layout, position_offset)
    if not position_offset:
        return
    if layout.position_style == "none" and (layout.rope or layout.max_positions):
        raise ValueError(f"position_offset=True needs to shift the positions of real tokens by P, but "
                         f"{layout.model_type} takes no position_ids; use position_offset=False")
    if layout.max_positions is not None and num_virtual_tokens >= layout.max_positions:
        raise ValueError(f"num_virtual_tokens must be below the model's {layout.max_positions} absolute positions "
                         f"with position_offset=True (real tokens start at position P), got "
                         f"{num_virtual_tokens}")


def _resolve_heads(model: nn.Module, config: PrefixTuningConfig) -> list[str]:
    names = default_heads(model) if config.modules_to_save is None else list(config.modules_to_save)
    for name in names:
        try:
            model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"modules_to_save names {name!r}, which is not a submodule of "
                             f"{type(model).__name__}") from None
    return names


def check_model(model: nn.Module, config: PrefixTuningConfig,
                layout: ModelLayout | None = None) -> tuple[ModelLayout, list[str]]:
    """Everything that can make wrapping fail, checked before the model is touched: the layout of the model,
    its positions, the heads to train and the backend. Returns the layout and the head names."""
    if not isinstance(config, PrefixTuningConfig):
        raise TypeError(f"config must be a PrefixTuningConfig or PTuningV2Config, got {type(config).__name__}")
    config.validate()
    if getattr(model, "_prefix_kernels_model", None) is not None:
        raise ValueError(f"{type(model).__name__} is already wrapped by a PrefixModel; unload() it first")
    layout = layout or detect(model)
    validate_positions(layout, config.num_virtual_tokens, config.position_offset)
    heads = _resolve_heads(model, config)
    if config.backend is not None:
        reason = unavailable_reason(config.backend, model_device(model))
        if reason is not None:
            raise ValueError(f"backend {config.backend!r} cannot run this model: {reason}")
    try:
        # The wrapped model's attention calls are deterministic: the atomic backward could never run for them.
        bwd = triton_bwd_mode(deterministic=True)
        fwd = triton_fwd_mode(cuda_arch(model_device(model)))
    except ValueError as e:
        raise ValueError(f"get_prefix_model cannot honour the environment: {e}") from None
    # The kernel modes are the triton backend's: another backend named in the config would never read them. (Without
    # one, the backend follows the device at each call, and a model wrapped on CPU may still move to a GPU.)
    changed = [f"{name}={mode}" for name, mode, default in ((TRITON_BWD_ENV, bwd, "split"),
                                                             (TRITON_FWD_ENV, fwd, "pointers")) if mode != default]
    if config.backend not in (None, "triton") and changed:
        raise ValueError(f"get_prefix_model cannot honour the environment: {', '.join(changed)} selects kernels of "
                         f"the triton backend, but the config names backend {config.backend!r}")
    return layout, heads


def _copy_into(model: nn.Module, tensors: dict[str, torch.Tensor], device: torch.device) -> None:
    """Copy `{qualified parameter or buffer name: tensor}` into the model's own tensors."""
    for name, value in tensors.items():
        module_name, _, leaf = name.rpartition(".")
        getattr(model.get_submodule(module_name), leaf).copy_(value.to(device))


class PrefixModel(PeftCompatMixin, AdapterStateDict, TrainableParameters):
    """A transformers model with a trainable prefix on every attention layer, computed by the fused op.

    Use `prefix_kernels.get_prefix_model(model, config)` to build one and `PrefixModel.from_pretrained(model,
    adapter_dir)` to load a saved adapter. It keeps the model's API (`forward`, `generate`, `config`, ...:
    attributes it does not define are the base model's) and adds `save_pretrained`, `export_merged`,
    `print_trainable_parameters` and `unload` (which restores the original attention and returns the model).
    `state_dict()` is the adapter (prefix encoder, trainable heads, the config), not the frozen base model:
    what transformers.Trainer checkpoints (see `AdapterStateDict`).
    """

    def __init__(self, model: nn.Module, config: PrefixTuningConfig, *, layout: ModelLayout | None = None):
        super().__init__()
        layout, heads = check_model(model, config, layout)
        self.base_model = model
        self.prefix_config = config
        self.layout = layout
        self.heads = heads
        self._state = self._build_prefix()
        self._patch()
        self._register_adapter_state_hooks()
        # Expose the base model's forward signature (the HF Trainer reads it to choose the input columns).
        self.forward = functools.update_wrapper(functools.partial(type(self).forward, self), model.forward)

    def _build_prefix(self) -> PrefixState:
        """The source of this model's prefix: a trainable encoder run once per step."""
        config, layout = self.prefix_config, self.layout
        self.prefix_encoder = PrefixEncoder(
            config.num_virtual_tokens, layout.num_layers, layout.num_kv_heads, layout.head_dim,
            projection=config.prefix_projection, encoder_hidden_size=config.encoder_hidden_size,
            init=config.init, dropout=config.prefix_dropout,
        ).to(model_device(self.base_model))
        return PrefixState(self.prefix_encoder, config.backend)

    # ------------------------------------------------------------------ patching
    def _patch(self) -> None:
        model = self.base_model
        self._requires_grad = requires_grad_flags(model)
        freeze(model)
        set_trainable([model.get_submodule(name) for name in self.heads], True)
        self._original_attn = families.current_attn_implementation(model)
        model.set_attn_implementation(self.layout.attn_implementation)
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
        restore_requires_grad(model, self._requires_grad)
        if hasattr(model, "_prefix_kernels_model"):
            del model._prefix_kernels_model
        self._state.set_kv(None)
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
        named = self._as_kwargs(args, kwargs)
        self._check_mask_batch(named)
        refuse_static_cache(named.get("past_key_values"))
        outermost = self._state.depth == 0
        cu_seqlens = self._packing(named) if outermost else self._state.cu_seqlens
        if self.layout.position_style in ("position_ids", "roberta"):
            kwargs = named
            args = ()
            positions = self._positions(kwargs, cu_seqlens)
            if positions is not None:
                kwargs["position_ids"] = positions
        if outermost:
            self._state.cu_seqlens = cu_seqlens
        self._state.enter()
        return args, kwargs

    # ------------------------------------------------------------------ packed sequences (padding-free batches)
    def _packing(self, kw: dict) -> torch.Tensor | None:
        """The op's `cu_seqlens` (int32 `[n + 1]`) when this call packs n > 1 sequences in its one row, else None.

        Two signals, as transformers reads them: the flash-attention keywords `cu_seq_lens_q` / `cu_seq_lens_k`
        (`DataCollatorWithFlattening(return_flash_attn_kwargs=True)`), or, without an attention mask and without
        a cache, `position_ids` that restart inside a row (a step other than +1 starts a sequence:
        `masking_utils.find_packed_sequence_indices`). transformers' own non-flash attention looks at the
        position ids only when the model made no cache (`use_cache=False`); here they are read whatever
        `use_cache` says, so that a packed training batch never attends across its sequences. One device sync
        per forward (and none for a call with an attention mask, a cache or no position ids). Decoders only:
        transformers' encoders never pack."""
        if self.layout.kind != "decoder":
            return None
        ref = kw.get("input_ids") if kw.get("input_ids") is not None else kw.get("inputs_embeds")
        if ref is None or ref.ndim < 2:
            return None
        B, S = ref.shape[0], ref.shape[1]
        cu_q, cu_k = kw.get("cu_seq_lens_q"), kw.get("cu_seq_lens_k")
        if cu_q is not None or cu_k is not None:
            return self._cu_seqlens_from_kwargs(cu_q, cu_k, B, S, ref.device, kw.get("attention_mask"))
        positions = kw.get("position_ids")
        cache = kw.get("cache", kw.get("past_key_values"))
        if positions is None or kw.get("attention_mask") is not None or cache is not None or positions.ndim != 2:
            return None
        if positions.shape[-1] != S:
            return None  # the model refuses it itself
        positions = positions.to(ref.device).expand(B, -1)
        step = torch.diff(positions, prepend=positions[:, :1] - 1, dim=-1)
        starts = (step != 1).nonzero()  # [(row, token)] where a sequence starts after another: the one sync
        if starts.shape[0] == 0:
            return None
        if B != 1:
            rows = sorted(set(starts[:, 0].tolist()))
            raise NotImplementedError(
                f"packed sequences (position_ids restarting inside a row: rows {rows}) are supported in a batch of one "
                f"row (B = 1, as DataCollatorWithFlattening makes it), got {B} rows; pad the batch with an "
                "attention_mask instead, or flatten it into one row")
        ends = torch.tensor([S], dtype=torch.int32, device=ref.device)
        return torch.cat([torch.zeros(1, dtype=torch.int32, device=ref.device), starts[:, 1].to(torch.int32), ends])

    @staticmethod
    def _cu_seqlens_from_kwargs(cu_q, cu_k, B: int, S: int, device, mask) -> torch.Tensor:
        """`cu_seq_lens_q/k` checked once (one sync): one row, no attention mask, q == k, 0 .. S, never
        decreasing."""
        if cu_q is None or cu_k is None:
            raise ValueError("packed sequences need both cu_seq_lens_q and cu_seq_lens_k (self-attention: equal), "
                             f"got only {'cu_seq_lens_q' if cu_k is None else 'cu_seq_lens_k'}")
        if B != 1:
            raise ValueError(f"packed sequences (cu_seq_lens_q) take one row (batch 1), got {B} rows")
        if mask is not None:
            raise ValueError("packed sequences (cu_seq_lens_q) take no attention_mask: every token is real")
        cu_q, cu_k = (torch.as_tensor(c, device=device) for c in (cu_q, cu_k))
        for name, c in (("cu_seq_lens_q", cu_q), ("cu_seq_lens_k", cu_k)):
            if c.ndim != 1 or c.shape[0] < 2 or c.dtype.is_floating_point or c.dtype == torch.bool:
                raise ValueError(f"{name} must be an integer tensor [n + 1] (n >= 1 sequences), got "
                                 f"{c.dtype} of shape {tuple(c.shape)}")
        if cu_q.shape != cu_k.shape:
            raise ValueError(f"cu_seq_lens_q and cu_seq_lens_k must be equal (self-attention), got shapes "
                             f"{tuple(cu_q.shape)} and {tuple(cu_k.shape)}")
        bad = (cu_q != cu_k).any() | (cu_q[0] != 0) | (cu_q[-1] != S) | (torch.diff(cu_q) < 0).any()
        if bool(bad):
            raise ValueError(f"cu_seq_lens_q / cu_seq_lens_k must be equal, start at 0, end at the {S} tokens and "
                             f"never decrease, got {cu_q.tolist()} and {cu_k.tolist()}")
        return cu_q.to(torch.int32)

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

    # ------------------------------------------------------------------ positions of real tokens
    @property
    def _offset(self) -> int:
        return self.prefix_config.num_virtual_tokens if self.prefix_config.position_offset else 0

    def _positions(self, kw: dict, cu_seqlens: torch.Tensor | None = None) -> torch.Tensor | None:
        """The position_ids of this call's tokens: the caller's, or the model's own numbering (from the
        attention mask when it covers the cache and the new tokens; per sequence in a packed row), real tokens
        shifted by the offset. With the adapter disabled, the base model's own: the caller's position_ids, those
        of a packed row, or none."""
        ids, embeds = kw.get("input_ids"), kw.get("inputs_embeds")
        ref = ids if ids is not None else embeds
        if self._prefix_disabled:
            if kw.get("position_ids") is None and cu_seqlens is not None and ref is not None:
                return self._packed_positions(cu_seqlens, ref.shape[1], 0)
            return kw.get("position_ids")
        if ref is None:
            return None
        seq_len = ref.shape[1]
        if kw.get("position_ids") is not None:
            positions = kw["position_ids"] + self._offset
        elif cu_seqlens is not None:
            positions = self._packed_positions(cu_seqlens, seq_len, self._offset)
        else:
            cache = kw.get("cache", kw.get("past_key_values"))
            past = cache.get_seq_length() if cache is not None and hasattr(cache, "get_seq_length") else 0
            mask = kw.get("attention_mask")
            if isinstance(mask, torch.Tensor) and mask.ndim == 2 and mask.shape[1] == past + seq_len:
                positions = self._positions_from_mask(mask.to(torch.bool))[:, -seq_len:]
            elif self.layout.position_style == "roberta" and ids is not None and past == 0:
                positions = self._positions_from_mask(ids.ne(self.layout.padding_idx))
            else:
                positions = self._positions_in_order(past, seq_len, ref.device)
        self._check_positions(positions, seq_len)
        return positions

    @staticmethod
    def _packed_positions(cu_seqlens: torch.Tensor, seq_len: int, offset: int) -> torch.Tensor:
        """`offset .. offset + len - 1` inside each packed sequence, `[1, S]` (no sync: the size is known)."""
        cu = cu_seqlens.long()
        starts = torch.repeat_interleave(cu[:-1], torch.diff(cu), output_size=seq_len)
        return (torch.arange(seq_len, device=cu.device) - starts + offset).unsqueeze(0)

    def _positions_from_mask(self, real: torch.Tensor) -> torch.Tensor:
        """Real tokens numbered in order whatever the padding (RoBERTa: from padding_idx + 1, padding at
        padding_idx), then shifted by the offset."""
        count = real.long().cumsum(-1)
        if self.layout.position_style == "roberta":
            pad = self.layout.padding_idx
            return torch.where(real, count + pad + self._offset, torch.full_like(count, pad))
        return (count - 1).clamp(min=0) + self._offset

    def _positions_in_order(self, past: int, seq_len: int, device: torch.device) -> torch.Tensor:
        positions = torch.arange(past, past + seq_len, device=device).unsqueeze(0) + self._offset
        if self.layout.position_style == "roberta":
            positions = positions + self.layout.padding_idx + 1
        return positions

    def _check_positions(self, positions: torch.Tensor, seq_len: int) -> None:
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
                f"{seq_len} tokens): shorten the input to at most {limit - self._offset} tokens or use fewer "
                f"virtual tokens")

    def _shift_embed_positions(self, module, args, kwargs):
        # BART-style learned positions, whose forward takes the cache length under a version-dependent name.
        if self._prefix_disabled:
            return None
        return compat.shift_learned_positions(module, args, kwargs, self.prefix_config.num_virtual_tokens,
                                              self._check_positions)

    # ------------------------------------------------------------------ the model's API
    def forward(self, *args, labels=None, **kwargs):
        # `labels` is named here because transformers.Trainer finds the label columns in the class's forward
        # (`find_labels`), and without them reports no eval_loss; an instance's `forward` has the base model's
        # signature (for the Trainer's input columns).
        if labels is not None:
            kwargs["labels"] = labels
        return self.base_model(*args, **kwargs)

    def generate(self, *args, **kwargs):
        refuse_static_cache_generation(self.base_model, kwargs)
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

    def set_attn_implementation(self, attn_implementation, *args, **kwargs):
        """Refused: the prefix lives in the "prefix_kernels" attention function, so another implementation
        would drop it without a word."""
        raise ValueError(f"{type(self).__name__} runs its prefix in the {ATTN_IMPLEMENTATION!r} attention "
                         f"implementation; set_attn_implementation({attn_implementation!r}) would drop the prefix. "
                         f"Call unload() to get the base model back first.")

    def activation_checkpointing_enable(self, activation_checkpointing_kwargs: dict | None = None, **kwargs):
        """Enable gradient (activation) checkpointing in the base model. Non-reentrant only: every layer's
        prefix comes from one prefix-encoder graph, which reentrant checkpointing would back-propagate through
        once per layer."""
        ckpt = dict(activation_checkpointing_kwargs or {})
        if ckpt.setdefault("use_reentrant", False):
            raise ValueError("PrefixModel supports non-reentrant gradient checkpointing only: expected "
                             "use_reentrant=False, got True")
        compat.enable_activation_checkpointing(self.base_model, ckpt, **kwargs)

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None, **kwargs):
        """Alias of `activation_checkpointing_enable` (transformers' older name)."""
        self.activation_checkpointing_enable(gradient_checkpointing_kwargs, **kwargs)

    @property
    def accepts_loss_kwargs(self) -> bool:
        """Whether the base model's loss takes `num_items_in_batch` (transformers.Trainer then leaves the
        gradient-accumulation scaling to it). Trainer assumes so for any forward with `**kwargs`, but
        classification heads and several LM heads compute a plain per-batch mean, which accumulation would then
        add up instead of averaging: True only where the loss goes through transformers' `loss_function`."""
        own = getattr(type(self.base_model), "accepts_loss_kwargs", None)
        if own is not None:
            return bool(own)
        return _loss_takes_num_items(type(self.base_model))

    @property
    def task_type(self) -> str:
        return task_type_of(self.base_model)

    # ------------------------------------------------------------------ save / load
    def merged_prompt_embeddings(self) -> torch.Tensor:
        """The prefix as PEFT saves it: `[P, layers * 2 * Hkv * D]`, the MLP (if any) applied, no dropout."""
        with torch.no_grad():
            return self.prefix_encoder.prompt_embeddings().detach().float().cpu().contiguous()

    def save_pretrained(self, save_directory: str | os.PathLike, *, training_state: bool = True,
                        is_main_process: bool = True, state_dict: dict | None = None, **kwargs) -> None:
        """Write PEFT's adapter format (`adapter_config.json`, `adapter_model.safetensors` with
        `prompt_embeddings [P, layers*2*Hkv*D]`), plus `prefix_kernels_config.json` and, in
        `prefix_kernels_state.safetensors`, the trainable head weights and (with `training_state`) the full
        prefix encoder, MLP included, so that training resumes exactly.

        Takes the keyword arguments PEFT's and transformers' `save_pretrained` take: nothing is written when
        `is_main_process` is False; `state_dict`, `safe_serialization` (always safetensors), `selected_adapters`
        (one adapter) and the hub arguments are accepted and not used: the adapter is read from the model."""
        if not is_main_process:
            return
        adapter_io.save_prefix_adapter(
            save_directory, model=self.base_model, config=self.prefix_config, layout=self.layout,
            prompt_embeddings=self.merged_prompt_embeddings(), heads=self.heads,
            encoder_state=self.prefix_encoder.state_dict() if training_state else None)

    def export_merged(self, save_directory: str | os.PathLike) -> None:
        """Save the merged prefix only (MLP dropped): loads as a plain prefix here and in PEFT."""
        self.save_pretrained(save_directory, training_state=False)

    @classmethod
    def from_pretrained(cls, model: nn.Module, adapter_dir: str | os.PathLike, *, is_trainable: bool = False,
                        backend: str | None = None, revision: str | None = None,
                        cache_dir: str | os.PathLike | None = None, token: str | bool | None = None) -> "PrefixModel":
        """Load an adapter saved by `save_pretrained` / `export_merged` or by PEFT (prefix tuning) onto `model`:
        a folder, or a Hugging Face Hub id (`org/name`; a local folder of that name wins). Everything is
        checked against the model before it is modified."""
        adapter_dir = adapter_io.resolve_adapter_dir(adapter_dir, revision=revision, cache_dir=cache_dir, token=token)
        return cls._from_files(model, cls._read_files(adapter_dir), is_trainable=is_trainable, backend=backend)

    @staticmethod
    def _read_files(adapter_dir) -> adapter_io.PrefixAdapterFiles:
        """An adapter folder (`save_pretrained`, PEFT) or a `transformers.Trainer` checkpoint / `save_model`
        folder (its `model.safetensors` is this model's `state_dict`)."""
        if not (Path(adapter_dir) / adapter_io.ADAPTER_CONFIG).is_file():
            checkpoint = read_checkpoint(adapter_dir)
            if checkpoint is not None:
                return checkpoint_files(adapter_dir, *checkpoint)
        return adapter_io.read_prefix_adapter(adapter_dir)

    @classmethod
    def _from_files(cls, model: nn.Module, files: adapter_io.PrefixAdapterFiles, *, is_trainable: bool,
                    backend: str | None) -> "PrefixModel":
        config = adapter_io.prefix_config_from(files, backend=backend)
        layout = detect(model)
        adapter_io.check_prefix_adapter(files, config, model, layout)
        pm = cls._apply_adapter(model, config, layout, files)
        if not is_trainable:
            freeze([pm.prefix_encoder, *(model.get_submodule(name) for name in pm.heads)])
        return pm

    @classmethod
    def _apply_adapter(cls, model: nn.Module, config: PrefixTuningConfig, layout: ModelLayout,
                       files: adapter_io.PrefixAdapterFiles) -> "PrefixModel":
        """Wrap the model and load the checked files; on any failure undo everything (head weights restored,
        patch removed), so that nothing is half-loaded."""
        model_state = model.state_dict()
        saved_heads = {k: model_state[k].detach().clone() for k in files.head_state}
        pm = cls(model, config, layout=layout)
        try:
            with torch.no_grad():
                if files.encoder_state:
                    pm.prefix_encoder.load_state_dict(files.encoder_state)
                else:
                    pm.prefix_encoder.load_prompt_embeddings(files.prompt_embeddings)
                _copy_into(model, files.head_state, model_device(model))
        except BaseException:
            with torch.no_grad():
                _copy_into(model, saved_heads, model_device(model))
            pm.unload()
            raise
        return pm

    # ------------------------------------------------------------------ Trainer checkpoints (state_dict)
    def _adapter_modules(self) -> list[str]:
        return ["prefix_encoder", *(f"base_model.{name}" for name in self.heads)]

    def _adapter_meta(self) -> dict:
        layout = self.layout
        return {"kind": "prefix", "config": self.prefix_config.to_dict(), "model_type": layout.model_type,
                "groups": [list(g) for g in layout.groups], "num_layers": layout.num_layers,
                "num_kv_heads": layout.num_kv_heads, "head_dim": layout.head_dim, "heads": list(self.heads)}

    @staticmethod
    def _meta_matches(saved: dict, own: dict) -> bool:
        # What gives the tensors their meaning (with the layout and the heads); the backend, the dropout and the
        # initialisation may change between runs.
        def meaning(meta):
            config = meta.get("config") or {}
            return {**meta, "config": {k: config.get(k) for k in _CHECKPOINT_FIELDS}}
        return meaning(saved) == meaning(own)


_CHECKPOINT_FIELDS = ("num_virtual_tokens", "prefix_projection", "encoder_hidden_size", "position_offset")


@functools.lru_cache(maxsize=None)
def _loss_takes_num_items(model_class: type) -> bool:
    """Causal LMs whose forward computes its loss with transformers' `loss_function` (which divides by
    `num_items_in_batch` when given); not knowable from the signature."""
    if not model_class.__name__.endswith(("ForCausalLM", "LMHeadModel")):
        return False
    try:
        return "self.loss_function(" in inspect.getsource(model_class.forward)
    except (OSError, TypeError):
        return False


def checkpoint_files(directory, meta: dict, state: dict[str, torch.Tensor]) -> adapter_io.PrefixAdapterFiles:
    """The adapter files a PrefixModel `state_dict` stands for (`_adapter_meta` + its tensors)."""
    path = Path(directory) / CHECKPOINT_WEIGHTS
    if meta.get("kind") != "prefix" or not isinstance(meta.get("config"), dict):
        raise ValueError(f"{path} is not a PrefixModel checkpoint (kind {meta.get('kind')!r})")
    try:
        P, layers = int(meta["config"]["num_virtual_tokens"]), int(meta["num_layers"])
        Hkv, D = int(meta["num_kv_heads"]), int(meta["head_dim"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{path}: the checkpoint's {exc} is missing or invalid") from None
    encoder_state = strip_prefix(state, "prefix_encoder.")
    cfg = meta["config"]
    probe = PrefixEncoder(P, layers, Hkv, D, projection=bool(cfg.get("prefix_projection")),
                          encoder_hidden_size=cfg.get("encoder_hidden_size"))
    expected = {k: tuple(v.shape) for k, v in probe.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in encoder_state.items()}
    if expected != got:
        raise ValueError(f"{path}: prefix encoder tensors expected {expected}, got {got}")
    with torch.no_grad():
        probe.load_state_dict(encoder_state)
        prompt_embeddings = probe.prompt_embeddings().float()
    peft = {"peft_type": "PREFIX_TUNING", "num_virtual_tokens": P, "num_layers": layers,
            "num_attention_heads": Hkv, "token_dim": Hkv * D}
    ours = {"config": cfg, "model_type": meta.get("model_type"), "groups": meta.get("groups"),
            "num_kv_heads": Hkv, "head_dim": D, "heads": meta.get("heads", []), "training_state": True}
    return adapter_io.PrefixAdapterFiles(directory=Path(directory), peft=peft, ours=ours,
                                         prompt_embeddings=prompt_embeddings, encoder_state=encoder_state,
                                         head_state=strip_prefix(state, "base_model."))


def get_prefix_model(model: nn.Module, config: PrefixTuningConfig) -> PrefixModel:
    """Freeze `model`, attach a prefix encoder and switch its attention to the fused prefix op."""
    return PrefixModel(model, config)
