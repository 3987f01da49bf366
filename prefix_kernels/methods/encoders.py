"""Prefix encoders: the trainable part of Prefix Tuning / P-Tuning v2.

A prefix encoder holds the learned prefix for every attention layer of a model and produces, once per
forward step (never once per batch row), the keys and values `[Hkv, P, D]` of each layer. Its parameters
are named as in PEFT's `PrefixEncoder` (`embedding`, `transform.0`, `transform.2`) and its flat output
`[P, layers * 2 * Hkv * D]` has PEFT's column order `((layer * 2 + {0: K, 1: V}) * Hkv + head) * D + d`, so that
a PEFT adapter's `prompt_embeddings` loads as is.
"""

from __future__ import annotations

import torch
from torch import nn


class PrefixEncoder(nn.Module):
    """Embedding(P, layers*2*Hkv*D), or Embedding(P, Hkv*D) -> Linear -> Tanh -> Linear(layers*2*Hkv*D) when
    `projection` (the reparameterization of the Prefix Tuning paper).

    `forward()` takes no input and returns `[layers, 2, Hkv, P, D]` (keys at index 0, values at 1), contiguous, so
    that `out[layer, 0]` is that layer's `[Hkv, P, D]` prefix keys.
    """

    def __init__(
        self,
        num_virtual_tokens: int,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        *,
        projection: bool = False,
        encoder_hidden_size: int | None = None,
        init: str = "random",
        dropout: float = 0.0,
    ):
        super().__init__()
        self.num_virtual_tokens = num_virtual_tokens
        self.num_layers = num_layers
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.prefix_projection = projection
        token_dim = num_kv_heads * head_dim
        self.token_dim = token_dim
        out_dim = num_layers * 2 * token_dim
        if projection:
            hidden = encoder_hidden_size or token_dim
            self.encoder_hidden_size = hidden
            self.embedding = nn.Embedding(num_virtual_tokens, token_dim)
            self.transform = nn.Sequential(nn.Linear(token_dim, hidden), nn.Tanh(), nn.Linear(hidden, out_dim))
            if init == "zero":
                nn.init.zeros_(self.transform[-1].weight)
                nn.init.zeros_(self.transform[-1].bias)
        else:
            self.encoder_hidden_size = encoder_hidden_size
            self.embedding = nn.Embedding(num_virtual_tokens, out_dim)
            if init == "zero":
                nn.init.zeros_(self.embedding.weight)
        self.dropout = nn.Dropout(dropout)

    def prompt_embeddings(self) -> torch.Tensor:
        """The flat prefix `[P, layers * 2 * Hkv * D]` (PEFT's `prompt_embeddings`), MLP applied, no dropout."""
        weight = self.embedding.weight
        return self.transform(weight) if self.prefix_projection else weight

    def forward(self) -> torch.Tensor:
        flat = self.dropout(self.prompt_embeddings())
        P, layers, Hkv, D = self.num_virtual_tokens, self.num_layers, self.num_kv_heads, self.head_dim
        return flat.view(P, layers, 2, Hkv, D).permute(1, 2, 3, 0, 4).contiguous()

    @torch.no_grad()
    def load_prompt_embeddings(self, prompt_embeddings: torch.Tensor) -> None:
        """Load a flat `[P, layers * 2 * Hkv * D]` prefix (only without projection: an MLP cannot be inverted)."""
        if self.prefix_projection:
            raise ValueError("cannot load flat prompt_embeddings into a prefix encoder with prefix_projection=True")
        expected = tuple(self.embedding.weight.shape)
        if tuple(prompt_embeddings.shape) != expected:
            raise ValueError(f"prompt_embeddings must have shape {expected}, got {tuple(prompt_embeddings.shape)}")
        self.embedding.weight.copy_(prompt_embeddings.to(self.embedding.weight))

    def extra_repr(self) -> str:
        return (f"P={self.num_virtual_tokens}, layers={self.num_layers}, kv_heads={self.num_kv_heads}, "
                f"head_dim={self.head_dim}, projection={self.prefix_projection}")
