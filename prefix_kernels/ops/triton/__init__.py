"""Triton backend: kernels.py (the kernels), configs.py (tiles, autotuning), op.py (torch.library ops)."""
