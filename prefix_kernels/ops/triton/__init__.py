"""The triton backend: kernels.py (the kernels), configs.py (tiles, autotuning), launch.py (the backend's ops).

This file imports nothing from triton, so that `interpreting()` can be asked before triton is loaded.
"""

import os


def interpreting() -> bool:
    """True under Triton's interpreter (TRITON_INTERPRET=1): the kernels run on CPU tensors, for tests."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
