"""How the launchers call a Triton kernel: through ``torch.library.wrap_triton``, so that the
ops registered with ``torch.library.triton_op`` show their kernels to torch.compile."""

from __future__ import annotations

from torch.library import wrap_triton


def launch(kernel, grid):
    return wrap_triton(kernel)[grid]
