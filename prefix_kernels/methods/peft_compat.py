"""PEFT's habits on a `PrefixModel`: `disable_adapter()`, `disable_adapters()` / `enable_adapters()`,
and `merge_and_unload()` (which names what can be done instead).

While the adapter is disabled the model runs with a zero-length prefix (the op takes P = 0) and its tokens at
the base model's own positions (no shift by P, no renumbering around padding), so it computes what the
unwrapped model computes, without unpatching anything: hooks, gradient checkpointing and the attention
implementation stay as they are, which is what a reference pass inside a training loop (DPO and the like)
needs. Heads trained in place (`modules_to_save`) stay as trained: unlike PEFT, no original copy of them is
kept.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn


class _NoPrefix(nn.Module):
    """Stands in for the prefix encoder while the adapter is disabled: `[layers, 2, Hkv, 0, D]`."""

    def __init__(self, like: nn.Module, layers: int, kv_heads: int, head_dim: int):
        super().__init__()
        self._like = [like]  # a list: not a submodule, so that no parameter is seen twice
        self._shape = (layers, 2, kv_heads, 0, head_dim)

    def forward(self) -> torch.Tensor:
        ref = next(self._like[0].parameters(), None)
        if ref is None:
            return torch.empty(self._shape)
        return torch.empty(self._shape, dtype=ref.dtype, device=ref.device)


class PeftCompatMixin:
    """Methods PEFT users call on a `PeftModel`, for `PrefixModel` (put before it in the bases)."""

    @property
    def _prefix_disabled(self) -> bool:
        return self.__dict__.get("_prefix_kernels_disabled", False)

    def _set_prefix_disabled(self, disabled: bool) -> None:
        state = self._state
        if state.encoder is None or not hasattr(self, "prefix_encoder"):
            raise NotImplementedError(f"{type(self).__name__} serves a fixed bank of prefixes: disabling it is not "
                                      "supported; call the base model (get_base_model() after unload()) instead")
        if disabled == self._prefix_disabled:
            return
        if disabled:
            state.encoder = _NoPrefix(self.prefix_encoder, self.layout.num_layers, self.layout.num_kv_heads,
                                      self.layout.head_dim)
        else:
            state.encoder = self.prefix_encoder
        self.__dict__["_prefix_kernels_disabled"] = disabled
        # A prefix computed before the switch must not serve the next call.
        state.set_kv(None)

    @contextlib.contextmanager
    def disable_adapter(self):
        """Run the base model inside the block (no prefix, the base model's positions); the prefix comes back
        after it, also when the block raises."""
        was = self._prefix_disabled
        self._set_prefix_disabled(True)
        try:
            yield
        finally:
            self._set_prefix_disabled(was)

    def disable_adapters(self) -> None:
        """Run the base model until `enable_adapters()`."""
        self._set_prefix_disabled(True)

    def enable_adapters(self) -> None:
        self._set_prefix_disabled(False)

    def merge_and_unload(self, *args, **kwargs):
        raise NotImplementedError(
            "a prefix cannot be merged into the model's weights: it adds keys and values to every attention "
            "layer, no weight matrix can hold it. Use unload() to get the base model back without the prefix, "
            "or export_merged(dir) to save the prefix with its MLP folded in (PEFT's format)")

    def merge_adapter(self, *args, **kwargs):
        self.merge_and_unload()
