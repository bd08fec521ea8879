"""How the launchers call a Triton kernel: through ``torch.library.wrap_triton``, so that the
ops registered with ``torch.library.triton_op`` show their kernels to torch.compile, and on
the device of the tensors, so that tensors on ``cuda:1`` run on that GPU and its current
stream (Triton launches on the current device's stream)."""

from __future__ import annotations

import functools

import torch
from torch.library import wrap_triton


def launch(kernel, grid, device: torch.device):
    """``kernel[grid](...)`` on ``device`` (its current stream); the grid is a tuple."""
    grid = tuple(int(size) for size in grid)
    if any(size > limit for size, limit in zip(grid, GRID_LIMITS, strict=False)):
        raise ValueError(
            f"{kernel.fn.__name__}: launch grid {grid} exceeds the CUDA limits {GRID_LIMITS} "
            "(axis 0 up to 2^31 - 1 programs, axes 1 and 2 up to 65535)"
        )
    launcher = wrap_triton(kernel)[grid]

    def run(*args, **kwargs):
        if device.type != "cuda":
            return launcher(*args, **kwargs)
        with torch.cuda.device(device):
            return launcher(*args, **kwargs)

    return run


GRID_LIMITS = (2**31 - 1, 65535, 65535)


@functools.cache
def multiprocessor_count(device: torch.device) -> int:
    """SMs of a CUDA device (cached: the launchers ask on every call)."""
    return torch.cuda.get_device_properties(device).multi_processor_count


def register_cap(maxnreg: int) -> dict:
    """The ``maxnreg`` launch option (PTX ``.maxnreg``), except while torch.compile traces an
    op: not every torch release passes a user kernel's compiler options through Inductor, and
    a compiled graph then gets ptxas's default, which is correct, with at most a few spills.

    Without a cap, ptxas trades registers for occupancy on its own: on the auction kernel it
    spilled the loop-carried scalars of the phase and round loops (n_bids, the queue's length)
    to reach 64 or 80 registers, and on the Sinkhorn kernel 20-28 bytes at 64 registers
    (sm_90)."""
    return {} if torch.compiler.is_compiling() else {"maxnreg": maxnreg}
