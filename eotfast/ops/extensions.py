"""The compiled extensions, imported once: eotfast._C (C++ CPU kernels) and eotfast._cuda
(CUDA kernels, built when nvcc was found), with the errors that explain their absence."""

from __future__ import annotations

try:
    from eotfast import _C  # C++ CPU kernels, built by CMake from csrc/
except ImportError as error:  # a source checkout that was never built
    _C = None
    _C_IMPORT_ERROR: ImportError | None = error
else:
    _C_IMPORT_ERROR = None

try:
    from eotfast import _cuda  # CUDA kernels (csrc/cuda/), built when nvcc was found
except ImportError as error:  # built without CUDA (no toolkit, or EOTFAST_CUDA=OFF)
    _cuda = None
    _CUDA_IMPORT_ERROR: ImportError | None = error
else:
    _CUDA_IMPORT_ERROR = None


def cpu_extension_available() -> bool:
    """True when the compiled C++ kernels (eotfast._C) are importable."""
    return _C is not None


def cuda_extension_available() -> bool:
    """True when the CUDA kernels (eotfast._cuda) were built and import (no GPU needed)."""
    return _cuda is not None


def require_cpu_extension():
    if _C is None:
        raise RuntimeError(
            "backend='cpu' needs the compiled extension eotfast._C, which failed to import "
            f"({_C_IMPORT_ERROR}). Build it with `pip install .` from the repository root, "
            "or use backend='torch'."
        )
    return _C


def require_cuda_extension():
    if _cuda is None:
        raise RuntimeError(
            "backend='cuda' needs the CUDA module eotfast._cuda, which is not available "
            f"({_CUDA_IMPORT_ERROR}). It is built when CMake finds nvcc (EOTFAST_CUDA=AUTO, the "
            "default, or ON): reinstall with the CUDA toolkit on PATH, or use backend='triton' "
            "or 'torch'."
        )
    return _cuda
