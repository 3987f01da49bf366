"""Which parameters train, and what a checkpoint holds: the one place that flips `requires_grad`, PEFT's
parameter counts for every wrapper, and `AdapterStateDict` (a wrapper's `state_dict` is its adapter)."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable

import torch
from torch import nn

from .adapter_io import CHECKPOINT_META, decode_meta, encode_meta


def set_trainable(modules: nn.Module | Iterable[nn.Module], flag: bool) -> None:
    """Set `requires_grad` of every parameter of `modules` (one module or several) to `flag`."""
    for module in [modules] if isinstance(modules, nn.Module) else modules:
        for p in module.parameters():
            p.requires_grad_(flag)


def freeze(modules: nn.Module | Iterable[nn.Module]) -> None:
    set_trainable(modules, False)


def requires_grad_flags(module: nn.Module) -> dict[str, bool]:
    """`requires_grad` of every named parameter, to put back with `restore_requires_grad`."""
    return {n: p.requires_grad for n, p in module.named_parameters()}


def restore_requires_grad(module: nn.Module, flags: dict[str, bool]) -> None:
    for n, p in module.named_parameters():
        p.requires_grad_(flags.get(n, p.requires_grad))


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (CPU for a model without parameters)."""
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


class TrainableParameters(nn.Module):
    """`get_nb_trainable_parameters` / `print_trainable_parameters`, as PEFT users know them."""

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """(trainable, total) parameter counts."""
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        total = sum(p.numel() for p in self.parameters())
        return trainable, total

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || "
              f"trainable%: {100 * trainable / max(total, 1):.4f}")


class AdapterStateDict(nn.Module):
    """`state_dict()` holds the adapter only (the tensors of `_adapter_modules()`, plus `_adapter_meta()` as a
    uint8 JSON tensor), never the frozen base model; `load_state_dict` takes it back and does not report the
    base model's tensors as missing.

    This is what `transformers.Trainer` saves and loads for a model that is not a `PreTrainedModel` (its
    `model.safetensors` checkpoints, `save_model`, `load_best_model_at_end`, `resume_from_checkpoint`): the
    checkpoint is the adapter, tied embeddings never reach safetensors, and `from_pretrained` reads the folder.
    The base model's own weights are `get_base_model().state_dict()`."""

    def _adapter_modules(self) -> list[str]:
        raise NotImplementedError

    def _adapter_meta(self) -> dict:
        raise NotImplementedError

    def state_dict(self, *args, destination=None, prefix: str = "", keep_vars: bool = False):
        if args:
            raise TypeError("state_dict takes keyword arguments only (destination=, prefix=, keep_vars=)")
        out = OrderedDict() if destination is None else destination
        for name in self._adapter_modules():
            self.get_submodule(name).state_dict(destination=out, prefix=f"{prefix}{name}.", keep_vars=keep_vars)
        out[prefix + CHECKPOINT_META] = encode_meta(self._adapter_meta())
        return out

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        meta = state_dict.pop(prefix + CHECKPOINT_META, None)
        if meta is not None:
            saved, own = decode_meta(meta, "state_dict"), self._adapter_meta()
            if not self._meta_matches(saved, own):
                error_msgs.append(f"the checkpoint was saved from a different {type(self).__name__}: expected "
                                  f"{own}, got {saved}")
        self.__dict__["_loading_prefix"] = prefix
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    @staticmethod
    def _meta_matches(saved: dict, own: dict) -> bool:
        return saved == own

    @staticmethod
    def _forgive_frozen_keys(module: nn.Module, incompatible_keys) -> None:
        """A load_state_dict post-hook: the frozen base model is not part of the checkpoint."""
        prefix = module.__dict__.pop("_loading_prefix", None)
        if prefix is None:
            return
        adapter = {prefix + k for k in module.state_dict()}
        kept = [k for k in incompatible_keys.missing_keys if not k.startswith(prefix) or k in adapter]
        incompatible_keys.missing_keys[:] = kept

    def _register_adapter_state_hooks(self) -> None:
        self.register_load_state_dict_post_hook(AdapterStateDict._forgive_frozen_keys)
