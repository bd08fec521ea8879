"""Exact optimal transport plans: POT's network simplex (emd).

``emd`` runs on the host in float64 (eotfast.ops.host): for GPU tensors it copies the cost to
the host and the plan back, the documented exception to eotfast's no-host-round-trip rule.
The exact assignment (a permutation, on the device) is eotfast.lap's.
"""

from __future__ import annotations

import torch

from eotfast._validation import check_iteration_limit, check_tensor
from eotfast.ops.common import broadcast_marginal
from eotfast.ops.host import emd_pot

__all__ = ["emd"]


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
    return exact_plan(cost, a, b, max_iter=max_iter)


def exact_plan(cost: torch.Tensor, a=None, b=None, *, max_iter: int = 1_000_000):
    """:func:`emd` on a checked cost [..., n, m] and float64 marginals a [B, n], b [B, m]
    (None: uniform)."""
    batch, (n, m) = cost.shape[:-2].numel(), cost.shape[-2:]
    if a is None:
        a = torch.full((batch, n), 1 / n, dtype=torch.float64, device=cost.device)
    if b is None:
        b = torch.full((batch, m), 1 / m, dtype=torch.float64, device=cost.device)
    # ot.emd answers "Problem infeasible" when every cost is negative (cost = -10 + rand failed
    # at every size): solve on cost - min(cost) per problem, which has the same optimal plans.
    cost64 = cost.detach().reshape(-1, n, m).to(torch.float64)
    cost64 = cost64 - cost64.amin(dim=(-2, -1), keepdim=True)
    plan = emd_pot(cost64, a, b, max_iter)
    return plan.to(cost.dtype).reshape(cost.shape)
