"""What differs between the transformers 5.x releases the integration runs on, in one place.

- The mask interface: up to 5.3 transformers calls mask functions with `cache_position` (the query
  positions) and no `q_length` / `q_offset`; from 5.4 with `q_length` and `q_offset`.
- Activation checkpointing: `activation_checkpointing_enable` appeared in 5.23; before it the same switch is
  `gradient_checkpointing_enable(gradient_checkpointing_kwargs=...)`.
- GPT-2 before 5.1 passes no `scaling` to the attention function; its eager function scales by the module's
  `scale_attn_weights` and `scale_attn_by_inverse_layer_idx`.
- BART-style learned position tables: their forward takes the cache length as `cache_length` from 5.23 and as
  `past_key_values_length` before.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn


def mask_query_shape(q_length: int | None, q_offset: int | None,
                     cache_position: torch.Tensor | None) -> tuple[int, int]:
    """`(q_length, q_offset)` from the arguments of either mask-interface signature. With only
    `cache_position`, q_offset is left at 0: reading its first value would sync the device, and the
    prefix mask does not need it."""
    if q_length is None:
        if cache_position is None:
            raise TypeError("the mask function needs q_length (transformers >= 5.4) or cache_position (< 5.4)")
        q_length = int(cache_position.shape[0])
    return int(q_length), int(q_offset or 0)


def module_scaling(module: nn.Module, head_dim: int) -> float | None:
    """The softmax scale of a module that does not pass `scaling` (GPT-2 in transformers 5.0); None: the
    op's default, 1/sqrt(head_dim)."""
    if not hasattr(module, "scale_attn_weights"):
        return None
    scale = head_dim ** -0.5 if module.scale_attn_weights else 1.0
    if getattr(module, "scale_attn_by_inverse_layer_idx", False):
        scale /= float(module.layer_idx + 1)
    return scale


def enable_activation_checkpointing(model: nn.Module, activation_checkpointing_kwargs: dict | None = None,
                                    **kwargs) -> None:
    """Turn on activation (gradient) checkpointing in a transformers model with the given checkpoint kwargs,
    under whichever name this transformers release has."""
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs=activation_checkpointing_kwargs, **kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=activation_checkpointing_kwargs, **kwargs)


def _cache_length_name(module: nn.Module) -> str:
    params = [p for p in inspect.signature(module.forward).parameters.values()
              if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    for p in params:
        if p.name in ("cache_length", "past_key_values_length"):
            return p.name
    raise TypeError(f"{type(module).__name__}.forward takes neither cache_length nor past_key_values_length "
                    f"(parameters: {[p.name for p in params]})")


def learned_positions_arguments(module: nn.Module, args: tuple,
                                kwargs: dict) -> tuple[torch.Tensor, int, torch.Tensor | None, str]:
    """The call of a BART-style learned position table, `forward(input_ids, <cache length>, position_ids)`:
    `(input_ids, cache_length, position_ids, name of the cache-length argument)`."""
    name = _cache_length_name(module)
    input_ids = args[0] if args else kwargs.get("input_ids")
    cache_length = args[1] if len(args) > 1 else kwargs.get(name, 0)
    position_ids = args[2] if len(args) > 2 else kwargs.get("position_ids")
    return input_ids, cache_length, position_ids, name


def shift_learned_positions(module: nn.Module, args: tuple, kwargs: dict, shift: int,
                            check=None) -> tuple[tuple, dict]:
    """A forward pre-hook body (`with_kwargs=True`) that moves the tokens of a BART-style learned position
    table by `shift` positions; `check(position_ids, length)` may refuse positions beyond the table."""
    input_ids, cache_length, position_ids, name = learned_positions_arguments(module, args, kwargs)
    if position_ids is None:
        seq_len = input_ids.shape[1]
        position_ids = torch.arange(cache_length, cache_length + seq_len, device=module.weight.device)
    position_ids = position_ids + shift
    if check is not None:
        check(position_ids, position_ids.shape[-1])
    return (input_ids,), {name: cache_length, "position_ids": position_ids}
