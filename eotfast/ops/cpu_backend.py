"""Backend 'cpu': the C++ Sinkhorn and auction kernels of csrc/ (module eotfast._C) on CPU
tensors; the cost matrix and the row draw are the torch reference's (MKL GEMM, one pass)."""

from __future__ import annotations

import torch

from eotfast._validation import check_finite_values
from eotfast.ops.common import (
    check_solver_values,
    empty_auction_solution,
    empty_sinkhorn_solution,
    register_auction_op,
    register_sinkhorn_op,
)
from eotfast.ops.extensions import require_cpu_extension
from eotfast.ops.torch_backend import cost_matrix, draw_partners

__all__ = ["auction_cpu", "cost_matrix", "draw_partners", "sinkhorn", "sinkhorn_cpu"]


def _sinkhorn(cost, a, b, epsilon, max_iter, tol, epsilon_start, scaling, relaxation, reach):
    """csrc/sinkhorn_cpu.cpp on contiguous float32 or float64 [B, n, m] problems."""
    extension = require_cpu_extension()
    check_solver_values(cost, a, b, reach)
    cost, a, b, epsilon, epsilon_start = (
        t.contiguous() for t in (cost, a, b, epsilon, epsilon_start)
    )
    f, g, n_iter, error = empty_sinkhorn_solution(
        cost, a, b, epsilon, max_iter, tol, epsilon_start, scaling, relaxation, reach
    )
    batch, n, m = cost.shape
    solve = {
        torch.float32: extension.sinkhorn_float32,
        torch.float64: extension.sinkhorn_float64,
    }[cost.dtype]
    solve(
        cost.data_ptr(), a.data_ptr(), b.data_ptr(), epsilon.data_ptr(), epsilon_start.data_ptr(),
        f.data_ptr(), g.data_ptr(), n_iter.data_ptr(), error.data_ptr(),
        batch, n, m, max_iter, tol, scaling, relaxation, reach, torch.get_num_threads(),
    )  # fmt: skip
    return f, g, n_iter, error


sinkhorn_cpu = register_sinkhorn_op("cpu", _sinkhorn, device_types="cpu")
sinkhorn = sinkhorn_cpu


def _auction(cost, prices, epsilon_start, epsilon_final, scaling, max_bids):
    """csrc/auction_cpu.cpp on contiguous float32 or float64 [B, n, m] problems (n <= m)."""
    extension = require_cpu_extension()
    check_finite_values("cost", cost)
    check_finite_values("prices", prices)
    cost, prices, epsilon_start, epsilon_final = (
        t.contiguous() for t in (cost, prices, epsilon_start, epsilon_final)
    )
    assignment, prices_out, epsilon, n_bids = empty_auction_solution(
        cost, prices, epsilon_start, epsilon_final, scaling, max_bids
    )
    batch, n, m = cost.shape
    solve = {
        torch.float32: extension.auction_float32,
        torch.float64: extension.auction_float64,
    }[cost.dtype]
    solve(
        cost.data_ptr(), prices.data_ptr(), epsilon_start.data_ptr(), epsilon_final.data_ptr(),
        scaling, max_bids, assignment.data_ptr(), prices_out.data_ptr(), epsilon.data_ptr(),
        n_bids.data_ptr(), batch, n, m, torch.get_num_threads(),
    )  # fmt: skip
    return assignment, prices_out, epsilon, n_bids


auction_cpu = register_auction_op("cpu", _auction, device_types="cpu")
