"""The exact solvers as ops: POT's network simplex and scipy's linear assignment, both on the
host in float64. For GPU tensors they copy the cost to the host and the result back: that
synchronization is the documented exception to eotfast's no-host-round-trip rule, the price
of exactness."""

from __future__ import annotations

import numpy as np
import ot
import scipy.optimize
import torch

from eotfast._validation import check_finite_values, check_marginal_values
from eotfast.ops.common import check_cost_batch

__all__ = ["assignment_scipy", "emd_pot"]


@torch.library.custom_op("eotfast::emd_pot", mutates_args=())
def emd_pot(cost: torch.Tensor, a: torch.Tensor, b: torch.Tensor, max_iter: int) -> torch.Tensor:
    """Exact plans of [B, n, m] problems by ``ot.emd``, one problem after another."""
    _check_emd_arguments(cost, a, b, max_iter)
    check_finite_values("cost", cost)
    check_marginal_values(a, b)
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


@emd_pot.register_fake
def _(cost, a, b, max_iter):
    _check_emd_arguments(cost, a, b, max_iter)
    return torch.empty_like(cost)


def _check_emd_arguments(cost, a, b, max_iter) -> None:
    """Shapes and devices: ot.emd answered a marginal of the wrong length with a bare
    AssertionError."""
    batch, n, m = check_cost_batch("emd_pot", cost)
    for name, marginal, size in (("a", a, n), ("b", b, m)):
        if tuple(marginal.shape) != (batch, size):
            raise ValueError(
                f"emd_pot: {name} must have shape {(batch, size)} for cost of shape "
                f"{tuple(cost.shape)}, got {tuple(marginal.shape)}"
            )
        if marginal.device != cost.device:
            raise ValueError(
                f"emd_pot: {name} is on {marginal.device} but cost is on {cost.device}"
            )
    if max_iter < 1:
        raise ValueError(f"emd_pot: max_iter must be >= 1, got {max_iter}")


@torch.library.custom_op("eotfast::assignment_scipy", mutates_args=())
def assignment_scipy(cost: torch.Tensor) -> torch.Tensor:
    """Optimal one-to-one assignment of [B, n, m] problems (n <= m) by scipy."""
    _check_assignment_arguments(cost)
    check_finite_values("cost", cost)
    cost_host = cost.detach().to("cpu", torch.float64).numpy()  # host round trip (documented)
    columns = np.empty(cost_host.shape[:2], dtype=np.int64)
    for k in range(cost_host.shape[0]):
        rows, columns[k] = scipy.optimize.linear_sum_assignment(cost_host[k])
    return torch.from_numpy(columns).to(cost.device)


@assignment_scipy.register_fake
def _(cost):
    _check_assignment_arguments(cost)
    return cost.new_empty(cost.shape[:2], dtype=torch.int64)


def _check_assignment_arguments(cost) -> None:
    """[B, n, m] with n <= m: scipy answered a 2-D cost or n > m with its own errors, or with
    an assignment of the columns instead of the rows."""
    batch, n, m = check_cost_batch("assignment_scipy", cost)
    if n > m:
        raise ValueError(
            f"assignment_scipy: cost [B, n, m] must have n <= m (each row gets its own column), "
            f"got {tuple(cost.shape)}; transpose it to assign the columns"
        )
