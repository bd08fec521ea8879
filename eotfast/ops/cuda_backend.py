"""Backend 'cuda': the CUDA kernels of csrc/cuda (module eotfast._cuda) registered as torch ops.

Each op launches on the caller's current stream (its handle goes to C++ with the data
pointers) and returns without synchronizing; fake implementations give torch.compile the
output shapes, so a compiled step keeps them as single graph nodes.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.library import custom_op

from eotfast.ops import torch_backend
from eotfast.ops.common import (
    check_point_batch_arguments,
    check_sinkhorn_arguments,
    empty_sinkhorn_solution,
    require_balanced,
    require_dtype,
    sinkhorn_op,
)
from eotfast.ops.extensions import require_cuda_extension
from eotfast.ops.registry import triton_runs_on

__all__ = [
    "auction",
    "cost_matrix",
    "cost_matrix_cuda",
    "draw_partners",
    "sinkhorn",
    "sinkhorn_cuda",
]

_ELEMENT_TYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def _stream(tensor: torch.Tensor) -> int:
    return torch.cuda.current_stream(tensor.device).cuda_stream


def _check_cost_matrix_inputs(x: torch.Tensor, y: torch.Tensor) -> None:
    check_point_batch_arguments("cost_matrix_cuda", x, y)
    require_dtype("cost_matrix_cuda", tuple(_ELEMENT_TYPES), x=x, y=y)


@custom_op("eotfast::cost_matrix_cuda", mutates_args=(), device_types="cuda")
def cost_matrix_cuda(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """[B, n, d] x [B, m, d] (float32/16, bfloat16) -> [B, n, m] float32 squared distances."""
    _check_cost_matrix_inputs(x, y)
    extension = require_cuda_extension()
    x, y = x.contiguous(), y.contiguous()
    (batch, n, d), m = x.shape, y.shape[1]
    out = torch.empty((batch, n, m), dtype=torch.float32, device=x.device)
    with torch.cuda.device(x.device):
        extension.cost_matrix(
            x.data_ptr(),
            y.data_ptr(),
            out.data_ptr(),
            _ELEMENT_TYPES[x.dtype],
            batch,
            n,
            m,
            d,
            _stream(x),
        )
    return out


@cost_matrix_cuda.register_fake
def _(x, y):
    _check_cost_matrix_inputs(x, y)
    return x.new_empty((x.shape[0], x.shape[1], y.shape[1]), dtype=torch.float32)


@sinkhorn_op(device_types="cuda")
def sinkhorn_cuda(
    cost: Tensor, a: Tensor, b: Tensor, epsilon: Tensor, max_iter: int, tol: float,
    epsilon_start: Tensor, scaling: float, relaxation: float, reach: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    """Backend 'cuda' on float32 [B, n, m] problems: one thread block per problem, all
    iterations in one launch."""
    check_sinkhorn_arguments(
        "sinkhorn_cuda", cost, a, b, epsilon, max_iter, tol, epsilon_start, scaling,
        relaxation, reach,
    )  # fmt: skip
    extension = require_cuda_extension()
    require_balanced("sinkhorn_cuda", reach)
    require_dtype(
        "sinkhorn_cuda", (torch.float32,),
        cost=cost, a=a, b=b, epsilon=epsilon, epsilon_start=epsilon_start,
    )  # fmt: skip
    cost, a, b, epsilon, epsilon_start = (
        t.contiguous() for t in (cost, a, b, epsilon, epsilon_start)
    )
    batch, n, m = cost.shape
    f, g, n_iter, error = empty_sinkhorn_solution(
        cost, a, b, epsilon, max_iter, tol, epsilon_start, scaling, relaxation, reach
    )
    g_next = torch.empty_like(g)
    with torch.cuda.device(cost.device):
        extension.sinkhorn_float32(
            cost.data_ptr(),
            a.data_ptr(),
            b.data_ptr(),
            epsilon.data_ptr(),
            epsilon_start.data_ptr(),
            f.data_ptr(),
            g.data_ptr(),
            g_next.data_ptr(),
            n_iter.data_ptr(),
            error.data_ptr(),
            batch,
            n,
            m,
            max_iter,
            tol,
            scaling,
            relaxation,
            _stream(cost),
        )
    return f, g, n_iter, error


sinkhorn = sinkhorn_cuda
draw_partners = torch_backend.draw_partners


def auction(cost, prices, epsilon_start, epsilon_final, scaling, max_bids):
    """csrc/cuda has no auction kernel: the Triton kernel where Triton runs on the device,
    else the torch reference."""
    if triton_runs_on(cost.device):
        from eotfast.ops import triton_backend

        return triton_backend.auction_triton(
            cost, prices, epsilon_start, epsilon_final, scaling, max_bids
        )
    return torch_backend.auction_torch(
        cost, prices, epsilon_start, epsilon_final, scaling, max_bids
    )


def cost_matrix(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The kernel for float32 and half inputs; float64 stays exact in torch."""
    if x.dtype == torch.float64:
        return torch_backend.cost_matrix(x, y)
    return cost_matrix_cuda(x, y)
