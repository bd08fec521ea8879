"""Exact optimal transport: POT's network simplex (emd) and the linear assignment problem.

Both solvers run on the host in float64. For GPU tensors these ops copy the cost to the host
and the result back: that synchronization is the documented exception to eotfast's
no-host-round-trip rule, the price of exactness. Prefer ``pair(method="sinkhorn")`` inside a
GPU training step.
"""

from __future__ import annotations

import numpy as np
import ot
import scipy.optimize
import torch

from eotfast._validation import check_finite_values, check_marginal_values, check_tensor
from eotfast.sinkhorn import _broadcast_marginal

__all__ = ["emd", "assignment"]


@torch.library.custom_op("eotfast::emd", mutates_args=())
def emd_op(cost: torch.Tensor, a: torch.Tensor, b: torch.Tensor, max_iter: int) -> torch.Tensor:
    """Exact plans of [B, n, m] problems by ``ot.emd``, one problem after another."""
    check_finite_values("cost", cost)
    check_marginal_values(a, b)
    # POT's network simplex runs on host float64 arrays: the documented host round trip.
    cost_host, a_host, b_host = (
        t.detach().to("cpu", torch.float64).numpy()  # host round trip (documented)
        for t in (cost, a, b)
    )
    plans = np.empty_like(cost_host)
    for k in range(cost_host.shape[0]):
        # ot.emd wants marginals of exactly equal mass; rescale b to a's float64 sum.
        b_k = b_host[k] * (a_host[k].sum() / b_host[k].sum())
        plans[k], log = ot.emd(a_host[k], b_k, cost_host[k], numItermax=max_iter, log=True)
        if log["result_code"] != 1:
            raise RuntimeError(
                f"ot.emd did not reach the optimum on problem {k} ({log['warning']}); "
                f"raise max_iter (now {max_iter})"
            )
    return torch.from_numpy(plans).to(device=cost.device, dtype=cost.dtype)


@emd_op.register_fake
def _(cost, a, b, max_iter):
    return torch.empty_like(cost)


@torch.library.custom_op("eotfast::assignment", mutates_args=())
def assignment_op(cost: torch.Tensor) -> torch.Tensor:
    """Optimal one-to-one assignment of [B, n, m] problems (n <= m) by scipy."""
    check_finite_values("cost", cost)
    cost_host = cost.detach().to("cpu", torch.float64).numpy()  # host round trip (documented)
    columns = np.empty(cost_host.shape[:2], dtype=np.int64)
    for k in range(cost_host.shape[0]):
        rows, columns[k] = scipy.optimize.linear_sum_assignment(cost_host[k])
    return torch.from_numpy(columns).to(cost.device)


@assignment_op.register_fake
def _(cost):
    return cost.new_empty(cost.shape[:2], dtype=torch.int64)


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
    batch_shape, (n, m) = cost.shape[:-2], cost.shape[-2:]
    a = _broadcast_marginal("a", a, batch_shape, n, cost)
    b = _broadcast_marginal("b", b, batch_shape, m, cost)
    plan = emd_op(cost.reshape(-1, n, m), a, b, max_iter)
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
    columns = assignment_op(cost.reshape(-1, n, m))
    return columns.reshape(*batch_shape, n)
