"""Backend 'triton': the Triton kernels of eotfast.kernels registered as torch ops.

``torch.library.triton_op`` + ``wrap_triton`` (in the launchers) let torch.compile see the
kernels themselves: a compiled step that calls :func:`eotfast.pair` on a GPU has them inside
its graph, with no graph break. Each op launches one kernel, whatever the number of Sinkhorn
iterations (they run inside the kernel), so a compiled graph or a CUDA graph holds a fixed,
small number of nodes. The ops and their fakes reject dtypes the kernels do not take.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.library import triton_op

from eotfast.kernels.auction import launch_auction
from eotfast.kernels.cost_matrix import launch_cost_matrix
from eotfast.kernels.draw_partners import launch_draw_partners
from eotfast.kernels.sinkhorn import launch_sinkhorn
from eotfast.ops import torch_backend
from eotfast.ops.common import (
    auction_op,
    check_auction_arguments,
    check_auction_values,
    check_point_batch_arguments,
    check_sinkhorn_arguments,
    check_sinkhorn_values,
    empty_sinkhorn_solution,
    require_balanced,
    require_dtype,
    sinkhorn_op,
)

__all__ = [
    "auction",
    "auction_triton",
    "cost_matrix",
    "cost_matrix_triton",
    "draw_partners",
    "draw_partners_triton",
    "sinkhorn",
    "sinkhorn_triton",
]

_COST_MATRIX_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# ------------------------------------------------------------------------------- cost_matrix
def _check_cost_matrix_inputs(x: torch.Tensor, y: torch.Tensor) -> None:
    check_point_batch_arguments("cost_matrix_triton", x, y)
    require_dtype("cost_matrix_triton", _COST_MATRIX_DTYPES, x=x, y=y)


@triton_op("eotfast::cost_matrix_triton", mutates_args=())
def cost_matrix_triton(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """[B, n, d] x [B, m, d] -> [B, n, m] float32 squared distances (kernels/cost_matrix.py)."""
    _check_cost_matrix_inputs(x, y)
    return launch_cost_matrix(x, y)


@cost_matrix_triton.register_fake
def _(x, y):
    _check_cost_matrix_inputs(x, y)
    return x.new_empty((x.shape[0], x.shape[1], y.shape[1]), dtype=torch.float32)


def cost_matrix(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The kernel for float32 and half inputs; float64 stays exact in torch."""
    if x.dtype == torch.float64:
        return torch_backend.cost_matrix(x, y)
    return cost_matrix_triton(x, y)


# ---------------------------------------------------------------------------------- sinkhorn
def _check_sinkhorn_inputs(cost, a, b, epsilon, epsilon_start, reach) -> None:
    require_balanced("sinkhorn_triton", reach)
    require_dtype(
        "sinkhorn_triton", (torch.float32,),
        cost=cost, a=a, b=b, epsilon=epsilon, epsilon_start=epsilon_start,
    )  # fmt: skip


def _sinkhorn_fake(
    cost, a, b, epsilon, max_iter, tol, epsilon_start, scaling, relaxation, reach
):  # fmt: skip
    _check_sinkhorn_inputs(cost, a, b, epsilon, epsilon_start, reach)
    return empty_sinkhorn_solution(
        cost, a, b, epsilon, max_iter, tol, epsilon_start, scaling, relaxation, reach
    )


@sinkhorn_op(fake=_sinkhorn_fake, triton=True)
def sinkhorn_triton(
    cost: Tensor, a: Tensor, b: Tensor, epsilon: Tensor, max_iter: int, tol: float,
    epsilon_start: Tensor, scaling: float, relaxation: float, reach: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    """One launch of kernels/sinkhorn.py on float32 [B, n, m] problems; every problem runs to
    its own stop on the device. Values are checked on CPU tensors (the interpreter) only, as
    the other backends do."""
    check_sinkhorn_arguments(
        "sinkhorn_triton", cost, a, b, epsilon, max_iter, tol, epsilon_start, scaling,
        relaxation, reach,
    )  # fmt: skip
    _check_sinkhorn_inputs(cost, a, b, epsilon, epsilon_start, reach)
    check_sinkhorn_values("sinkhorn_triton", cost, a, b, epsilon, epsilon_start, reach)
    cost, a, b, epsilon, epsilon_start = (
        t.contiguous() for t in (cost, a, b, epsilon, epsilon_start)
    )
    return launch_sinkhorn(
        cost, a, b, epsilon, max_iter, tol,
        epsilon_start=epsilon_start, scaling=scaling, relaxation=relaxation,
    )  # fmt: skip


sinkhorn = sinkhorn_triton


# ----------------------------------------------------------------------------- draw_partners
def _check_draw_partners_inputs(cost, g, epsilon, seed) -> None:
    if cost.dim() != 3 or cost.numel() == 0:
        raise ValueError(f"draw_partners_triton: cost must be [B, n, m], got {tuple(cost.shape)}")
    batch, n, m = cost.shape
    for name, tensor, shape in (
        ("g", g, (batch, m)),
        ("epsilon", epsilon, (batch,)),
        ("seed", seed, (1,)),
    ):
        if tuple(tensor.shape) != shape:
            raise ValueError(
                f"draw_partners_triton: {name} must have shape {shape}, got {tuple(tensor.shape)}"
            )
        if tensor.device != cost.device:
            raise ValueError(
                f"draw_partners_triton: {name} is on {tensor.device}, cost on {cost.device}"
            )
    require_dtype("draw_partners_triton", (torch.float32,), cost=cost, g=g, epsilon=epsilon)
    require_dtype("draw_partners_triton", (torch.int64,), seed=seed)


@triton_op("eotfast::draw_partners_triton", mutates_args=())
def draw_partners_triton(
    cost: torch.Tensor, g: torch.Tensor, epsilon: torch.Tensor, seed: torch.Tensor, sample: bool
) -> torch.Tensor:
    """Partner per row of [B, n, m] from the plan's rows (kernels/draw_partners.py)."""
    _check_draw_partners_inputs(cost, g, epsilon, seed)
    return launch_draw_partners(cost, g, epsilon, seed, sample)


@draw_partners_triton.register_fake
def _(cost, g, epsilon, seed, sample):
    _check_draw_partners_inputs(cost, g, epsilon, seed)
    return cost.new_empty(cost.shape[:2], dtype=torch.int64)


def draw_partners(cost, g, epsilon, sampling: str, generator) -> torch.Tensor:
    """The row draw streamed by the kernel, which never forms the [n, m] weights; the Philox
    seed is drawn on the device (no host read)."""
    seed = torch.randint(2**62, (1,), generator=generator, device=cost.device)
    inputs = [t.float().contiguous() for t in (cost, g, epsilon)]
    return draw_partners_triton(*inputs, seed, sampling == "sample")


# ----------------------------------------------------------------------------------- auction
@auction_op(triton=True)
def auction_triton(
    cost: Tensor, prices: Tensor, epsilon_start: Tensor, epsilon_final: Tensor, scaling: float,
    max_bids: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    """One launch of kernels/auction.py on [B, n, m] problems (n <= m) in float32 or float64:
    every problem runs all its phases and stops on the device. Values are checked on CPU
    tensors (the interpreter) only, as the other ops do."""
    check_auction_arguments(
        "auction_triton", cost, prices, epsilon_start, epsilon_final, scaling, max_bids
    )
    check_auction_values("auction_triton", cost, prices, epsilon_start, epsilon_final)
    inputs = [t.contiguous() for t in (cost, prices, epsilon_start, epsilon_final)]
    return launch_auction(*inputs, scaling, max_bids)


auction = auction_triton
