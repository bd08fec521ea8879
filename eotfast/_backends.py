"""Which implementation runs an op: backend names, availability, and the compiled extension."""

from __future__ import annotations

import importlib.util
import os

import torch

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

BACKENDS = ("auto", "torch", "cpu", "triton", "cuda")


# Looked up without importing triton: TRITON_INTERPRET must be set before that import, and
# a module constant keeps torch.compile from tracing an import inside the compiled step.
_TRITON_INSTALLED = importlib.util.find_spec("triton") is not None


def triton_interpreter_enabled() -> bool:
    """TRITON_INTERPRET=1: Triton kernels run on CPU tensors through its interpreter (slow;
    for testing). It must be set before triton is first imported."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_runs_on(device: torch.device) -> bool:
    """Triton kernels run on CUDA (and ROCm) GPUs, and on the CPU only under the interpreter."""
    if not _TRITON_INSTALLED:
        return False
    if device.type == "cuda":
        return not triton_interpreter_enabled()
    return device.type == "cpu" and triton_interpreter_enabled()


def cpu_extension_available() -> bool:
    """True when the compiled C++ kernels (eotfast._C) are importable."""
    return _C is not None


def cuda_extension_available() -> bool:
    """True when the CUDA kernels (eotfast._cuda) were built and import (no GPU needed)."""
    return _cuda is not None


def require_cuda_extension():
    if _cuda is None:
        raise RuntimeError(
            "backend='cuda' needs the CUDA module eotfast._cuda, which is not available "
            f"({_CUDA_IMPORT_ERROR}). It is built when CMake finds nvcc (EOTFAST_CUDA=AUTO, the "
            "default, or ON): reinstall with the CUDA toolkit on PATH, or use backend='triton' "
            "or 'torch'."
        )
    return _cuda


def require_cpu_extension():
    if _C is None:
        raise RuntimeError(
            "backend='cpu' needs the compiled extension eotfast._C, which failed to import "
            f"({_C_IMPORT_ERROR}). Build it with `pip install .` from the repository root, "
            "or use backend='torch'."
        )
    return _C


def available_backends(device: torch.device | str = "cpu") -> list[str]:
    """Backends that can run on `device` in this process, fastest first."""
    device = torch.device(device)
    backends = []
    if device.type == "cuda" and triton_runs_on(device):
        backends.append("triton")
    if device.type == "cuda" and cuda_extension_available():
        backends.append("cuda")
    if device.type == "cpu" and cpu_extension_available():
        backends.append("cpu")
    backends.append("torch")
    if device.type == "cpu" and triton_runs_on(device):
        backends.append("triton")  # the interpreter: correct, but far slower than "torch"
    return backends


def resolve_backend(backend: str, device: torch.device) -> str:
    """Turns 'auto' into the fastest backend for `device`; rejects names that cannot run there."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return available_backends(device)[0]
    if backend == "cpu":
        if device.type != "cpu":
            raise ValueError(
                f"backend='cpu' runs on CPU tensors, got tensors on {device}; "
                "use backend='torch' or 'auto'"
            )
        require_cpu_extension()
    if backend == "cuda":
        if device.type != "cuda":
            raise ValueError(
                f"backend='cuda' runs on CUDA tensors, got tensors on {device}; for CPU tensors "
                "use backend='cpu'"
            )
        require_cuda_extension()
    if backend == "triton" and not triton_runs_on(device):
        if device.type == "cpu":
            raise ValueError(
                "backend='triton' runs on CUDA tensors; for CPU tensors use backend='cpu' (the "
                "C++ kernels), or set TRITON_INTERPRET=1 before importing triton to run the "
                "Triton kernels through the interpreter (for testing)"
            )
        reason = "it runs on CUDA tensors" if _TRITON_INSTALLED else "triton is not installed"
        raise ValueError(f"backend='triton' cannot run on {device} ({reason}); use backend='torch'")
    return backend
