"""Which implementation runs an op: backend names, availability, and the compiled extension."""

from __future__ import annotations

import torch

try:
    from eotfast import _C  # C++ CPU kernels, built by CMake from csrc/
except ImportError as error:  # a source checkout that was never built
    _C = None
    _C_IMPORT_ERROR: ImportError | None = error
else:
    _C_IMPORT_ERROR = None

BACKENDS = ("auto", "torch", "cpu")


def cpu_extension_available() -> bool:
    """True when the compiled C++ kernels (eotfast._C) are importable."""
    return _C is not None


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
    if device.type == "cpu" and cpu_extension_available():
        backends.append("cpu")
    backends.append("torch")
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
    return backend
