"""Batched squared-Euclidean cost matrices."""

from __future__ import annotations

import torch

from eotfast._backends import resolve_backend
from eotfast._validation import check_point_batches

__all__ = ["cost_matrix"]


def cost_matrix(x: torch.Tensor, y: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    r"""Squared Euclidean distances between two batches of points.

    .. math:: C_{ij} = \lVert x_i - y_j \rVert_2^2
              = \lVert x_i \rVert^2 + \lVert y_j \rVert^2 - 2\, x_i^\top y_j

    computed through one matrix product (the GEMM form), clamped at 0 where rounding makes it
    negative. Same value as ``ot.dist(x, y)`` (metric ``"sqeuclidean"``).

    Parameters
    ----------
    x : Tensor, shape (..., n, d)
        Source points; leading dimensions index independent problems.
    y : Tensor, shape (..., m, d)
        Target points; leading dimensions broadcast against ``x``'s.
    backend : {"auto", "torch", "cpu", "triton", "cuda"}
        "triton": the tiled kernel of ``eotfast.kernels.cost_matrix`` (CUDA, or CPU under
        ``TRITON_INTERPRET=1``); "cuda": the kernel of csrc/cuda; both return float32 and
        leave float64 inputs to torch. "cpu" and "torch" use torch's GEMM (MKL, cuBLAS).
        "auto": the fastest for the inputs' device.

    Returns
    -------
    Tensor, shape (..., n, m)
        float32 for half-precision inputs (their squared norms lose too many digits at image
        dimensions, d >= 3072), else the inputs' dtype.
    """
    check_point_batches(x, y)
    if x.dtype != y.dtype:
        raise TypeError(f"x and y must have the same dtype, got {x.dtype} and {y.dtype}")
    backend = resolve_backend(backend, x.device)
    if backend in ("triton", "cuda") and x.dtype != torch.float64:
        return _cost_matrix_kernel(x, y, backend)
    if x.dtype in (torch.float16, torch.bfloat16):
        x, y = x.float(), y.float()
    x_sq = x.square().sum(-1)  # [..., n]
    y_sq = y.square().sum(-1)  # [..., m]
    cross = x @ y.mT  # [..., n, m]
    return (x_sq[..., :, None] + y_sq[..., None, :] - 2 * cross).clamp_min_(0)


def _cost_matrix_kernel(x: torch.Tensor, y: torch.Tensor, backend: str) -> torch.Tensor:
    if backend == "triton":
        from eotfast._triton_ops import cost_matrix_triton as kernel
    else:
        from eotfast._cuda_ops import cost_matrix_cuda as kernel

    batch_shape = torch.broadcast_shapes(x.shape[:-2], y.shape[:-2])
    (n, d), m = x.shape[-2:], y.shape[-2]
    x = x.expand(*batch_shape, n, d).reshape(-1, n, d)  # [B, n, d]
    y = y.expand(*batch_shape, m, d).reshape(-1, m, d)  # [B, m, d]
    return kernel(x, y).reshape(*batch_shape, n, m)
