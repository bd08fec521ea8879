"""Exact optimal transport: POT's network simplex (emd) and the linear assignment problem.

``emd`` runs on the host in float64 (eotfast.ops.host): for GPU tensors it copies the cost to
the host and the plan back, the documented exception to eotfast's no-host-round-trip rule.
``assignment`` runs the auction (eotfast.assignment) on the cost's device, and
``linear_sum_assignment`` wraps it in scipy's contract (index pairs, rectangular in both
directions, numpy in and out, +inf for forbidden pairs).
"""

from __future__ import annotations

import numpy as np
import torch

from eotfast._validation import check_iteration_limit, check_tensor, values_checkable
from eotfast.assignment import (
    BIDS_PER_COLUMN,
    PRECISION_ULPS,
    SCALING,
    START_FRACTION,
    auction,
    solve_auction,
)
from eotfast.ops.common import broadcast_marginal
from eotfast.ops.host import emd_pot
from eotfast.ops.registry import resolve_backend

__all__ = ["emd", "assignment", "linear_sum_assignment"]


def emd(
    cost: torch.Tensor,
    a: torch.Tensor | None = None,
    b: torch.Tensor | None = None,
    *,
    max_iter: int = 1_000_000,
) -> torch.Tensor:
    r"""Exact optimal transport plans by POT's network simplex (``ot.emd``).

    .. math:: \min_{P \ge 0,\ P 1 = a,\ P^\top 1 = b} \langle P, C \rangle

    Parameters
    ----------
    cost : Tensor, shape (..., n, m)
        Finite costs; leading dimensions index independent problems, solved in a loop.
    a, b : Tensor, shape (n,) / (m,) or (..., n) / (..., m), optional
        Marginals of equal mass; uniform when omitted.
    max_iter : int
        Network simplex iteration limit (POT's ``numItermax``); reaching it raises
        RuntimeError rather than returning a non-optimal plan.

    Returns
    -------
    Tensor, shape (..., n, m)
        The plan, on cost's device and in its dtype. Solved on the host in float64: a host
        round trip for GPU tensors (the documented exception).
    """
    check_tensor("cost", cost, min_dim=2)
    check_iteration_limit("max_iter", max_iter)
    batch_shape, (n, m) = cost.shape[:-2], cost.shape[-2:]
    # float64, as POT solves: uniform marginals of a half cost, 1/n and 1/m rounded to 11 bits,
    # differed in total mass by ~1e-4 and failed the equal-mass check.
    a = broadcast_marginal("a", a, batch_shape, n, cost, dtype=torch.float64)
    b = broadcast_marginal("b", b, batch_shape, m, cost, dtype=torch.float64)
    # ot.emd answers "Problem infeasible" when every cost is negative (cost = -10 + rand failed
    # at every size): solve on cost - min(cost) per problem, which has the same optimal plans.
    cost64 = cost.detach().reshape(-1, n, m).to(torch.float64)
    cost64 = cost64 - cost64.amin(dim=(-2, -1), keepdim=True)
    plan = emd_pot(cost64, a, b, max_iter)
    return plan.to(cost.dtype).reshape(cost.shape)


def assignment(cost: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    r"""Optimal assignment: each row gets its own column, total cost minimal.

    .. math:: \min_{\sigma \text{ injective}} \sum_i C_{i \sigma(i)}

    For square problems with uniform marginals this is also an optimal transport plan (a
    permutation is a vertex of the transport polytope). Solved by the auction algorithm
    (:func:`eotfast.auction` with its defaults) on the cost's device: the
    total cost is within ``bound`` = m * epsilon of the optimum, about 1e-6 of it by default
    (exactly optimal on integer costs whenever the bound is below 1); call
    :func:`eotfast.auction` for the bound, the prices or another epsilon.

    Parameters
    ----------
    cost : Tensor, shape (..., n, m) with n <= m
        Finite costs; leading dimensions index independent problems.
    backend : {"auto", "torch", "cpu", "triton", "cuda"}
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
    check_tensor("cost", cost, min_dim=2)
    n, m = cost.shape[-2:]
    if n > m:
        raise ValueError(
            f"assignment needs n <= m (each row its own column), got cost of shape "
            f"{tuple(cost.shape)}; use emd for n > m"
        )
    result = auction(cost, backend=backend)
    if values_checkable(result.epsilon) and not bool(result.epsilon.isfinite().all()):
        raise RuntimeError(
            "assignment: the auction reached its bid cap before the last phase; call "
            "eotfast.auction with a larger max_bids or a larger epsilon"
        )
    return result.assignment


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
    backend : {"auto", "torch", "cpu", "triton", "cuda"}
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
    forbids a pair whenever an assignment avoids it, but an infeasible problem, NaN or
    ``-inf`` raise nothing and give an unspecified assignment (still min(n, m) distinct
    pairs), and a problem stopped by the bid cap is not reported (``eotfast.auction``
    reports it). Among several optimal assignments, another may be returned than scipy's.

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
    the accuracy (eotfast.assignment.precision_floor)."""
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
    result = solve_auction(
        torch.from_numpy(shifted), prices, start, final, SCALING, BIDS_PER_COLUMN * m, backend
    )
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
    row_min = cost.amin(dim=-1, keepdim=True)
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
    result = solve_auction(shifted, prices, start, final, SCALING, BIDS_PER_COLUMN * m, backend)
    columns = result.assignment
    if transposed:
        order = torch.argsort(columns, dim=-1)
        return columns.gather(-1, order), order
    rows = torch.arange(n, device=device).expand(*batch, n).contiguous()
    return rows, columns
