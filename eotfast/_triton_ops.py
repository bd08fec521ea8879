"""The Triton kernels of eotfast.kernels registered as torch ops.

``torch.library.triton_op`` + ``wrap_triton`` (in the launchers) let torch.compile see the
kernels themselves: a compiled step that calls :func:`eotfast.pair` on a GPU has them inside
its graph, with no graph break. Each op has a fake implementation (output shapes only).

The tiled Sinkhorn path is a ``custom_op`` instead: its host loop launches 3 kernels per
iteration up to max_iter, which tracing would unroll into thousands of graph nodes; as an
opaque op it stays one node.
"""

from __future__ import annotations

import torch
from torch.library import custom_op, triton_op

from eotfast.kernels.cost_matrix import cost_matrix_triton as _cost_matrix_launcher
from eotfast.kernels.pair_sampling import pair_sample_triton as _pair_sample_launcher
from eotfast.kernels.sinkhorn import sinkhorn_log_persistent, sinkhorn_log_tiled
from eotfast.sinkhorn import _check_solver_values, _empty_solution

# Persistent kernel (one program per problem) when the problem is small or the batch alone
# fills the GPU; otherwise the tiled path spreads a problem over the SMs. Not measured yet
# (no GPU on the development machines): a first guess from the per-SM work, see bench/README.
PERSISTENT_MAX_ENTRIES = 128 * 128
PERSISTENT_MIN_BATCH = 32


@triton_op("eotfast::cost_matrix_triton", mutates_args=())
def cost_matrix_triton(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """[B, n, d] x [B, m, d] -> [B, n, m] float32 squared distances (kernels/cost_matrix.py)."""
    return _cost_matrix_launcher(x, y)


@cost_matrix_triton.register_fake
def _(x, y):
    return x.new_empty((x.shape[0], x.shape[1], y.shape[1]), dtype=torch.float32)


@triton_op("eotfast::sinkhorn_triton", mutates_args=())
def sinkhorn_triton(
    cost: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    epsilon: torch.Tensor,
    max_iter: int,
    tol: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backend 'triton', one launch: the persistent kernel (kernels/sinkhorn.py)."""
    return sinkhorn_log_persistent(cost, a, b, epsilon, max_iter, tol)


@custom_op("eotfast::sinkhorn_triton_tiled", mutates_args=())
def sinkhorn_triton_tiled(
    cost: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    epsilon: torch.Tensor,
    max_iter: int,
    tol: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backend 'triton' for large problems: the tiled kernels (kernels/sinkhorn.py)."""
    return sinkhorn_log_tiled(cost, a, b, epsilon, max_iter, tol)


sinkhorn_triton.register_fake(_empty_solution)
sinkhorn_triton_tiled.register_fake(_empty_solution)


def solve_sinkhorn_triton(cost, a, b, epsilon, max_iter: int, tol: float):
    """Picks the path from the (static) shapes; float32 throughout (the kernels' dtype)."""
    batch, n, m = cost.shape
    if cost.device.type == "cpu":  # the interpreter: check values as the cpu backend does
        _check_solver_values(cost, a, b)
    inputs = [t.float().contiguous() for t in (cost, a, b, epsilon)]
    if n * m <= PERSISTENT_MAX_ENTRIES or batch >= PERSISTENT_MIN_BATCH:
        f, g, n_iter, error = sinkhorn_triton(*inputs, max_iter, tol)
    else:
        f, g, n_iter, error = sinkhorn_triton_tiled(*inputs, max_iter, tol)
    return f.to(cost.dtype), g.to(cost.dtype), n_iter, error.to(cost.dtype)


@triton_op("eotfast::pair_sample_triton", mutates_args=())
def pair_sample_triton(
    cost: torch.Tensor, g: torch.Tensor, epsilon: torch.Tensor, seed: torch.Tensor, sample: bool
) -> torch.Tensor:
    """Partner per row of [B, n, m] from the plan's rows (kernels/pair_sampling.py)."""
    return _pair_sample_launcher(cost, g, epsilon, seed, sample)


@pair_sample_triton.register_fake
def _(cost, g, epsilon, seed, sample):
    return cost.new_empty(cost.shape[:2], dtype=torch.int64)
