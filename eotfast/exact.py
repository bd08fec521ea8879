"""Exact optimal transport: POT's network simplex (emd) and the linear assignment problem.

``emd`` runs on the host in float64 (eotfast.ops.host): for GPU tensors it copies the cost to
the host and the plan back, the documented exception to eotfast's no-host-round-trip rule.
``assignment`` runs the auction (eotfast.assignment) on the cost's device.
"""

from __future__ import annotations

import torch

from eotfast._validation import check_iteration_limit, check_tensor, values_checkable
from eotfast.assignment import auction
from eotfast.ops.common import broadcast_marginal
from eotfast.ops.host import emd_pot

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
