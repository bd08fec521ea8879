"""The CUDA kernels of csrc/cuda (module eotfast._cuda) registered as torch ops.

Each op launches on the caller's current stream (its handle goes to C++ with the data
pointers) and returns without synchronizing; fake implementations give torch.compile the
output shapes, so a compiled step keeps them as single graph nodes.
"""

from __future__ import annotations

import torch
from torch.library import custom_op

from eotfast._backends import require_cuda_extension

_ELEMENT_TYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def _stream(tensor: torch.Tensor) -> int:
    return torch.cuda.current_stream(tensor.device).cuda_stream


@custom_op("eotfast::cost_matrix_cuda", mutates_args=(), device_types="cuda")
def cost_matrix_cuda(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """[B, n, d] x [B, m, d] (float32/16, bfloat16) -> [B, n, m] float32 squared distances."""
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
    return x.new_empty((x.shape[0], x.shape[1], y.shape[1]), dtype=torch.float32)


@custom_op("eotfast::sinkhorn_cuda", mutates_args=(), device_types="cuda")
def sinkhorn_cuda(
    cost: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    epsilon: torch.Tensor,
    max_iter: int,
    tol: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backend 'cuda': one thread block per problem, all iterations in one launch."""
    extension = require_cuda_extension()
    cost, a, b, epsilon = (t.float().contiguous() for t in (cost, a, b, epsilon))
    batch, n, m = cost.shape
    f = torch.empty((batch, n), dtype=torch.float32, device=cost.device)
    g = torch.empty((batch, m), dtype=torch.float32, device=cost.device)
    g_next = torch.empty_like(g)
    n_iter = torch.empty((batch,), dtype=torch.int64, device=cost.device)
    error = torch.empty((batch,), dtype=torch.float32, device=cost.device)
    with torch.cuda.device(cost.device):
        extension.sinkhorn_log_float32(
            cost.data_ptr(),
            a.data_ptr(),
            b.data_ptr(),
            epsilon.data_ptr(),
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
            _stream(cost),
        )
    return f, g, n_iter, error


@sinkhorn_cuda.register_fake
def _(cost, a, b, epsilon, max_iter, tol):
    batch, n, m = cost.shape
    return (
        cost.new_empty((batch, n), dtype=torch.float32),
        cost.new_empty((batch, m), dtype=torch.float32),
        cost.new_empty((batch,), dtype=torch.int64),
        cost.new_empty((batch,), dtype=torch.float32),
    )


def solve_sinkhorn_cuda(cost, a, b, epsilon, max_iter: int, tol: float):
    f, g, n_iter, error = sinkhorn_cuda(cost, a, b, epsilon, max_iter, tol)
    return f.to(cost.dtype), g.to(cost.dtype), n_iter, error.to(cost.dtype)
