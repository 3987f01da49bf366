"""Which parameters train: the one place that flips `requires_grad`, and PEFT's parameter counts for every wrapper."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn


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
