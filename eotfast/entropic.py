"""Entropic optimal transport by log-domain Sinkhorn: the public function (its ops live in
eotfast.ops)."""

from __future__ import annotations

import math

import torch

from eotfast._validation import (
    check_epsilon_range,
    check_finite_range,
    check_reach,
    check_sinkhorn_options,
    check_tensor,
)
from eotfast.ops import solve
from eotfast.ops.common import SOLVER_DTYPES, SinkhornResult, broadcast_marginal, epsilon_from_reg
from eotfast.ops.registry import resolve_backend

__all__ = ["SinkhornResult", "epsilon_from_reg", "sinkhorn"]


def sinkhorn(
    cost: torch.Tensor,
    a: torch.Tensor | None = None,
    b: torch.Tensor | None = None,
    *,
    reg: float = 0.05,
    relative_reg: bool = True,
    max_iter: int = 1000,
    tol: float = 1e-4,
    scaling: float | None = 0.5,
    relaxation: float | None = None,
    reach: float | None = None,
    backend: str = "auto",
) -> SinkhornResult:
    r"""Entropic optimal transport by log-domain Sinkhorn iterations.

    Solves, for each problem in the batch,

    .. math:: \min_{P \ge 0,\ P 1 = a,\ P^\top 1 = b}
              \langle P, C \rangle + \varepsilon \sum_{ij} P_{ij} (\log P_{ij} - 1)

    through its dual potentials: :math:`P_{ij} = \exp((f_i + g_j - C_{ij}) / \varepsilon)`,
    alternating :math:`g_j = \varepsilon (\log b_j - \mathrm{LSE}_i((f_i - C_{ij})/\varepsilon))`
    and :math:`f_i = \varepsilon (\log a_i - \mathrm{LSE}_j((g_j - C_{ij})/\varepsilon))`
    from f = 0, as POT's ``ot.bregman.sinkhorn_log`` (Peyré & Cuturi, *Computational Optimal
    Transport*, 2019, sec. 4.4). Working with log-sum-exp instead of the kernel exp(-C/eps)
    keeps small epsilon finite, where the kernel underflows.

    Parameters
    ----------
    cost : Tensor, shape (..., n, m)
        Finite costs; leading dimensions index independent problems. float32 or float64
        (float16 / bfloat16 are solved in float32).
    a : Tensor, shape (n,) or (..., n), optional
        Source marginal, nonnegative; uniform 1/n when omitted.
    b : Tensor, shape (m,) or (..., m), optional
        Target marginal with the same total mass as ``a``; uniform 1/m when omitted.
    reg : float
        Entropic regularization, > 0. Relative to std(cost) per problem unless
        ``relative_reg=False``, then the absolute epsilon (POT's ``reg``).
    relative_reg : bool
        See ``reg`` and :func:`epsilon_from_reg`.
    max_iter : int
        Most iterations per problem (>= 1).
    tol : float
        A problem stops once its marginal error sqrt(||P 1 - a||^2 + ||P^T 1 - b||^2) is below
        tol, tested after every iteration. POT's ``stopThr`` bounds the columns' term alone,
        the rows being exact after the f update; over-relaxation leaves both inexact, so both
        count here. It is a norm over all n + m entries, not per entry. 0 runs exactly
        ``max_iter`` iterations.
    scaling : float in (0, 1) or None
        Epsilon scaling: iteration k runs at max(epsilon, epsilon_start * scaling**k), from
        epsilon_start = the cost's range down to epsilon, carrying f and g over (Kosowsky &
        Yuille, 1994; Schmitzer, 2019); a problem may stop only at the target epsilon, so
        the fixed point is the same. If ``max_iter`` ends a run before the target is
        reached, its ``marginal_error`` is inf. None: the plain iteration from f = 0.
    relaxation : float in [1, 2) or None
        Over-relaxation w of every update at the target epsilon: g <- (1 - w) g + w G(f),
        then f <- (1 - w) f + w F(g) (Thibault et al., 2021; Lehmann et al., 2022). Same fixed
        point; 1 is the plain iteration; the marginal error then measures rows and columns.
        None: 1.9 with epsilon scaling, 1 without it (from f = 0 at the target epsilon,
        w >= 1.8 diverged to NaN on uniform-noise costs; after the annealing it did not).
    reach : float or None
        Unbalanced OT: rho > 0 in cost units (POT's ``reg_m``; GeomLoss's ``reach**p``). The
        marginal constraints become penalties, and the problem solved is
        min_P <P, C> + epsilon sum P (log P - 1) + rho KL(P 1 | a) + rho KL(P^T 1 | b),
        KL(p | q) = sum p log(p / q) - p + q (Chizat, Peyré, Schmitzer & Vialard, 2018): each
        update is the balanced one times rho / (rho + epsilon), a and b may differ in mass, and
        ``marginal_error`` measures the plan's marginals against the fixed point's, a e^(-f/rho)
        and b e^(-g/rho). The cost is not shifted then (offset 0). None: balanced. Backends
        "cpu" and "torch" ("auto" picks among them); the GPU kernels solve balanced problems
        only and refuse it.
    backend : {"auto", "torch", "cpu", "host", "triton", "cuda"}
        "cpu": the C++ kernels; "triton": the Triton kernels (CUDA tensors; CPU tensors only
        under ``TRITON_INTERPRET=1``); "cuda": the CUDA kernels of csrc/cuda (CUDA tensors);
        "torch": the PyTorch reference (any device), which "host" (devices without an eotfast
        kernel: MPS, XPU) runs too; "auto": the fastest available for cost's device.
        "triton" and "cuda" solve in float32.

    Returns
    -------
    SinkhornResult
        Potentials f [..., n] and g [..., m] (float64 whatever the cost's dtype: g holds
        the cost's minimum, which float32 would round), the epsilon used, iterations done
        and the marginal error reached, per problem. ``result.plan(cost)`` gives the plan. The solve
        is not differentiable: outputs carry no gradient (``result.plan(cost)`` does carry
        one through ``cost``, with the potentials held fixed).
    """
    check_tensor("cost", cost, min_dim=2)
    reg = check_sinkhorn_options(reg, max_iter, tol, scaling, relaxation)
    reach = check_reach(reach)
    # The solvers are not differentiable (no autograd formula is registered): work on detached
    # inputs, so the outputs say so instead of failing in backward.
    cost = cost.detach()
    if cost.dtype not in SOLVER_DTYPES:
        cost = cost.float()
    check_finite_range("cost", cost)
    backend = resolve_backend(backend, cost.device, unbalanced=not math.isinf(reach))
    batch_shape, (n, m) = cost.shape[:-2], cost.shape[-2:]
    a = broadcast_marginal("a", a, batch_shape, n, cost).detach()  # [B, n]
    b = broadcast_marginal("b", b, batch_shape, m, cost).detach()  # [B, m]
    epsilon = epsilon_from_reg(cost, reg, relative_reg)  # [...]
    check_epsilon_range(epsilon, reg, relative_reg)
    result, _, offset = solve.sinkhorn(
        cost, a, b, epsilon=epsilon, backend=backend, max_iter=max_iter, tol=tol,
        scaling=scaling, relaxation=relaxation, reach=reach,
    )  # fmt: skip
    # The solver worked on cost - min(cost); g takes the offset back. In float32 that sum
    # would round it away (at 1e5 a float32 step is 0.008; plan(cost) then missed the
    # marginals by 7% at epsilon ~0.014 while marginal_error said 2e-4), so the potentials
    # are float64: the plan formed from them is the plan that was solved.
    f = result.f.double()
    g = result.g.double() + offset.double()[..., None]
    return result._replace(f=f, g=g)
