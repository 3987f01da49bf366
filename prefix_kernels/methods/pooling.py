"""Reading one vector per row out of a padded batch: the sequence-classification poolings."""

from __future__ import annotations

import torch


def last_real_token(attention_mask: torch.Tensor) -> torch.Tensor:
    """int64 `[B]`: the position of each row's last real token (1 in `attention_mask [B, S]`), for left and
    right padding alike; 0 for a row without a real token."""
    seq_len = attention_mask.shape[1]
    positions = torch.arange(seq_len, device=attention_mask.device).expand_as(attention_mask)
    real = attention_mask.bool()
    return torch.where(real, positions, torch.full_like(positions, -1)).max(dim=1).values.clamp(min=0)


POOLINGS = ("cls", "pooler", "mean", "last")


def pool(out, attention_mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """`[B, hidden]` from a model output with `last_hidden_state` (and `pooler_output` for "pooler"):
    "cls" the first position, "pooler" the model's pooled output, "mean" the mean over real tokens (the
    pooling of sentence-transformers models), "last" the last real token (left or right padding)."""
    h = out.last_hidden_state
    if pooling == "cls":
        return h[:, 0]
    if pooling == "pooler":
        pooled = getattr(out, "pooler_output", None)
        if pooled is None:
            raise ValueError("pooling='pooler': the backbone's output has no pooler_output (BERT-like models "
                             "have one); use pooling='cls'")
        return pooled
    if pooling == "mean":
        m = attention_mask.to(h.dtype).unsqueeze(-1)
        return (h * m).sum(1) / m.sum(1).clamp(min=1.0)
    if pooling == "last":
        return h[torch.arange(h.shape[0], device=h.device), last_real_token(attention_mask)]
    raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
