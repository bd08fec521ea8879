"""The Triton kernels of eotfast.kernels registered as torch ops.

``torch.library.triton_op`` + ``wrap_triton`` (in the launchers) let torch.compile see the
kernels themselves: a compiled step that calls :func:`eotfast.pair` on a GPU has them inside
its graph, with no graph break. Each op has a fake implementation (output shapes only).

Each op launches one kernel, whatever the number of Sinkhorn iterations (they run inside
the kernel), so a compiled graph or a CUDA graph holds a fixed, small number of nodes.
"""

from __future__ import annotations

import torch
from torch.library import triton_op

from eotfast.kernels.cost_matrix import cost_matrix_triton as _cost_matrix_launcher
from eotfast.kernels.pair_sampling import pair_sample_triton as _pair_sample_launcher
from eotfast.kernels.sinkhorn import sinkhorn_log
from eotfast.sinkhorn import _check_solver_values

_COST_MATRIX_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _require_dtype(op: str, dtypes: tuple[torch.dtype, ...], **tensors: torch.Tensor) -> None:
    """The kernels read each pointer with the dtype it was compiled for, and the fakes promise
    the real outputs' dtypes: inputs of any other dtype are rejected by both, with the
    argument's name."""
    for name, tensor in tensors.items():
        if tensor.dtype not in dtypes:
            expected = " or ".join(str(dtype) for dtype in dtypes)
            raise TypeError(f"{op}: {name} must be {expected}, got {tensor.dtype}")


def _check_cost_matrix_inputs(x: torch.Tensor, y: torch.Tensor) -> None:
    _require_dtype("cost_matrix_triton", _COST_MATRIX_DTYPES, x=x, y=y)
    if x.dtype != y.dtype:
        raise TypeError(f"cost_matrix_triton: x and y must share a dtype, got {x.dtype}, {y.dtype}")


@triton_op("eotfast::cost_matrix_triton", mutates_args=())
def cost_matrix_triton(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """[B, n, d] x [B, m, d] -> [B, n, m] float32 squared distances (kernels/cost_matrix.py)."""
    _check_cost_matrix_inputs(x, y)
    return _cost_matrix_launcher(x, y)


@cost_matrix_triton.register_fake
def _(x, y):
    _check_cost_matrix_inputs(x, y)
    return x.new_empty((x.shape[0], x.shape[1], y.shape[1]), dtype=torch.float32)


def _sinkhorn_solution(cost, a, b, epsilon, max_iter, tol):
    """Fake of eotfast::sinkhorn_triton: float32 potentials and error, int64 counts."""
    _require_dtype("sinkhorn_triton", (torch.float32,), cost=cost, a=a, b=b, epsilon=epsilon)
    batch, n, m = cost.shape
    return (
        cost.new_empty(batch, n),
        cost.new_empty(batch, m),
        cost.new_empty(batch, dtype=torch.int64),
        cost.new_empty(batch),
    )


@triton_op("eotfast::sinkhorn_triton", mutates_args=())
def sinkhorn_triton(
    cost: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    epsilon: torch.Tensor,
    max_iter: int,
    tol: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backend 'triton': one launch of kernels/sinkhorn.py on contiguous float32 [B, n, m]
    problems; every problem runs to its own stop on the device."""
    _require_dtype("sinkhorn_triton", (torch.float32,), cost=cost, a=a, b=b, epsilon=epsilon)
    return sinkhorn_log(cost, a, b, epsilon, max_iter, tol)


sinkhorn_triton.register_fake(_sinkhorn_solution)


def solve_sinkhorn_triton(cost, a, b, epsilon, max_iter: int, tol: float):
    """float32 throughout (the kernel's dtype); results in cost's dtype."""
    if cost.device.type == "cpu":  # the interpreter: check values as the cpu backend does
        _check_solver_values(cost, a, b)
    inputs = [t.float().contiguous() for t in (cost, a, b, epsilon)]
    f, g, n_iter, error = sinkhorn_triton(*inputs, max_iter, tol)
    return f.to(cost.dtype), g.to(cost.dtype), n_iter, error.to(cost.dtype)


def _check_pair_sample_inputs(cost, g, epsilon, seed) -> None:
    _require_dtype("pair_sample_triton", (torch.float32,), cost=cost, g=g, epsilon=epsilon)
    _require_dtype("pair_sample_triton", (torch.int64,), seed=seed)


@triton_op("eotfast::pair_sample_triton", mutates_args=())
def pair_sample_triton(
    cost: torch.Tensor, g: torch.Tensor, epsilon: torch.Tensor, seed: torch.Tensor, sample: bool
) -> torch.Tensor:
    """Partner per row of [B, n, m] from the plan's rows (kernels/pair_sampling.py)."""
    _check_pair_sample_inputs(cost, g, epsilon, seed)
    return _pair_sample_launcher(cost, g, epsilon, seed, sample)


@pair_sample_triton.register_fake
def _(cost, g, epsilon, seed, sample):
    _check_pair_sample_inputs(cost, g, epsilon, seed)
    return cost.new_empty(cost.shape[:2], dtype=torch.int64)
