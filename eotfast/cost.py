"""Batched squared-Euclidean cost matrices."""

from __future__ import annotations

import torch

from eotfast._validation import check_point_batches

__all__ = ["cost_matrix"]


def cost_matrix(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
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

    Returns
    -------
    Tensor, shape (..., n, m)
        float32 for half-precision inputs (their squared norms lose too many digits at image
        dimensions, d >= 3072), else the inputs' dtype.
    """
    check_point_batches(x, y)
    if x.dtype != y.dtype:
        raise TypeError(f"x and y must have the same dtype, got {x.dtype} and {y.dtype}")
    if x.dtype in (torch.float16, torch.bfloat16):
        x, y = x.float(), y.float()
    x_sq = x.square().sum(-1)  # [..., n]
    y_sq = y.square().sum(-1)  # [..., m]
    cross = x @ y.mT  # [..., n, m]
    return (x_sq[..., :, None] + y_sq[..., None, :] - 2 * cross).clamp_min_(0)
