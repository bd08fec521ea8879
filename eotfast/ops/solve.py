"""The dispatch: each op of the pairing path on inputs that the public functions have already
checked, flattened to [B, ...] batches and handed to the resolved backend's op of the same
name (eotfast.ops.registry.backend_ops). Nothing here re-checks an argument; the ops keep
only the checks that protect memory (eotfast.ops.common)."""

from __future__ import annotations

import math

import torch

from eotfast._validation import (
    assert_in_graph,
    asserts_in_graph,
    check_finite_values,
    values_checkable,
)
from eotfast.ops.common import AuctionResult, SinkhornResult
from eotfast.ops.registry import BACKENDS, backend_ops

__all__ = ["DEFAULT_RELAXATION", "auction", "cost_matrix", "draw_partners", "sinkhorn"]


def cost_matrix(x: torch.Tensor, y: torch.Tensor, *, backend: str) -> torch.Tensor:
    """[..., n, d] x [..., m, d] (leading dimensions broadcast) -> [..., n, m] by the backend's
    cost_matrix on the flattened [B, n, d] batches, with the checks that read values (CPU
    tensors only): finite points, finite distances."""
    batch_shape = torch.broadcast_shapes(x.shape[:-2], y.shape[:-2])
    (n, d), m = x.shape[-2:], y.shape[-2]
    x = x.expand(*batch_shape, n, d).reshape(-1, n, d)  # [B, n, d]
    y = y.expand(*batch_shape, m, d).reshape(-1, m, d)  # [B, m, d]
    # torch's GEMM form ("cpu", "torch") carries a NaN or inf coordinate into the cost (the
    # centring spreads it to every entry), so one pass over the [n, m] cost checks the points
    # too, against two over the [n, d] inputs (d = 3072: 6x the reads at n = m), and they are
    # read only to name the culprit. The Triton and CUDA kernels clamp a NaN distance to 0 (a
    # NaN point gave an all-zero cost): their inputs are checked first.
    reads_nan = backend in ("cpu", "torch")
    if not reads_nan:
        check_finite_values("x", x)
        check_finite_values("y", y)
    # |x|^2 + |y|^2 - 2 x.y cancels for points far from the origin: at coordinates ~1e5 the
    # float32 distances between nearby points are lost and pair(x, x[perm], "exact") gave the
    # identity. Centring both batches on one point changes no distance and removes it. Half
    # inputs stay as they are: centring them would round them again (the kernels read them
    # exactly), and at their 11-bit precision a far-off batch lost its distances on input.
    centred_x, centred_y = x, y
    if x.dtype in (torch.float32, torch.float64):
        center = (x.mean(dim=1, keepdim=True) + y.mean(dim=1, keepdim=True)) / 2  # [B, 1, d]
        centred_x, centred_y = x - center, y - center
    cost = backend_ops(backend).cost_matrix(centred_x, centred_y)  # [B, n, m]
    if asserts_in_graph(cost):  # compiled: the same checks, as run-time assertions
        if reads_nan:
            check_finite_values("x", x)
            check_finite_values("y", y)
        assert_in_graph(
            torch.isfinite(cost.amax()),
            f"the squared distances between x and y overflow {cost.dtype}: rescale the points "
            "or pass float64",
        )
    elif values_checkable(cost) and not bool(torch.isfinite(cost.amax())):
        if reads_nan:
            check_finite_values("x", x)
            check_finite_values("y", y)
        # Finite points whose squared distances leave the dtype's range (1e20 against -1e20
        # in float32): say so here, not as a NaN or inf cost in a later step.
        raise ValueError(
            f"the squared distances between x and y overflow {cost.dtype} (largest |x| "
            f"{float(x.abs().amax()):.3g}, largest |y| {float(y.abs().amax()):.3g}): rescale "
            "the points or pass float64"
        )
    return cost.reshape(*batch_shape, n, m)


# Over-relaxation after epsilon scaling, measured with backend "cpu" (float32, tol 1e-4,
# epsilon = 0.05 std(cost), bench/_bench_utils.py image_batches, d = 3072) as iterations for
# w = 1 / 1.5 / 1.8 / 1.9: n = 1024: 1229 / 1238 / 437 / 223 (0.95 s against 4.7 s at w = 1);
# n = 256: 255 / 92 / 54 / 77; uniform noise, d = 64, n = 1024: 67 / 46 / 41 / 61.
DEFAULT_RELAXATION = 1.9


def sinkhorn(
    cost: torch.Tensor,
    a: torch.Tensor | None,
    b: torch.Tensor | None,
    *,
    epsilon: torch.Tensor,
    backend: str,
    max_iter: int,
    tol: float,
    scaling: float | None,
    relaxation: float | None,
    reach: float = math.inf,
    overwrite_cost: bool = False,
) -> tuple[SinkhornResult, torch.Tensor, torch.Tensor]:
    """The backend's Sinkhorn op on cost [..., n, m] (a solver dtype), a [B, n] and b [B, m]
    (B = the batch's size; None: uniform), epsilon [...]; returns (result for the shifted
    cost, shifted cost, offset [...]). ``relaxation`` None: DEFAULT_RELAXATION with epsilon
    scaling, 1 without. ``overwrite_cost``: the shifted cost is written over ``cost`` (a
    caller's own buffer; saves a copy of it).

    A balanced problem is solved on cost - min(cost): the shift leaves the plan and f unchanged
    and lowers g by the offset (iterate by iterate, so POT's sequence is kept). It matters in
    float32: image costs sit around 2000, where a float32 step is 1.2e-4, so potentials of that
    size hold the marginal error above ~1e-4 at epsilon = 1e-3 * std; shifted, the potentials
    are ~20x smaller and the error goes below 1e-5 (measured, d = 3072, n = 64). An unbalanced
    one (finite reach) is not shifted: its plan's mass depends on the costs' level (offset 0).
    """
    batch_shape, (n, m) = cost.shape[:-2], cost.shape[-2:]
    low = cost.amin(dim=(-2, -1))  # [...]
    if math.isinf(reach):
        offset = low
        if overwrite_cost:
            shifted_cost = cost.sub_(offset[..., None, None])  # [..., n, m]
        else:
            shifted_cost = cost - offset[..., None, None]
        spread = shifted_cost.amax(dim=(-2, -1))
    else:
        offset = torch.zeros_like(low)
        shifted_cost = cost
        spread = cost.amax(dim=(-2, -1)) - low
    # Epsilon scaling starts at the cost's range, where the plan is nearly the independent
    # coupling and the first iterations settle at once.
    if scaling is None:
        epsilon_start, scaling = epsilon, 0.5  # the plain iteration (scaling then unused)
        relaxation = 1.0 if relaxation is None else relaxation
    else:
        epsilon_start = torch.maximum(spread, epsilon)
        relaxation = DEFAULT_RELAXATION if relaxation is None else relaxation
    batch = batch_shape.numel()
    if a is None:
        a = cost.new_full((batch, n), 1.0 / n)
    if b is None:
        b = cost.new_full((batch, m), 1.0 / m)
    # The GPU kernels solve in float32: a float64 problem goes through them cast, its
    # potentials come back in float64.
    dtype = cost.dtype
    if dtype not in BACKENDS[backend].sinkhorn_dtypes:
        solve_dtype = BACKENDS[backend].sinkhorn_dtypes[0]
        _check_fits(shifted_cost, solve_dtype, backend)
    else:
        solve_dtype = dtype
    f, g, n_iter, error = backend_ops(backend).sinkhorn(
        shifted_cost.reshape(-1, n, m).to(solve_dtype), a.to(solve_dtype), b.to(solve_dtype),
        epsilon.reshape(-1).to(solve_dtype), max_iter=max_iter, tol=float(tol),
        epsilon_start=epsilon_start.reshape(-1).to(solve_dtype), scaling=float(scaling),
        relaxation=float(relaxation), reach=float(reach),
    )  # fmt: skip
    result = SinkhornResult(
        f=f.to(dtype).reshape(*batch_shape, n),
        g=g.to(dtype).reshape(*batch_shape, m),
        epsilon=epsilon,
        n_iter=n_iter.reshape(batch_shape),
        marginal_error=error.to(dtype).reshape(batch_shape),
    )
    return result, shifted_cost, offset


def _check_fits(cost: torch.Tensor, dtype: torch.dtype, backend: str) -> None:
    """A cost cast to a backend's narrower dtype keeps its values finite (CPU tensors: the
    Triton interpreter)."""
    if values_checkable(cost) and bool(cost.abs().amax() > torch.finfo(dtype).max):
        raise ValueError(
            f"cost has finite values beyond {str(dtype).removeprefix('torch.')}'s range (largest "
            f"{float(cost.abs().amax()):.3g}), which backend={backend!r} solves in; use "
            "backend='cpu' or 'torch' for such costs"
        )


def draw_partners(
    cost: torch.Tensor,
    result: SinkhornResult,
    *,
    sampling: str,
    generator: torch.Generator | None,
    backend: str,
) -> torch.Tensor:
    """A partner per row of [..., n, m] from the plan of ``result`` (potentials solved on this
    same cost) by the backend's row draw: [..., n] int64."""
    batch_shape, (n, m) = cost.shape[:-2], cost.shape[-2:]
    partners = backend_ops(backend).draw_partners(
        cost.reshape(-1, n, m), result.g.reshape(-1, m), result.epsilon.reshape(-1),
        sampling=sampling, generator=generator,
    )  # fmt: skip
    return partners.reshape(*batch_shape, n)


def auction(
    shifted_cost: torch.Tensor,
    prices: torch.Tensor,
    *,
    epsilon_start: torch.Tensor,
    epsilon_final: torch.Tensor,
    scaling: float,
    max_bids: int,
    backend: str,
) -> AuctionResult:
    """The backend's auction op on [..., n, m] costs (n <= m) with [..., m] prices and [...]
    epsilons of the cost's dtype, flattened to [B, n, m]; epsilon_start is raised to
    epsilon_final where smaller."""
    batch_shape, (n, m) = shifted_cost.shape[:-2], shifted_cost.shape[-2:]
    start = torch.maximum(epsilon_start, epsilon_final)
    columns, prices, epsilon, n_bids = backend_ops(backend).auction(
        shifted_cost.reshape(-1, n, m), prices.reshape(-1, m).contiguous(),
        epsilon_start=start.reshape(-1).contiguous(),
        epsilon_final=epsilon_final.reshape(-1).contiguous(),
        scaling=float(scaling), max_bids=int(max_bids),
    )  # fmt: skip
    epsilon = epsilon.reshape(batch_shape)
    return AuctionResult(
        assignment=columns.reshape(*batch_shape, n),
        prices=prices.reshape(*batch_shape, m),
        epsilon=epsilon,
        n_bids=n_bids.reshape(batch_shape),
        bound=m * epsilon,
    )
