"""Batched squared-Euclidean cost matrices."""

from __future__ import annotations

import torch

from eotfast._validation import check_finite_values, check_point_batches, values_checkable
from eotfast.ops import solve
from eotfast.ops.registry import resolve_backend

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
        leave float64 inputs to torch. "cpu" and "torch" use torch's GEMM (MKL, cuBLAS)
        (:func:`eotfast.ops.torch_backend.cost_matrix`).
        "auto": the fastest for the inputs' device.

    Returns
    -------
    Tensor, shape (..., n, m)
        float32 for half-precision inputs (their squared norms lose too many digits at image
        dimensions, d >= 3072), else the inputs' dtype.
    """
    check_point_batches(x, y)
    backend = resolve_backend(backend, x.device)
    # Checked on the inputs, not read off the cost: the Triton kernel clamps a NaN distance to
    # 0, and the centring spreads one NaN coordinate to every point, so NaN points gave an
    # all-zero cost.
    check_finite_values("x", x)
    check_finite_values("y", y)
    cost = solve.cost_matrix(x, y, backend)
    if values_checkable(cost) and not bool(torch.isfinite(torch.aminmax(cost).max)):
        # Finite points whose squared distances leave the dtype's range (1e20 against -1e20
        # in float32): say so here, not as a NaN or inf cost in a later step.
        raise ValueError(
            f"the squared distances between x and y overflow {cost.dtype} (largest |x| "
            f"{float(x.abs().amax()):.3g}, largest |y| {float(y.abs().amax()):.3g}): rescale "
            "the points or pass float64"
        )
    return cost
