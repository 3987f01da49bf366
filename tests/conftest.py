import os

import pytest
import torch

# Without a GPU the triton backend runs its real kernels in Triton's interpreter on CPU tensors. The
# variable must be set before triton decorates the kernels, i.e. before prefix_kernels is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
