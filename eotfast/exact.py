"""Exact optimal transport: POT's network simplex (emd) and the linear assignment problem.

Both solvers run on the host in float64 (eotfast.ops.host). For GPU tensors they copy the
cost to the host and the result back: that synchronization is the documented exception to
eotfast's no-host-round-trip rule, the price of exactness. Prefer ``pair(method="sinkhorn")``
inside a GPU training step.
"""

from __future__ import annotations

import torch

from eotfast._validation import check_iteration_limit, check_tensor
from eotfast.ops.common import broadcast_marginal
from eotfast.ops.host import assignment_scipy, emd_pot

__all__ = ["emd", "assignment"]


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
    plan = emd_pot(cost.reshape(-1, n, m), a, b, max_iter)
    return plan.reshape(cost.shape)


def assignment(cost: torch.Tensor) -> torch.Tensor:
    r"""Exact optimal assignment: each row gets its own column, total cost minimal.

    .. math:: \min_{\sigma \text{ injective}} \sum_i C_{i \sigma(i)}

    For square problems with uniform marginals this is also an optimal transport plan (a
    permutation is a vertex of the transport polytope), by
    ``scipy.optimize.linear_sum_assignment`` (Crouse, 2016).

    Parameters
    ----------
    cost : Tensor, shape (..., n, m) with n <= m
        Finite costs; leading dimensions index independent problems, solved in a loop.

    Returns
    -------
    Tensor, shape (..., n), int64
        Column assigned to each row, on cost's device. Solved on the host in float64: a host
        round trip for GPU tensors (the documented exception).
    """
    check_tensor("cost", cost, min_dim=2)
    batch_shape, (n, m) = cost.shape[:-2], cost.shape[-2:]
    if n > m:
        raise ValueError(
            f"assignment needs n <= m (each row its own column), got cost of shape "
            f"{tuple(cost.shape)}; use emd for n > m"
        )
    columns = assignment_scipy(cost.reshape(-1, n, m))
    return columns.reshape(*batch_shape, n)
