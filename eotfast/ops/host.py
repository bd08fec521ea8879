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

__all__ = ["assignment_scipy", "emd_pot"]


@torch.library.custom_op("eotfast::emd_pot", mutates_args=())
def emd_pot(cost: torch.Tensor, a: torch.Tensor, b: torch.Tensor, max_iter: int) -> torch.Tensor:
    """Exact plans of [B, n, m] problems by ``ot.emd``, one problem after another."""
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
    return torch.empty_like(cost)


@torch.library.custom_op("eotfast::assignment_scipy", mutates_args=())
def assignment_scipy(cost: torch.Tensor) -> torch.Tensor:
    """Optimal one-to-one assignment of [B, n, m] problems (n <= m) by scipy."""
    check_finite_values("cost", cost)
    cost_host = cost.detach().to("cpu", torch.float64).numpy()  # host round trip (documented)
    columns = np.empty(cost_host.shape[:2], dtype=np.int64)
    for k in range(cost_host.shape[0]):
        rows, columns[k] = scipy.optimize.linear_sum_assignment(cost_host[k])
    return torch.from_numpy(columns).to(cost.device)


@assignment_scipy.register_fake
def _(cost):
    return cost.new_empty(cost.shape[:2], dtype=torch.int64)
