"""From the public functions to a backend's op: argument checks, the shifted Sinkhorn solve,
batch flattening, and the dispatch through the registry (eotfast.ops.registry)."""

from __future__ import annotations

import math

import torch

from eotfast._validation import (
    check_iteration_limit,
    check_positive,
    check_tensor,
    values_checkable,
)
from eotfast.ops.common import SOLVER_DTYPES, SinkhornResult, broadcast_marginal, epsilon_from_reg
from eotfast.ops.registry import backend_ops, resolve_backend

__all__ = ["cost_matrix", "draw_partners", "sinkhorn_on_shifted_cost", "solve_sinkhorn"]


def cost_matrix(x: torch.Tensor, y: torch.Tensor, backend: str) -> torch.Tensor:
    """[..., n, d] x [..., m, d] (leading dimensions broadcast) -> [..., n, m] by the resolved
    backend's cost_matrix on the flattened [B, n, d] batches."""
    batch_shape = torch.broadcast_shapes(x.shape[:-2], y.shape[:-2])
    (n, d), m = x.shape[-2:], y.shape[-2]
    x = x.expand(*batch_shape, n, d).reshape(-1, n, d)  # [B, n, d]
    y = y.expand(*batch_shape, m, d).reshape(-1, m, d)  # [B, m, d]
    # |x|^2 + |y|^2 - 2 x.y cancels for points far from the origin: at coordinates ~1e5 the
    # float32 distances between nearby points are lost and pair(x, x[perm], "exact") gave the
    # identity. Centring both batches on one point changes no distance and removes it. Half
    # inputs stay as they are: centring them would round them again (the kernels read them
    # exactly), and at their 11-bit precision a far-off batch lost its distances on input.
    if x.dtype in (torch.float32, torch.float64):
        center = (x.mean(dim=1, keepdim=True) + y.mean(dim=1, keepdim=True)) / 2  # [B, 1, d]
        x, y = x - center, y - center
    return backend_ops(backend).cost_matrix(x, y).reshape(*batch_shape, n, m)


# Over-relaxation after epsilon scaling, measured with backend "cpu" (float32, tol 1e-4,
# epsilon = 0.05 std(cost), bench/_bench_utils.py image_batches, d = 3072) as iterations for
# w = 1 / 1.5 / 1.8 / 1.9: n = 1024: 1229 / 1238 / 437 / 223 (0.95 s against 4.7 s at w = 1);
# n = 256: 255 / 92 / 54 / 77; uniform noise, d = 64, n = 1024: 67 / 46 / 41 / 61.
DEFAULT_RELAXATION = 1.9


def sinkhorn_on_shifted_cost(
    cost, a, b, reg, relative_reg, max_iter, tol, backend, scaling, relaxation, reach=None
):
    """The public Sinkhorn's arguments checked, epsilon from ``reg``, then
    :func:`solve_sinkhorn`: returns (result for the shifted cost, shifted cost, offset)."""
    check_tensor("cost", cost, min_dim=2)
    reg, relaxation = check_sinkhorn_options(reg, max_iter, tol, scaling, relaxation)
    reach = check_reach(reach)
    # The solvers are not differentiable (no autograd formula is registered): work on detached
    # inputs, so the outputs say so instead of failing in backward.
    cost = cost.detach()
    if cost.dtype not in SOLVER_DTYPES:
        cost = cost.float()
    backend = resolve_backend(backend, cost.device, unbalanced=not math.isinf(reach))
    batch_shape, (n, m) = cost.shape[:-2], cost.shape[-2:]
    a = broadcast_marginal("a", a, batch_shape, n, cost).detach()  # [B, n]
    b = broadcast_marginal("b", b, batch_shape, m, cost).detach()  # [B, m]
    epsilon = epsilon_from_reg(cost, reg, relative_reg)  # [...]
    check_epsilon_range(epsilon, reg, relative_reg)
    return solve_sinkhorn(
        cost, a, b, epsilon, backend=backend, max_iter=max_iter, tol=tol, scaling=scaling,
        relaxation=relaxation, reach=reach,
    )  # fmt: skip


def solve_sinkhorn(
    cost, a, b, epsilon, *, backend, max_iter, tol, scaling, relaxation, reach,
    overwrite_cost=False,
):  # fmt: skip
    """The resolved backend's Sinkhorn op on checked inputs: cost [..., n, m] (a solver dtype),
    a [B, n], b [B, m] (B = the batch's size), epsilon [...]; returns (result for the shifted
    cost, shifted cost, offset [...]). ``overwrite_cost``: the shifted cost is written over
    ``cost`` (a caller's own buffer; saves a copy of it).

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
    else:
        epsilon_start = torch.maximum(spread, epsilon)
    f, g, n_iter, error = backend_ops(backend).sinkhorn(
        shifted_cost.reshape(-1, n, m), a, b, epsilon.reshape(-1), max_iter, float(tol),
        epsilon_start.reshape(-1), float(scaling), float(relaxation), float(reach),
    )  # fmt: skip
    result = SinkhornResult(
        f=f.reshape(*batch_shape, n),
        g=g.reshape(*batch_shape, m),
        epsilon=epsilon,
        n_iter=n_iter.reshape(batch_shape),
        marginal_error=error.reshape(batch_shape),
    )
    return result, shifted_cost, offset


def check_reach(reach) -> float:
    """None (balanced) or rho > 0 of unbalanced OT, in cost units; returned as a float, inf
    for balanced."""
    if reach is None:
        return math.inf
    if isinstance(reach, bool) or not isinstance(reach, (int, float)) or not reach > 0:
        raise ValueError(
            f"reach must be None (balanced OT) or a number > 0 (rho of unbalanced OT, in cost "
            f"units), got {reach!r}"
        )
    return float(reach)


def check_sinkhorn_options(reg, max_iter, tol, scaling, relaxation) -> tuple[float, float]:
    """The number arguments of a Sinkhorn solve, checked without the cost (so that pair
    checks them whichever method it runs); returns (reg, relaxation), None resolved."""
    reg = check_positive("reg", reg)
    check_iteration_limit("max_iter", max_iter)
    if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not tol >= 0:
        raise ValueError(f"tol must be a number >= 0, got {tol!r}")
    if scaling is not None and (
        isinstance(scaling, bool) or not isinstance(scaling, (int, float)) or not 0 < scaling < 1
    ):
        raise ValueError(f"scaling must be None or a number in (0, 1), got {scaling!r}")
    if relaxation is None:
        relaxation = DEFAULT_RELAXATION if scaling is not None else 1.0
    if (
        isinstance(relaxation, bool)
        or not isinstance(relaxation, (int, float))
        or not 1 <= relaxation < 2
    ):
        raise ValueError(f"relaxation must be None or a number in [1, 2), got {relaxation!r}")
    return reg, relaxation


def check_epsilon_range(epsilon, reg, relative_reg) -> None:
    """Every epsilon a positive normal number of the solve dtype: reg = 1e-40, reg = 1e300,
    or a cost spread of 1e200 (float64) or under 1e-37 (float32) gave f = -inf, g = NaN and
    pairs all on column 0. Read on CPU tensors only (a GPU read would sync)."""
    if not values_checkable(epsilon):
        return
    info = torch.finfo(epsilon.dtype)
    low, high = torch.aminmax(epsilon)
    if not (bool(low >= info.tiny) and bool(high <= info.max)):
        bad = float(low) if not bool(low >= info.tiny) else float(high)
        scale = (
            f"reg x std(cost), std(cost) up to {float(high) / reg:.3g}" if relative_reg else "reg"
        )
        raise ValueError(
            f"reg={reg:g} gives epsilon = {bad:.3g} ({scale}), outside the positive normal "
            f"range of {epsilon.dtype} [{info.tiny:.3g}, {info.max:.3g}]; choose reg so that "
            "epsilon is of the order of the costs' spread"
        )


def draw_partners(cost, result: SinkhornResult, sampling: str, generator, backend: str):
    """A partner per row of [..., n, m] from the plan of ``result`` (potentials solved on this
    same cost) by the backend's row draw."""
    batch_shape, (n, m) = cost.shape[:-2], cost.shape[-2:]
    partners = backend_ops(backend).draw_partners(
        cost.reshape(-1, n, m), result.g.reshape(-1, m), result.epsilon.reshape(-1),
        sampling, generator,
    )  # fmt: skip
    return partners.reshape(*batch_shape, n)
