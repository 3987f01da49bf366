"""Reading one position per row out of a padded batch."""

from __future__ import annotations

import torch


def last_real_token(attention_mask: torch.Tensor) -> torch.Tensor:
    """int64 `[B]`: the position of each row's last real token (1 in `attention_mask [B, S]`), for left and
    right padding alike; 0 for a row without a real token."""
    seq_len = attention_mask.shape[1]
    positions = torch.arange(seq_len, device=attention_mask.device).expand_as(attention_mask)
    real = attention_mask.bool()
    return torch.where(real, positions, torch.full_like(positions, -1)).max(dim=1).values.clamp(min=0)
