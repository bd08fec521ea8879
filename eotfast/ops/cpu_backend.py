"""Backend 'cpu': the C++ Sinkhorn and auction kernels of csrc/ (module eotfast._C) on CPU
tensors; the cost matrix and the row draw are the torch reference's (MKL GEMM, one pass)."""

from __future__ import annotations

import torch
from torch import Tensor

from eotfast.ops.common import (
    auction_op,
    check_auction_arguments,
    check_auction_values,
    check_sinkhorn_arguments,
    check_sinkhorn_values,
    empty_auction_solution,
    empty_sinkhorn_solution,
    sinkhorn_op,
)
from eotfast.ops.extensions import require_cpu_extension
from eotfast.ops.torch_backend import cost_matrix, draw_partners

__all__ = ["auction", "auction_cpu", "cost_matrix", "draw_partners", "sinkhorn", "sinkhorn_cpu"]


@sinkhorn_op(device_types="cpu")
def sinkhorn_cpu(
    cost: Tensor, a: Tensor, b: Tensor, epsilon: Tensor, max_iter: int, tol: float,
    epsilon_start: Tensor, scaling: float, relaxation: float, reach: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    """csrc/sinkhorn_cpu.cpp on float32 or float64 [B, n, m] problems."""
    check_sinkhorn_arguments(
        "sinkhorn_cpu", cost, a, b, epsilon, max_iter, tol, epsilon_start, scaling, relaxation,
        reach,
    )  # fmt: skip
    extension = require_cpu_extension()
    check_sinkhorn_values("sinkhorn_cpu", cost, a, b, epsilon, epsilon_start, reach)
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


@auction_op(device_types="cpu")
def auction_cpu(
    cost: Tensor, prices: Tensor, epsilon_start: Tensor, epsilon_final: Tensor, scaling: float,
    max_bids: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    """csrc/auction_cpu.cpp on float32 or float64 [B, n, m] problems (n <= m)."""
    check_auction_arguments(
        "auction_cpu", cost, prices, epsilon_start, epsilon_final, scaling, max_bids
    )
    extension = require_cpu_extension()
    check_auction_values("auction_cpu", cost, prices, epsilon_start, epsilon_final)
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


sinkhorn = sinkhorn_cpu
auction = auction_cpu
