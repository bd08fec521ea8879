"""The CUDA kernels of csrc/cuda (module eotfast._cuda) registered as torch ops.

Each op launches on the caller's current stream (its handle goes to C++ with the data
pointers) and returns without synchronizing; fake implementations give torch.compile the
output shapes, so a compiled step keeps them as single graph nodes.
"""

from __future__ import annotations

import torch
from torch.library import custom_op

from eotfast._backends import require_cuda_extension
from eotfast.sinkhorn import _empty_solution

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
    """Backend 'cuda' on float32 [B, n, m] problems: one thread block per problem, all
    iterations in one launch."""
    extension = require_cuda_extension()
    for name, tensor in (("cost", cost), ("a", a), ("b", b), ("epsilon", epsilon)):
        if tensor.dtype != torch.float32:
            raise TypeError(f"sinkhorn_cuda: {name} must be float32, got {tensor.dtype}")
    cost, a, b, epsilon = (t.contiguous() for t in (cost, a, b, epsilon))
    batch, n, m = cost.shape
    f, g, n_iter, error = _empty_solution(cost, a, b, epsilon, max_iter, tol)
    g_next = torch.empty_like(g)
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


sinkhorn_cuda.register_fake(_empty_solution)


def solve_sinkhorn_cuda(cost, a, b, epsilon, max_iter: int, tol: float):
    """float32 throughout (the kernel's dtype); results in cost's dtype."""
    inputs = [t.float() for t in (cost, a, b, epsilon)]
    f, g, n_iter, error = sinkhorn_cuda(*inputs, max_iter, tol)
    return f.to(cost.dtype), g.to(cost.dtype), n_iter, error.to(cost.dtype)
