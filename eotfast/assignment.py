"""The linear assignment problem by the auction algorithm, on the device of the cost."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from eotfast._validation import (
    check_finite_values,
    check_same_device,
    check_tensor,
    values_checkable,
)
from eotfast.ops.common import SOLVER_DTYPES
from eotfast.ops.registry import backend_auction, resolve_backend

__all__ = ["AuctionResult", "auction", "default_epsilons", "precision_floor"]

# epsilon_final = RELATIVE_BOUND * (typical assigned cost) * n / m: the bound m * epsilon_final
# is then about 1e-6 of the optimal total. At most 16 ulps of the cost range is left to
# rounding: below, C + p is not resolved finely enough for epsilon to mean anything.
RELATIVE_BOUND = 1e-6
PRECISION_ULPS = 16
# The first phase runs at (cost range) / 8, and each next one at SCALING times the last.
START_FRACTION = 1 / 8
SCALING = 0.2
# The default cap on bids per problem: 10_000 per column, some 200 times what the tests and
# benchmarks need (at most ~50 per row); reaching it is reported (epsilon = inf), never silent.
BIDS_PER_COLUMN = 10_000


class AuctionResult(NamedTuple):
    """Output of :func:`eotfast.auction`; leading dimensions are those of the cost matrix."""

    assignment: torch.Tensor  # [..., n] int64, column of each row, distinct within a problem
    prices: torch.Tensor  # [..., m] final column prices (dual variables, cost units)
    epsilon: torch.Tensor  # [...] epsilon of the last phase; inf where max_bids stopped it
    n_bids: torch.Tensor  # [...] int64, bids made
    bound: torch.Tensor  # [...] m * epsilon: total cost minus the optimum is at most this


def precision_floor(shifted_cost: torch.Tensor, prices=None) -> torch.Tensor:
    """16 ulps (16 * finfo.eps) of the larger of the cost range and the largest |price|, per
    problem (at least the smallest positive normal number): the least epsilon_final that the
    auction is given. Below it, the rounding of C + p, not epsilon, limits the accuracy, and a
    bid would only step a price to the next float."""
    info = torch.finfo(shifted_cost.dtype)
    magnitude = shifted_cost.amax(dim=(-2, -1))  # the range: shifted_cost's minimum is 0
    if prices is not None:
        magnitude = torch.maximum(magnitude, prices.abs().amax(dim=-1))
    return (PRECISION_ULPS * info.eps * magnitude).clamp_min(info.tiny)


def default_epsilons(cost: torch.Tensor, shifted_cost: torch.Tensor, prices=None):
    """(epsilon_start, epsilon_final), shape cost.shape[:-2], of an auction on `shifted_cost`
    (`cost` minus its minimum, per problem) from initial `prices` (None: zeros).

    epsilon_final = 1e-6 * (n / m) * mean_i |min_j C_ij|: the row minima's mean estimates the
    optimal total per row from below for nonnegative costs, so the bound m * epsilon_final is
    at most about 1e-6 of the optimum; raised to :func:`precision_floor` (16 ulps of the cost
    range). Measured on n = m = 1024 image costs (bench/_bench_utils.image_batches,
    d = 3072): range 2088, optimum 511,000 (499 per row), row minima 429 on average; in
    float32 the floor, 0.0040, applies and the bound is 4.1 (8e-6 of the optimum, 25,189
    bids); in float64 the 1e-6 rule gives 4.3e-4 (bound 0.44, 27,410 bids).

    epsilon_start = range / 8, the fastest start measured for the C++ kernel on those costs
    (of range, range / 8, range / 64), and at least epsilon_final.
    """
    n, m = cost.shape[-2:]
    typical = cost.amin(dim=-1).abs().mean(dim=-1).to(shifted_cost.dtype)  # [...]
    final = torch.maximum(RELATIVE_BOUND * (n / m) * typical, precision_floor(shifted_cost, prices))
    start = torch.maximum(START_FRACTION * shifted_cost.amax(dim=(-2, -1)), final)
    return start, final


def _check_number(name: str, value, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not low < value < high:
        raise ValueError(f"{name} must be a number in ({low:g}, {high:g}), got {value!r}")
    return float(value)


def _epsilon_argument(name: str, value, cost: torch.Tensor) -> torch.Tensor:
    """A positive finite epsilon as a [...] tensor of cost's dtype, from a number or a tensor
    broadcastable to cost.shape[:-2]."""
    batch_shape = cost.shape[:-2]
    if isinstance(value, torch.Tensor):
        check_same_device(cost=cost, **{name: value})
        try:
            value = value.detach().to(cost.dtype).expand(batch_shape)
        except RuntimeError:
            raise ValueError(
                f"{name} must be a number or a tensor broadcastable to {tuple(batch_shape)}, "
                f"got shape {tuple(value.shape)}"
            ) from None
        check_finite_values(name, value)
        if values_checkable(value) and not bool((value > 0).all()):
            raise ValueError(f"{name} must be > 0")
        return value
    _check_number(name, value, 0, math.inf)
    return torch.full(batch_shape, float(value), dtype=cost.dtype, device=cost.device)


def _prices_argument(prices, cost: torch.Tensor) -> torch.Tensor:
    batch_shape, m = cost.shape[:-2], cost.shape[-1]
    if prices is None:
        return cost.new_zeros(*batch_shape, m)
    check_tensor("prices", prices, min_dim=1)
    check_same_device(cost=cost, prices=prices)
    if prices.shape[-1] != m or prices.shape[:-1] not in (torch.Size(), batch_shape):
        raise ValueError(
            f"prices must have shape ({m},) or {(*batch_shape, m)} for cost of shape "
            f"{tuple(cost.shape)}, got {tuple(prices.shape)}"
        )
    prices = prices.detach().to(cost.dtype).expand(*batch_shape, m)
    check_finite_values("prices", prices)
    return prices


def solve_auction(
    shifted_cost, prices, epsilon_start, epsilon_final, scaling, max_bids, backend
) -> AuctionResult:
    """The auction op of the resolved `backend` on [..., n, m] costs (flattened to [B, n, m]),
    with [..., m] prices and [...] epsilons of the cost's dtype."""
    batch_shape, (n, m) = shifted_cost.shape[:-2], shifted_cost.shape[-2:]
    start = torch.maximum(epsilon_start, epsilon_final)
    op = backend_auction(backend, shifted_cost.device)
    columns, prices, epsilon, n_bids = op(
        shifted_cost.reshape(-1, n, m), prices.reshape(-1, m).contiguous(),
        start.reshape(-1).contiguous(), epsilon_final.reshape(-1).contiguous(),
        float(scaling), int(max_bids),
    )  # fmt: skip
    epsilon = epsilon.reshape(batch_shape)
    return AuctionResult(
        assignment=columns.reshape(*batch_shape, n),
        prices=prices.reshape(*batch_shape, m),
        epsilon=epsilon,
        n_bids=n_bids.reshape(batch_shape),
        bound=m * epsilon,
    )


def prepare_cost(cost) -> torch.Tensor:
    """A detached float32 or float64 [..., n, m] cost with n <= m, finite (CPU tensors)."""
    check_tensor("cost", cost, min_dim=2)
    n, m = cost.shape[-2:]
    if n > m:
        raise ValueError(
            f"cost [..., n, m] must have n <= m (each row gets its own column), got shape "
            f"{tuple(cost.shape)}; transpose it to assign the columns"
        )
    cost = cost.detach()
    if cost.dtype not in SOLVER_DTYPES:
        cost = cost.float()
    check_finite_values("cost", cost)
    return cost


def auction(
    cost: torch.Tensor,
    prices: torch.Tensor | None = None,
    *,
    epsilon: float | torch.Tensor | None = None,
    epsilon_start: float | torch.Tensor | None = None,
    scaling: float = SCALING,
    max_bids: int | None = None,
    backend: str = "auto",
) -> AuctionResult:
    r"""Optimal assignment within a certified bound, by the auction algorithm.

    Solves, for each problem in the batch, the linear assignment problem

    .. math:: \min_{\sigma \text{ injective}} \sum_i C_{i \sigma(i)}

    (each row i gets its own column :math:`\sigma(i)`, n <= m) by the forward auction with
    epsilon scaling (Bertsekas, 1988; Bertsekas & Castanon, 1991): columns carry prices
    :math:`p_j`; an unassigned row bids for its best column
    :math:`j_1 = \arg\min_j (C_{ij} + p_j)`, raising its price by the margin to its second
    best, :math:`w_2 - w_1`, plus epsilon, and takes it from its previous owner. When every
    row holds a column, each row's column is within epsilon of its best
    (epsilon-complementary slackness), which makes the total cost at most
    :math:`m \varepsilon` above the optimum (``bound``): exactly optimal for integer costs
    when :math:`m \varepsilon < 1`. Phases run at epsilon_start, times ``scaling`` each,
    down to epsilon, each from the prices of the last. The problem is made square by m - n
    virtual rows of cost 0 (never stored). The cost is shifted by its minimum first (same
    optimal assignments, smaller numbers for the float arithmetic).

    Parameters
    ----------
    cost : Tensor, shape (..., n, m) with n <= m
        Finite costs; leading dimensions index independent problems. float32 or float64
        (float16 / bfloat16 are solved in float32).
    prices : Tensor, shape (m,) or (..., m), optional
        Initial column prices (zeros by default). Good prices shorten the solve: for
        instance ``-g``, the column potential of :func:`eotfast.sinkhorn` on the same cost
        (the entropic plan's row i is proportional to :math:`\exp((g_j - C_{ij})/\varepsilon)`,
        so low :math:`C_{ij} - g_j` marks the columns the row prefers).
    epsilon : float or Tensor of shape (...), optional
        The final epsilon (absolute, in cost units), > 0: ``bound = m * epsilon``. Default
        (:func:`eotfast.assignment.default_epsilons`): 1e-6 of the typical assigned cost per
        row, times n / m, so the bound is ~1e-6 of the optimal total; never below 16 ulps
        of the cost range in the cost's dtype (a smaller value given here is raised to it).
    epsilon_start : float or Tensor of shape (...), optional
        Epsilon of the first phase, raised to ``epsilon`` if smaller. Default: the cost
        range / 8. With good initial prices, a smaller start (their accuracy) saves phases.
    scaling : float in (0, 1)
        Factor between the epsilons of consecutive phases.
    max_bids : int, optional
        Cap on the bids per problem, >= 1; default 10_000 m. A problem that reaches it gets
        the free columns for its unassigned rows (always an injection) and epsilon = bound =
        inf. With ``backend="torch"`` on a GPU, the reference runs exactly ``max_bids``
        rounds (it cannot stop early without a host read): pass a cap near the need there.
    backend : {"auto", "torch", "cpu", "triton", "cuda"}
        "cpu": the C++ kernel (one bidder at a time, problems over threads); "triton": the
        Triton kernel (one program per problem, all rows bid at once), "cuda" uses it too;
        "torch": the PyTorch reference (any device); "auto": the fastest for cost's device.

    Returns
    -------
    AuctionResult
        ``assignment`` [..., n] int64 (distinct columns), final ``prices`` [..., m],
        ``epsilon`` [...], ``n_bids`` [...] int64 and ``bound`` = m * epsilon [...], all on
        cost's device: nothing is read back to the host for GPU tensors.

    References
    ----------
    D. P. Bertsekas, "The auction algorithm: a distributed relaxation method for the
    assignment problem", Annals of Operations Research 14 (1988) 105-123. D. P. Bertsekas and
    D. A. Castanon, "Parallel synchronous and asynchronous implementations of the auction
    algorithm", Parallel Computing 17 (1991) 707-732.
    """
    cost = prepare_cost(cost)
    scaling = _check_number("scaling", scaling, 0, 1)
    m = cost.shape[-1]
    if max_bids is None:
        max_bids = BIDS_PER_COLUMN * m
    elif isinstance(max_bids, bool) or not isinstance(max_bids, int) or not 1 <= max_bids < 2**63:
        raise ValueError(f"max_bids must be an integer from 1 to 2**63 - 1, got {max_bids!r}")
    backend = resolve_backend(backend, cost.device)
    warm = prices is not None
    prices = _prices_argument(prices, cost)
    shifted_cost = cost - cost.amin(dim=(-2, -1), keepdim=True)
    start, final = default_epsilons(cost, shifted_cost, prices if warm else None)
    if epsilon is not None:
        floor = precision_floor(shifted_cost, prices if warm else None)
        final = torch.maximum(_epsilon_argument("epsilon", epsilon, cost), floor)
    if epsilon_start is not None:
        start = _epsilon_argument("epsilon_start", epsilon_start, cost)
    return solve_auction(shifted_cost, prices, start, final, scaling, max_bids, backend)


def warm_started_assignment(shifted_cost, sinkhorn_result, backend: str) -> AuctionResult:
    """The permutation of ``pair(..., sampling="permutation")``: one auction phase at the
    Sinkhorn epsilon on `shifted_cost` (cost minus its minimum, the cost the Sinkhorn solve of
    `sinkhorn_result` ran on), from the prices -g of that solve's column potential g.

    The entropic plan's row i is proportional to exp((g_j - C_ij) / epsilon): with prices -g,
    each row's best columns are those the plan favours, so most rows bid once and the phase
    ends after few conflicts. The result is an injection within m * epsilon of the optimal
    assignment, epsilon being the plan's own resolution (reg * std(cost) by default).
    Measured on n = 256 image costs (d = 3072): 434 bids (gap closed 0.998) against 2467 for
    the same phase from zero prices at range / 8 down to epsilon, and 5755 for the exact
    default (range / 8 down to 0.004, gap 1.0); these bids take well under a millisecond on
    the C++ kernel, a few % of the Sinkhorn solve before them."""
    shifted_cost = prepare_cost(shifted_cost)
    prices = (-sinkhorn_result.g).to(shifted_cost.dtype)
    epsilon = sinkhorn_result.epsilon.to(shifted_cost.dtype)
    epsilon = torch.maximum(epsilon, precision_floor(shifted_cost, prices))
    m = shifted_cost.shape[-1]
    return solve_auction(
        shifted_cost, prices, epsilon, epsilon, SCALING, BIDS_PER_COLUMN * m, backend
    )
