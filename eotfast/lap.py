"""The linear assignment problem on the device of the cost: the auction algorithm
(:func:`auction`), the optimal assignment (:func:`assignment`) and scipy's contract
(:func:`linear_sum_assignment`)."""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch

from eotfast._validation import (
    assert_in_graph,
    asserts_in_graph,
    check_finite_range,
    check_finite_values,
    check_iteration_limit,
    check_same_device,
    check_tensor,
    values_checkable,
)
from eotfast.ops import solve
from eotfast.ops.common import SOLVER_DTYPES, AuctionResult, SinkhornResult
from eotfast.ops.registry import resolve_backend

__all__ = [
    "AuctionResult",
    "assignment",
    "auction",
    "default_epsilons",
    "linear_sum_assignment",
    "precision_floor",
]

# The auction runs on the reduced problem (reduced_problem): each row minus its minimum, prices
# minus theirs, both scaled by a power of two to a largest entry near 1. There
# epsilon_final = RELATIVE_BOUND * (n / m) * mean(reduced cost): the bound m * epsilon_final is
# 1e-6 of n times the mean excess of an entry over its row's minimum, i.e. of the gap between
# the expected total of a uniformly random assignment and the sum of the row minima, which
# bounds the optimum from below. Offsets common to a row (1e6 + U(0, 1): the magnitude-based
# rule gave a bound of 24, ~n times the spread, and closed 82-93% of the gap to scipy's
# optimum) do not enter it. At least PRECISION_ULPS ulps of the reduced problem's largest
# entry are left to rounding: below, C + p is not resolved finely enough for epsilon to mean
# anything.
RELATIVE_BOUND = 1e-6
PRECISION_ULPS = 16
# The first phase runs at (largest reduced cost) / 8, and each next one at SCALING times the
# last: range / 8 was the fastest start for the C++ kernel on n = 1024 image costs (of range,
# range / 8, range / 64).
START_FRACTION = 1 / 8
SCALING = 0.2
# The default cap on bids per problem: 10_000 per column, some 200 times what the tests and
# benchmarks need (at most ~50 per row); reaching it is reported (epsilon = inf), never silent.
BIDS_PER_COLUMN = 10_000


class ReducedProblem(NamedTuple):
    """An assignment problem in the units of what decides its optimum (:func:`reduced_problem`);
    leading dimensions are the cost's."""

    cost: torch.Tensor  # [..., n, m] (C - row minima) * scale, >= 0
    prices: torch.Tensor  # [..., m] (p - min p) * scale, >= 0
    scale: torch.Tensor  # [...] the power of two applied
    price_offset: torch.Tensor  # [...] min p, in cost units


def reduced_problem(cost: torch.Tensor, prices: torch.Tensor | None = None) -> ReducedProblem:
    """The auction's problem with what cannot change its optimal assignments taken out.

    Each row minus its minimum: every row takes exactly one column (n <= m), so every
    assignment's total moves by the same constant. Prices minus their minimum: a price common
    to every column changes no bid. Both times a power of two (exact), which brings the largest
    entry to [1, 2) where the dtype's exponent range allows: then neither a common offset
    (1e6 + U(0, 1)), nor large prices, nor a tiny scale (float32 costs of 1e-40, below the
    normal range) sets the epsilons or the precision floor. One pass over the cost for its row
    minima and maxima, one to form the reduced cost."""
    low, high = torch.aminmax(cost, dim=-1, keepdim=True)  # [..., n, 1]
    spread = (high - low).amax(dim=(-2, -1))  # [...] the reduced cost's largest entry
    if prices is None:
        prices = cost.new_zeros(*cost.shape[:-2], cost.shape[-1])
    price_offset = prices.amin(dim=-1)  # [...]
    prices = prices - price_offset[..., None]
    spread = torch.maximum(spread, prices.amax(dim=-1))
    # spread = mantissa * 2**exponent with the mantissa in [0.5, 1): times 2**(1 - exponent)
    # it is in [1, 2); the power is clamped to the dtype's normal exponents (float32: 2**-126
    # to 2**127), so that the scale itself is a finite normal number.
    info = torch.finfo(cost.dtype)
    _, exponent = torch.frexp(spread)
    power = (1 - exponent).clamp(round(math.log2(info.tiny)), math.floor(math.log2(info.max)))
    scale = torch.ldexp(torch.ones_like(spread), power.to(cost.dtype))  # [...]
    factor = scale[..., None, None]
    reduced = torch.addcmul(-low * factor, cost, factor)  # (C - row minima) * scale, one pass
    return ReducedProblem(reduced, prices * scale[..., None], scale, price_offset)


def precision_floor(reduced: ReducedProblem) -> torch.Tensor:
    """PRECISION_ULPS ulps (16 * finfo.eps) of the larger of the reduced problem's largest cost
    and price, per problem (at least the smallest positive normal number), in its units: the
    least epsilon_final that the auction is given. Below it, the rounding of C + p, not
    epsilon, limits the accuracy, and a bid would only step a price to the next float."""
    info = torch.finfo(reduced.cost.dtype)
    magnitude = torch.maximum(reduced.cost.amax(dim=(-2, -1)), reduced.prices.amax(dim=-1))
    return (PRECISION_ULPS * info.eps * magnitude).clamp_min(info.tiny)


def default_epsilons(reduced: ReducedProblem) -> tuple[torch.Tensor, torch.Tensor]:
    """(epsilon_start, epsilon_final), shape cost.shape[:-2], of an auction on the reduced
    problem, in its units (:func:`reduced_problem`).

    epsilon_final = 1e-6 * (n / m) * mean(reduced cost): the bound m * epsilon_final is 1e-6 of
    the gap between a uniformly random assignment's expected total and the sum of the row
    minima (a lower bound of the optimum); raised to :func:`precision_floor`.

    epsilon_start = the reduced cost's largest entry / 8, and at least epsilon_final.
    """
    n, m = reduced.cost.shape[-2:]
    typical = reduced.cost.mean(dim=(-2, -1))  # [...] mean excess over the row minima
    final = torch.maximum(RELATIVE_BOUND * (n / m) * typical, precision_floor(reduced))
    start = torch.maximum(START_FRACTION * reduced.cost.amax(dim=(-2, -1)), final)
    return start, final


def solve_reduced(
    reduced: ReducedProblem, *, epsilon_start, epsilon_final, scaling: float, max_bids: int,
    backend: str,
) -> AuctionResult:  # fmt: skip
    """The auction on a reduced problem, with epsilons in its units; the result in cost units
    (prices and epsilon unscaled, the price offset added back)."""
    result = solve.auction(
        reduced.cost, reduced.prices, epsilon_start=epsilon_start, epsilon_final=epsilon_final,
        scaling=scaling, max_bids=max_bids, backend=backend,
    )  # fmt: skip
    # Unscaled, an epsilon of a problem of tiny costs (float32 costs of 1e-40) may fall below
    # the smallest subnormal number: rounded up to it, so that the bound stays an upper bound.
    smallest = torch.finfo(result.epsilon.dtype).tiny * torch.finfo(result.epsilon.dtype).eps
    epsilon = torch.maximum(result.epsilon / reduced.scale, (result.epsilon > 0) * smallest)
    prices = result.prices / reduced.scale[..., None] + reduced.price_offset[..., None]
    m = reduced.cost.shape[-1]
    return result._replace(prices=prices, epsilon=epsilon, bound=m * epsilon)


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


def _checked_cost(cost, function: str) -> torch.Tensor:
    """A detached float32 or float64 [..., n, m] cost with n <= m, finite (CPU tensors)."""
    check_tensor("cost", cost, min_dim=2)
    n, m = cost.shape[-2:]
    if n > m:
        raise ValueError(
            f"{function} needs n <= m (each row its own column), got cost of shape "
            f"{tuple(cost.shape)}; transpose it to assign the columns"
            + ("" if function == "auction" else ", or use emd for n > m")
        )
    cost = cost.detach()
    if cost.dtype not in SOLVER_DTYPES:
        cost = cost.float()
    check_finite_range("cost", cost)
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
    virtual rows of cost 0 (never stored). It runs on the reduced problem
    (:func:`reduced_problem`: each row minus its minimum, the prices minus theirs, scaled by a
    power of two; the same optimal assignments, and numbers that hold what decides them).

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
        (:func:`eotfast.lap.default_epsilons`): the bound is 1e-6 of the gap between a
        uniformly random assignment's expected total and the sum of the row minima (which
        bounds the optimum from below), whatever offsets the rows or prices share; never
        below 16 ulps of the largest entry of the cost minus its row minima, or of the
        prices' spread, in the cost's dtype (a smaller value given here is raised to it).
    epsilon_start : float or Tensor of shape (...), optional
        Epsilon of the first phase, raised to ``epsilon`` if smaller. Default: the largest
        row range / 8. With good initial prices, a smaller start (their accuracy) saves
        phases.
    scaling : float in (0, 1)
        Factor between the epsilons of consecutive phases.
    max_bids : int, optional
        Cap on the bids per problem, >= 1; default 10_000 m. A problem that reaches it gets
        the free columns for its unassigned rows (always an injection) and epsilon = bound =
        inf. With ``backend="torch"`` off the CPU, the reference reads whether a problem is
        left every 64 rounds only (a host sync each): a finished batch may run up to 63 more.
    backend : {"auto", "torch", "cpu", "host", "triton", "cuda"}
        "cpu": the C++ kernel (one bidder at a time, problems over threads); "host": the same
        kernel on a host copy of the cost, for devices without an eotfast kernel (MPS, XPU;
        one round trip, the columns and prices come back to cost's device); "triton": the
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
    cost = _checked_cost(cost, "auction")
    scaling = _check_number("scaling", scaling, 0, 1)
    m = cost.shape[-1]
    if max_bids is None:
        max_bids = BIDS_PER_COLUMN * m
    check_iteration_limit("max_bids", max_bids)
    backend = resolve_backend(backend, cost.device)
    reduced = reduced_problem(cost, _prices_argument(prices, cost))
    start, final = default_epsilons(reduced)
    if epsilon is not None:
        epsilon = _epsilon_argument("epsilon", epsilon, cost) * reduced.scale
        final = torch.maximum(epsilon, precision_floor(reduced))
    if epsilon_start is not None:
        start = _epsilon_argument("epsilon_start", epsilon_start, cost) * reduced.scale
    return solve_reduced(
        reduced, epsilon_start=start, epsilon_final=final, scaling=scaling, max_bids=max_bids,
        backend=backend,
    )  # fmt: skip


def optimal_assignment(cost: torch.Tensor, *, backend: str) -> torch.Tensor:
    """:func:`assignment` on a checked cost (float32 or float64, n <= m, detached): the auction
    with its default epsilons from zero prices."""
    reduced = reduced_problem(cost)
    start, final = default_epsilons(reduced)
    # Only the columns are returned: the result stays in the reduced problem's units (epsilon
    # is inf where the bid cap stopped a problem, whatever the units).
    result = solve.auction(
        reduced.cost, reduced.prices, epsilon_start=start, epsilon_final=final,
        scaling=SCALING, max_bids=BIDS_PER_COLUMN * cost.shape[-1], backend=backend,
    )  # fmt: skip
    if values_checkable(result.epsilon) and not bool(result.epsilon.isfinite().all()):
        raise RuntimeError(
            "assignment: the auction reached its bid cap before the last phase; call "
            "eotfast.auction with a larger max_bids or a larger epsilon"
        )
    return result.assignment


def warm_started_assignment(
    shifted_cost: torch.Tensor, sinkhorn_result: SinkhornResult, *, backend: str
) -> AuctionResult:
    """The permutation of ``pair(..., sampling="permutation")``: one auction phase at the
    Sinkhorn epsilon on `shifted_cost` (cost minus its minimum, the cost the Sinkhorn solve of
    `sinkhorn_result` ran on), from the prices -g of that solve's column potential g.

    The entropic plan's row i is proportional to exp((g_j - C_ij) / epsilon): with prices -g,
    each row's best columns are those the plan favours, so most rows bid once and the phase
    ends after few conflicts (bids against a cold solve: bench/README.md, "The permutation").
    The result is an injection within m * epsilon of the optimal assignment, epsilon being the
    plan's own resolution (reg * std(cost) by default)."""
    reduced = reduced_problem(shifted_cost, (-sinkhorn_result.g).to(shifted_cost.dtype))
    epsilon = sinkhorn_result.epsilon.to(shifted_cost.dtype) * reduced.scale
    epsilon = torch.maximum(epsilon, precision_floor(reduced))
    return solve_reduced(
        reduced, epsilon_start=epsilon, epsilon_final=epsilon, scaling=SCALING,
        max_bids=BIDS_PER_COLUMN * shifted_cost.shape[-1], backend=backend,
    )  # fmt: skip


def assignment(cost: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    r"""Optimal assignment: each row gets its own column, total cost minimal.

    .. math:: \min_{\sigma \text{ injective}} \sum_i C_{i \sigma(i)}

    For square problems with uniform marginals this is also an optimal transport plan (a
    permutation is a vertex of the transport polytope). Solved by the auction algorithm
    (:func:`eotfast.auction` with its defaults) on the cost's device: the
    total cost is within ``bound`` = m * epsilon of the optimum: by default 1e-6 of the gap
    between a uniformly random assignment's expected total and the sum of the row minima,
    never below m * 16 ulps of the largest row range in the cost's dtype (exactly optimal on
    integer costs whenever the bound is below 1); offsets common to a row do not loosen it.
    Call :func:`eotfast.auction` for the bound, the prices or another epsilon.

    Parameters
    ----------
    cost : Tensor, shape (..., n, m) with n <= m
        Finite costs; leading dimensions index independent problems.
    backend : {"auto", "torch", "cpu", "host", "triton", "cuda"}
        The auction's backend (:func:`eotfast.auction`); "auto": the fastest for cost's
        device.

    Returns
    -------
    Tensor, shape (..., n), int64
        Column assigned to each row (distinct within a problem), on cost's device, with no
        host round trip for GPU tensors. On CPU tensors, a problem stopped by the bid cap
        (never seen on finite costs) raises RuntimeError; on GPU tensors that would need a
        host read: there its columns are still distinct, and ``eotfast.auction`` reports it.
    """
    cost = _checked_cost(cost, "assignment")
    return optimal_assignment(cost, backend=resolve_backend(backend, cost.device))


# ----------------------------------------------------------------------------- scipy's contract
# linear_sum_assignment's final epsilon, on the row-reduced cost S (each row minus its minimum).
# Integer-valued S: bound = m * epsilon = 0.5 < 1, which makes the assignment optimal (two
# totals differ by at least 1), the other half left to the rounding of S + p in float64.
INTEGER_BOUND = 0.5
# Other costs: bound = 1e-9 * n * F, F the largest finite entry of S (n * F bounds the total of
# every assignment of S). Measured on one n = 1024 image cost (d = 3072, F = 2065, float64, C++
# kernel): 30,980 bids in 7.4 ms at 1e-9, against 25,672 in 6.3 ms at 1e-6 and 36,188 in 8.5 ms
# at 1e-12; scipy takes 69 ms there.
FLOAT_RELATIVE_BOUND = 1e-9


def linear_sum_assignment(cost, maximize: bool = False, *, backend: str = "auto"):
    r"""Optimal assignment as index pairs, with the contract of
    ``scipy.optimize.linear_sum_assignment``.

    .. math:: \min_{\sigma} \sum_{i} C_{i \sigma(i)}

    over the injections :math:`\sigma` of the rows into the columns when n <= m, and of the
    columns into the rows when n > m: min(n, m) pairs, each row and each column used at most
    once. Solved by the forward auction with epsilon scaling (Bertsekas, 1988;
    :func:`eotfast.auction`) in float64, as scipy solves, on the cost minus each row's minimum
    (each column's when n > m: then the transpose is solved). Every row (column) of that
    solve is assigned exactly once, so the shift moves every assignment's total by the same
    constant: the solution is unchanged, and a large common offset (1e6 + U(0, 1)) no longer
    costs precision.

    Guarantee, per problem, with S the shifted cost and F its largest finite entry:

    - integer-valued costs (after the shift; ints and bools always are): optimal, the same
      total as scipy's, when ``m * max(S) < 2**47`` (e.g. costs up to 3e10 at m = 4096; the
      final epsilon is 0.5 / m, so the certified bound m * epsilon = 0.5 is below the gap of
      1 between integer totals, and the float64 rounding of S + p stays below the other
      half). Larger ranges: within the precision floor, m * 16 ulps of max(S).
    - other costs: total at most ``1e-9 * n * F`` above the optimum (the auction's
      ``bound``, m * epsilon with epsilon = 1e-9 * (n / m) * F, never below 16 ulps of
      max(S)), plus the float64 rounding of the sums (a few ulps of max(S) per row).

    Parameters
    ----------
    cost : array-like of shape (n, m), or (..., n, m); or Tensor of shape (..., n, m)
        Real costs (bool, integer or floating; converted to float64, so integers are exact up
        to 2**53). ``+inf`` marks a forbidden pair on the host (numpy inputs and CPU tensors),
        as in scipy; NaN and ``-inf`` are refused there. Leading dimensions index independent
        problems, numpy arrays included (scipy takes 2-D only).
    maximize : bool
        Maximize the total instead (solved on ``-cost``; ``-inf`` then forbids a pair).
    backend : {"auto", "torch", "cpu", "host", "triton", "cuda"}
        The auction's backend (:func:`eotfast.auction`); array-likes are solved on the CPU
        ("auto": the C++ kernel).

    Returns
    -------
    row_ind, col_ind : arrays of shape (..., min(n, m)), int64
        The pairs ``(row_ind[k], col_ind[k])``, ``row_ind`` ascending (``arange(n)`` when
        n <= m); ``cost[row_ind, col_ind].sum()`` is the optimal total. numpy arrays for
        array-likes; tensors on cost's device for tensors, computed there with no host read
        (no device sync on a GPU).

    Raises
    ------
    ValueError
        ``cost`` of fewer than 2 dimensions, or ragged; on the host: NaN or ``-inf`` entries
        (``+inf`` with ``maximize``), "cost matrix is infeasible" when no assignment avoids
        the forbidden pairs, and a row range beyond float64 (1e308 beside -1e308; with
        forbidden pairs, 2 n times the largest range).
    TypeError
        ``cost`` of a non-real dtype (complex, strings, objects); ``maximize`` not a bool.
    RuntimeError
        On the host, the auction reached its bid cap (10,000 bids per column; never seen).

    What differs from scipy: batched inputs are accepted; tensors stay tensors on their
    device. On GPU tensors (and under torch.compile) values are not read back: ``+inf`` still
    forbids a pair whenever an assignment avoids it, but an infeasible problem raises nothing
    and gives an unspecified assignment (still min(n, m) distinct pairs), and a problem
    stopped by the bid cap is not reported (``eotfast.auction`` reports it). NaN or ``-inf``
    raise nothing on GPU tensors either; compiled on CPU tensors they raise RuntimeError when
    the graph runs. Among several optimal assignments, another may be returned than scipy's.

    References
    ----------
    D. P. Bertsekas, "The auction algorithm: a distributed relaxation method for the
    assignment problem", Annals of Operations Research 14 (1988) 105-123.
    """
    if not isinstance(maximize, (bool, np.bool_)):
        raise TypeError(f"maximize must be a bool, got {type(maximize).__name__}")
    if isinstance(cost, torch.Tensor):
        if cost.is_complex():
            raise TypeError(f"cost must hold real numbers, got dtype {cost.dtype}")
        _check_matrix_shape(cost.shape)
        backend = resolve_backend(backend, cost.device)
        if not values_checkable(cost):
            return _solve_on_device(cost, bool(maximize), backend)
        host = cost.detach().to(torch.float64).numpy()
        rows, cols = _solve_on_host(host, bool(maximize), backend)
        return torch.from_numpy(rows), torch.from_numpy(cols)
    matrix = _float64_array(cost)
    backend = resolve_backend(backend, torch.device("cpu"))
    return _solve_on_host(matrix, bool(maximize), backend)


def _check_matrix_shape(shape) -> None:
    if len(shape) < 2:
        raise ValueError(
            f"cost must be a matrix of shape (n, m), or a batch (..., n, m), got shape "
            f"{tuple(shape)}"
        )


def _float64_array(cost) -> np.ndarray:
    """An array-like as a float64 numpy array of at least 2 dimensions."""
    try:
        array = np.asarray(cost)
    except ValueError as error:  # ragged nested lists
        raise ValueError(f"cost must be a rectangular array of numbers: {error}") from None
    if array.dtype.kind not in "biuf":
        raise TypeError(
            f"cost must hold real numbers (bool, integer or floating), got dtype {array.dtype}"
        )
    _check_matrix_shape(array.shape)
    return array.astype(np.float64, copy=False)


def _epsilons(largest, finite_largest, integral, n: int, m: int):
    """(epsilon_start, epsilon_final), float64 tensors like `largest`, of the auction on the
    shifted cost S: `largest` = max(S) (forbidden pairs included), `finite_largest` = F, the
    largest allowed entry, `integral` whether S is integer-valued (see INTEGER_BOUND,
    FLOAT_RELATIVE_BOUND). Below 16 ulps of max(S) the rounding of S + p, not epsilon, sets
    the accuracy (precision_floor)."""
    info = torch.finfo(torch.float64)
    floor = (PRECISION_ULPS * info.eps * largest).clamp_min(info.tiny)
    relative = FLOAT_RELATIVE_BOUND * (n / m) * finite_largest
    final = torch.maximum(torch.where(integral, INTEGER_BOUND / m, relative), floor)
    return torch.maximum(START_FRACTION * largest, final), final


def _forbidden_price(finite_largest, n: int):
    """The cost given to forbidden pairs (numpy arrays or tensors): an assignment that uses one
    totals at least this, an allowed one at most n * F, and the auction's result at most its
    bound more (0.5, or 1e-9 n F): above 2 n F + 2, a forbidden pair is in the result only
    when no allowed assignment exists. An integer, so integral costs stay integral."""
    return (2 * n * finite_largest) // 1 + 3


def _solve_on_host(cost: np.ndarray, maximize: bool, backend: str):
    """scipy's contract on a float64 [..., n, m] array: values checked, +inf forbidden,
    solved by the auction on CPU tensors that share the arrays' memory. The passes over the
    cost are numpy's (single-threaded): measured on a 2-core machine whose other core was
    busy, the row shift of a 1024 x 1024 float64 cost took 0.7 ms in numpy, 13 ms in torch
    with two threads (waiting for the busy core)."""
    batch, (n, m) = cost.shape[:-2], cost.shape[-2:]
    if cost.size == 0:
        empty = np.empty((*batch, min(n, m)), dtype=np.int64)
        return empty, empty.copy()
    if maximize:
        cost = -cost
    transposed = n > m
    if transposed:  # solve for the columns: each gets its own row
        cost, n, m = np.swapaxes(cost, -1, -2), m, n
    # The row minima, needed for the shift, also expose NaN and -inf (min propagates both),
    # and rows without an allowed pair (+inf): no separate pass over the cost checks them.
    row_min = cost.min(axis=-1, keepdims=True)
    if not np.isfinite(row_min).all():
        if np.isnan(row_min).any() or np.isneginf(row_min).any():
            sign = ("+", "-") if maximize else ("-", "+")
            raise ValueError(
                f"cost matrix contains invalid numeric entries: NaN or {sign[0]}inf (with "
                f"maximize={maximize}; {sign[1]}inf marks a forbidden pair)"
            )
        raise ValueError(_infeasible_message(maximize))
    with np.errstate(over="ignore", invalid="ignore"):  # an overflow is refused below
        shifted = np.subtract(cost, row_min, order="C")  # forbidden pairs stay +inf
        finite_largest = largest = np.asarray(shifted.max(axis=(-2, -1)))
        forbidden = np.isposinf(cost) if np.isinf(largest).any() else None
        if forbidden is not None and forbidden.any():
            finite_largest = np.asarray(np.where(forbidden, 0.0, shifted).max(axis=(-2, -1)))
            price = _forbidden_price(finite_largest, n)
            shifted = np.where(forbidden, price[..., None, None], shifted)
            largest = np.asarray(shifted.max(axis=(-2, -1)))
        else:
            forbidden = None
    if not np.isfinite(largest).all():
        raise ValueError(
            "cost's entries span more than float64 holds: a row's range (with forbidden "
            "pairs, 2 n times it) overflows; rescale the cost"
        )
    start, final = _epsilons(
        torch.from_numpy(largest), torch.from_numpy(finite_largest),
        torch.from_numpy(_integral_problems(shifted)), n, m,
    )  # fmt: skip
    prices = torch.zeros(*batch, m, dtype=torch.float64)
    result = solve.auction(
        torch.from_numpy(shifted), prices, epsilon_start=start, epsilon_final=final,
        scaling=SCALING, max_bids=BIDS_PER_COLUMN * m, backend=backend,
    )  # fmt: skip
    if not bool(result.epsilon.isfinite().all()):
        raise RuntimeError(
            "linear_sum_assignment: the auction reached its bid cap before its last phase; "
            "call eotfast.auction with a larger max_bids or a larger epsilon"
        )
    columns = result.assignment.numpy()
    if forbidden is not None:
        used = np.take_along_axis(forbidden, columns[..., None], axis=-1)
        if used.any():
            raise ValueError(_infeasible_message(maximize))
    if transposed:  # columns[..., j]: the row of column j; pairs in increasing row order
        order = np.argsort(columns, axis=-1)
        return np.take_along_axis(columns, order, axis=-1), order.astype(np.int64, copy=False)
    rows = np.broadcast_to(np.arange(n, dtype=np.int64), columns.shape).copy()
    return rows, columns


def _infeasible_message(maximize: bool) -> str:
    sign = "-" if maximize else "+"
    return (
        f"cost matrix is infeasible: every assignment of min(n, m) pairs uses a forbidden "
        f"({sign}inf) entry"
    )


def _integral_problems(shifted: np.ndarray) -> np.ndarray:
    """Whether each problem's entries are all integers, [...] bool. The first row decides most
    float costs (a non-integer there), without a pass over the whole cost."""
    first = shifted[..., 0, :]
    if not (first == np.round(first)).all(axis=-1).any():
        return np.zeros(shifted.shape[:-2], dtype=bool)
    return np.asarray((shifted == np.round(shifted)).all(axis=(-2, -1)))


def _solve_on_device(cost: torch.Tensor, maximize: bool, backend: str):
    """scipy's contract on a [..., n, m] tensor whose values are not read back (GPU tensors,
    or compiled code): the same shift, forbidden price and epsilons as on the host, decided
    by tensor ops on the device."""
    batch, (n, m) = cost.shape[:-2], cost.shape[-2:]
    device = cost.device
    if cost.numel() == 0:
        empty = torch.empty(*batch, min(n, m), dtype=torch.int64, device=device)
        return empty, empty.clone()
    cost = cost.detach().to(torch.float64)
    if maximize:
        cost = -cost
    transposed = n > m
    if transposed:
        cost, n, m = cost.mT, m, n
    row_min = cost.amin(dim=-1, keepdim=True)  # NaN where a row holds one
    if asserts_in_graph(cost):  # compiled on CPU tensors: scipy's refusal, at run time
        assert_in_graph(  # -inf: +inf with maximize; NaN compares False
            row_min.amin() > -torch.inf, "cost contains invalid numeric entries (NaN or -inf)"
        )
    # A row with no allowed pair (infeasible; not reported here): shifted by 0, all forbidden.
    row_min = torch.where(row_min < torch.inf, row_min, torch.zeros_like(row_min))
    shifted = cost - row_min
    allowed = shifted < torch.inf  # False at +inf (and NaN, which is not checked here)
    finite_largest = torch.where(allowed, shifted, 0.0).amax(dim=(-2, -1))
    price = _forbidden_price(finite_largest, n)
    shifted = torch.where(allowed, shifted, price[..., None, None]).contiguous()
    integral = (shifted == shifted.round()).all(dim=-1).all(dim=-1)
    largest = shifted.amax(dim=(-2, -1))
    start, final = _epsilons(largest, finite_largest, integral, n, m)
    prices = shifted.new_zeros(*batch, m)
    result = solve.auction(
        shifted, prices, epsilon_start=start, epsilon_final=final, scaling=SCALING,
        max_bids=BIDS_PER_COLUMN * m, backend=backend,
    )  # fmt: skip
    columns = result.assignment
    if transposed:
        order = torch.argsort(columns, dim=-1)
        return columns.gather(-1, order), order
    rows = torch.arange(n, device=device).expand(*batch, n).contiguous()
    return rows, columns
