"""`get_nb_trainable_parameters` / `print_trainable_parameters`, as PEFT users know them, for every wrapper."""

from __future__ import annotations

from torch import nn


class TrainableParameters(nn.Module):
    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """(trainable, total) parameter counts."""
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        total = sum(p.numel() for p in self.parameters())
        return trainable, total

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || "
              f"trainable%: {100 * trainable / max(total, 1):.4f}")
