"""Batched squared-Euclidean cost matrices."""

from __future__ import annotations

import torch

from eotfast._validation import point_batches
from eotfast.ops import solve
from eotfast.ops.registry import resolve_backend

__all__ = ["cost_matrix"]


def cost_matrix(
    x: torch.Tensor, y: torch.Tensor, *, batch_dims: int = 0, backend: str = "auto"
) -> torch.Tensor:
    r"""Squared Euclidean distances between two batches of samples.

    .. math:: C_{ij} = \lVert x_i - y_j \rVert_2^2
              = \lVert x_i \rVert^2 + \lVert y_j \rVert^2 - 2\, x_i^\top y_j

    computed through one matrix product (the GEMM form), clamped at 0 where rounding makes it
    negative. Same value as ``ot.dist(x, y)`` (metric ``"sqeuclidean"``) on the flattened
    samples, as torchcfm and POT read a batch.

    Parameters
    ----------
    x : Tensor, shape (n, *features), or (*batch, n, *features) with ``batch_dims``
        Source samples: the first dimension (after the batch dimensions) indexes them, the
        rest are flattened into d features, so image batches [n, C, H, W] go in as they are.
    y : Tensor, shape (m, *features), or (*batch, m, *features)
        Target samples of the same feature shape; their batch dimensions broadcast against
        x's.
    batch_dims : int
        How many leading dimensions index independent problems (0: one problem). Shapes
        are never guessed: x [8, 256, 3072] is 8 samples of 256 * 3072 features unless
        ``batch_dims=1`` says it holds 8 problems of 256 samples.
    backend : {"auto", "torch", "cpu", "host", "triton", "cuda"}
        "triton": the tiled kernel of ``eotfast.kernels.cost_matrix`` (CUDA, or CPU under
        ``TRITON_INTERPRET=1``); "cuda": the kernel of csrc/cuda; both return float32 and
        leave float64 inputs to torch. "cpu", "host" and "torch" use torch's GEMM (MKL, cuBLAS)
        (:func:`eotfast.ops.torch_backend.cost_matrix`).
        "auto": the fastest for the inputs' device.

    Returns
    -------
    Tensor, shape (*batch, n, m)
        float32 for half-precision inputs (their squared norms lose too many digits at image
        dimensions, d >= 3072), else the inputs' dtype.
    """
    x, y = point_batches(x, y, batch_dims)
    return solve.cost_matrix(x, y, backend=resolve_backend(backend, x.device))
