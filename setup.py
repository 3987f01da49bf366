"""Builds the optional C++ extension `prefix_kernels.ops._C` (CPU kernels, plus CUDA kernels with a CUDA torch).

Build only what the installed torch supports: a CppExtension with a CPU torch, a CUDAExtension with a CUDA
torch and a toolkit (CUDA_HOME). Use `pip install --no-build-isolation` so that the extension is compiled
against the torch you run (build isolation would compile against a second, throwaway torch).
Set PREFIX_KERNELS_BUILD_EXT=0 to install the pure-Python package (triton and reference backends only).
"""

import glob
import os

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _torch_wants_cxx20() -> bool:
    """torch >= 2.10 headers are written for C++20 (they warn, or fail, under C++17)."""
    import torch

    major, minor = (int(x) for x in torch.__version__.split(".")[:2])
    return (major, minor) >= (2, 10)


def _extensions():
    if os.environ.get("PREFIX_KERNELS_BUILD_EXT", "1") == "0":
        return [], {}
    cpp_sources = sorted(glob.glob(os.path.join("csrc", "**", "*.cpp"), recursive=True))
    if not cpp_sources:
        return [], {}
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    cxx_flags = ["-O3", "-std=c++20" if _torch_wants_cxx20() else "-std=c++17", "-fopenmp"]
    cuda_sources = sorted(glob.glob(os.path.join("csrc", "**", "*.cu"), recursive=True))
    want_cuda = os.environ.get("PREFIX_KERNELS_BUILD_CUDA", "auto")
    use_cuda = bool(cuda_sources) and want_cuda != "0" and torch.version.cuda is not None and CUDA_HOME is not None
    if want_cuda == "1" and not use_cuda:
        raise RuntimeError("PREFIX_KERNELS_BUILD_CUDA=1 but there is no CUDA build of torch or no CUDA_HOME")
    if use_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        nvcc_flags = ["-O3", "-std=c++20" if _torch_wants_cxx20() else "-std=c++17", "--use_fast_math", "-lineinfo",
                      "--resource-usage"]
        ext = CUDAExtension(
            "prefix_kernels.ops._C", cpp_sources + cuda_sources,
            extra_compile_args={"cxx": cxx_flags + ["-DPREFIX_KERNELS_WITH_CUDA"], "nvcc": nvcc_flags},
            extra_link_args=["-fopenmp"], py_limited_api=False,
        )
    else:
        ext = CppExtension("prefix_kernels.ops._C", cpp_sources, extra_compile_args={"cxx": cxx_flags},
                           extra_link_args=["-fopenmp"], py_limited_api=False)
    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
