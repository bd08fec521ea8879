"""Backend 'cpu': the C++ Sinkhorn kernels of csrc/ (module eotfast._C) on CPU tensors; the
cost matrix and the row draw are the torch reference's (MKL GEMM, one pass)."""

from __future__ import annotations

import torch

from eotfast.ops.common import check_solver_values, empty_sinkhorn_solution, register_sinkhorn_op
from eotfast.ops.extensions import require_cpu_extension
from eotfast.ops.torch_backend import cost_matrix, draw_partners

__all__ = ["cost_matrix", "draw_partners", "sinkhorn", "sinkhorn_cpu"]


def _sinkhorn(cost, a, b, epsilon, max_iter, tol):
    """csrc/sinkhorn_cpu.cpp on contiguous float32 or float64 [B, n, m] problems."""
    extension = require_cpu_extension()
    check_solver_values(cost, a, b)
    cost, a, b, epsilon = (t.contiguous() for t in (cost, a, b, epsilon))
    f, g, n_iter, error = empty_sinkhorn_solution(cost, a, b, epsilon, max_iter, tol)
    batch, n, m = cost.shape
    solve = {
        torch.float32: extension.sinkhorn_float32,
        torch.float64: extension.sinkhorn_float64,
    }[cost.dtype]
    solve(
        cost.data_ptr(), a.data_ptr(), b.data_ptr(), epsilon.data_ptr(),
        f.data_ptr(), g.data_ptr(), n_iter.data_ptr(), error.data_ptr(),
        batch, n, m, max_iter, tol, torch.get_num_threads(),
    )  # fmt: skip
    return f, g, n_iter, error


sinkhorn_cpu = register_sinkhorn_op("cpu", _sinkhorn, device_types="cpu")
sinkhorn = sinkhorn_cpu
