"""Entropic OT and the debiased Sinkhorn divergence between point clouds, as a differentiable
loss with envelope-theorem gradients."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from eotfast._validation import (
    check_epsilon_range,
    check_marginal_values,
    check_reach,
    check_sinkhorn_options,
    point_batches,
)
from eotfast.ops import solve
from eotfast.ops.common import SOLVER_DTYPES, broadcast_marginal, epsilon_from_reg
from eotfast.ops.registry import resolve_backend

__all__ = ["SinkhornDivergence", "sinkhorn_divergence"]


class SinkhornDivergence(NamedTuple):
    """Output of :func:`sinkhorn_divergence` with ``return_result=True``; leading dimensions
    are the batch's (none for one problem)."""

    value: torch.Tensor  # [*batch] the loss, differentiable in x, y, a and b
    # [*batch, n] and [*batch, m] dual potentials in GeomLoss's convention (plan
    # a_i b_j exp((f_i + g_j - C_ij) / epsilon)); debiased, f = F_ab - F_aa and g = G_ab - G_bb,
    # which for balanced problems are the gradients in a and b up to a constant
    f: torch.Tensor
    g: torch.Tensor
    epsilon: torch.Tensor  # [*batch] absolute epsilon of every solve
    n_iter: torch.Tensor  # [*batch] int64, the most iterations among its solves
    marginal_error: torch.Tensor  # [*batch] the largest marginal error among its solves
    plan: torch.Tensor | None  # [*batch, n, m] the plan of OT(a, b), with return_plan


def sinkhorn_divergence(
    x: torch.Tensor,
    y: torch.Tensor,
    a: torch.Tensor | None = None,
    b: torch.Tensor | None = None,
    *,
    reg: float = 0.05,
    relative_reg: bool = True,
    reach: float | None = None,
    debias: bool = True,
    batch_dims: int = 0,
    tol: float = 1e-3,
    max_iter: int = 1000,
    scaling: float | None = 0.5,
    relaxation: float | None = None,
    backend: str = "auto",
    return_result: bool = False,
    return_plan: bool = False,
) -> torch.Tensor | SinkhornDivergence:
    r"""Debiased Sinkhorn divergence (or entropic OT) of the squared Euclidean cost, a loss.

    .. math::
        S_\varepsilon(a, x; b, y) = \mathrm{OT}_\varepsilon(a, b)
            - \tfrac12 \mathrm{OT}_\varepsilon(a, a) - \tfrac12 \mathrm{OT}_\varepsilon(b, b)
            + \tfrac{\varepsilon}{2} (m_a - m_b)^2,
        \quad
        \mathrm{OT}_\varepsilon(a, b) = \min_{P \ge 0} \langle P, C \rangle
            + \varepsilon \mathrm{KL}(P \,|\, a \otimes b)
            + \rho \mathrm{KL}(P 1 \,|\, a) + \rho \mathrm{KL}(P^\top 1 \,|\, b)

    with C_ij = ||x_i - y_j||^2, KL(p | q) = sum p log(p / q) - p + q, m_a and m_b the total
    masses, and the marginal constraints P 1 = a, P^T 1 = b in place of the rho terms when
    balanced (``reach=None``; the mass term is then 0). S is >= 0, 0 when (a, x) = (b, y), and
    interpolates between OT (epsilon -> 0) and an MMD (epsilon -> inf) (Feydy et al., AISTATS
    2019; Séjourné et al., 2019 for the unbalanced case). ``debias=False`` gives
    OT_epsilon(a, b) alone.

    Each OT value is the dual objective
    <a, phi(F)> + <b, phi(G)> - epsilon (<a (x) b, exp((F + G - C) / epsilon)> - m_a m_b),
    phi(F) = F (balanced) or rho (1 - exp(-F / rho)), at the potentials that
    :func:`eotfast.sinkhorn` reaches (to ``tol``) followed by one exact update of F (GeomLoss's
    extrapolation): a lower bound of OT, exact at convergence. The self terms use symmetric
    potentials. The three solves run as one batched call when n = m (else one per shape), each
    problem stopping on its own, with no host sync.

    Gradients (envelope theorem): the solve runs without autograd, and the backward pass
    scales gradients formed from the final plan, dS/dx_i = 2 sum_j P_ij (x_i - y_j) - (the
    same for the self term), dS/da_i = phi(F_i) - epsilon (...) (see the code), so memory
    does not grow with the iterations: the cost matrices (overwritten by the plans; one more
    while they are formed), O(n + m) per problem and the gradients. Not twice differentiable.

    Parameters
    ----------
    x : Tensor, shape (*batch, n, *features)
        Source points; features flattened into d (the input contract of :func:`eotfast.pair`).
    y : Tensor, shape (*batch, m, *features)
        Target points, same feature shape; batch dimensions broadcast against x's.
    a, b : Tensor, shape (n,) / (*batch, n) and (m,) / (*batch, m), optional
        Nonnegative weights with positive mass (equal masses when balanced); uniform 1/n and
        1/m when omitted. Gradients in a or b are defined where the weight is > 0 (NaN in b's
        where b_j = 0: that column's potential is not formed).
    reg : float
        Entropic regularization: epsilon = reg * std(C_xy) per problem (``relative_reg``,
        default), or epsilon = reg; the same epsilon for the three solves. GeomLoss's
        ``blur`` is epsilon = blur^2 for its cost |x - y|^2 / 2 (see
        :class:`eotfast.integrations.geomloss.SamplesLoss`).
    relative_reg : bool
        See ``reg``.
    reach : float or None
        rho > 0 of unbalanced OT, in cost units (see :func:`eotfast.sinkhorn`); None: balanced.
    debias : bool
        S_epsilon (True) or OT_epsilon(a, b) alone (False).
    batch_dims : int
        Leading dimensions that index independent problems (as in :func:`eotfast.pair`).
    tol, max_iter, scaling, relaxation, backend
        As in :func:`eotfast.sinkhorn`; ``tol`` bounds each solve's marginal error (1e-3 by
        default: gradients within ~1e-3 of the converged ones, relative; bench/README.md).
    return_result : bool
        Return a :class:`SinkhornDivergence` (value, potentials, epsilon, iterations, error)
        instead of the value alone.
    return_plan : bool
        With ``return_result``: also the plan of OT(a, b), [*batch, n, m].

    Returns
    -------
    Tensor, shape (*batch,)
        The loss per problem, in the solve dtype (float32 for half inputs); or a
        :class:`SinkhornDivergence`.

    Examples
    --------
    >>> x = torch.randn(500, 3, requires_grad=True)
    >>> y = torch.randn(400, 3) + 1
    >>> loss = sinkhorn_divergence(x, y, reg=0.01, relative_reg=False)
    >>> loss.backward()  # x.grad: [500, 3]
    """
    x, y = point_batches(x, y, batch_dims)  # [*batch, n, d], [*batch, m, d]
    batch_shape = torch.broadcast_shapes(x.shape[:-2], y.shape[:-2])
    (n, d), m = x.shape[-2:], y.shape[-2]
    reg = check_sinkhorn_options(reg, max_iter, tol, scaling, relaxation)
    rho = check_reach(reach)
    for name, flag in (("debias", debias), ("relative_reg", relative_reg)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be a bool, got {flag!r}")
    backend = resolve_backend(backend, x.device, unbalanced=not math.isinf(rho))
    dtype = x.dtype if x.dtype in SOLVER_DTYPES else torch.float32
    x, y = x.to(dtype), y.to(dtype)
    a = broadcast_marginal("a", a, batch_shape, n, x, dtype=x.dtype)  # [B, n], differentiable
    b = broadcast_marginal("b", b, batch_shape, m, x, dtype=x.dtype)  # [B, m]
    check_marginal_values(a.detach(), b.detach(), equal_mass=math.isinf(rho))
    x = x.expand(*batch_shape, n, d).reshape(-1, n, d)  # [B, n, d]
    y = y.expand(*batch_shape, m, d).reshape(-1, m, d)  # [B, m, d]
    value, f, g, epsilon, n_iter, error, plan = _SinkhornDivergenceFunction.apply(
        x, y, a, b, reg, relative_reg, rho, debias, tol, max_iter, scaling, relaxation,
        backend, return_plan,
    )  # fmt: skip
    value = value.reshape(batch_shape)
    if not return_result:
        return value
    return SinkhornDivergence(
        value=value,
        f=f.reshape(*batch_shape, n),
        g=g.reshape(*batch_shape, m),
        epsilon=epsilon.reshape(batch_shape),
        n_iter=n_iter.reshape(batch_shape),
        marginal_error=error.reshape(batch_shape),
        plan=plan.reshape(*batch_shape, n, m) if return_plan else None,
    )


class _SinkhornDivergenceFunction(torch.autograd.Function):
    """value [B] of x [B, n, d], y [B, m, d], a [B, n], b [B, m]: the gradients are formed in
    the forward pass, from the plans, while the cost buffers hold them; backward scales them."""

    @staticmethod
    def forward(
        ctx, x, y, a, b, reg, relative_reg, rho, debias, tol, max_iter, scaling, relaxation,
        backend, return_plan,
    ):  # fmt: skip
        need = tuple(t.requires_grad for t in (x, y, a, b))
        with torch.no_grad():
            out = _divergence_no_grad(
                x, y, a, b, reg=reg, relative_reg=relative_reg, rho=rho, debias=debias,
                tol=tol, max_iter=max_iter, scaling=scaling, relaxation=relaxation,
                backend=backend, need_grad=need, return_plan=return_plan,
            )  # fmt: skip
        value, f, g, epsilon, n_iter, error, plan, grads = out
        ctx.save_for_backward(*grads)
        ctx.mark_non_differentiable(f, g, epsilon, n_iter, error, plan)
        return value, f, g, epsilon, n_iter, error, plan

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_value, *unused):
        grads = ctx.saved_tensors
        scale = [grad_value[:, None, None], grad_value[:, None, None], grad_value[:, None]]
        scale.append(scale[2])
        out = [None if t.numel() == 0 else t * s for t, s in zip(grads, scale, strict=True)]
        return (*out, *([None] * 10))


def _divergence_no_grad(
    x, y, a, b, *, reg, relative_reg, rho, debias, tol, max_iter, scaling, relaxation, backend,
    need_grad, return_plan,
):  # fmt: skip
    """The value and, for each of x, y, a, b flagged in ``need_grad``, its gradient (empty
    tensors for the others), from one batched solve of the (up to) three problems."""
    batch, n, m = x.shape[0], x.shape[1], y.shape[1]
    problems = [(x, y, a, b)]  # OT(a, b), then the self terms OT(a, a), OT(b, b)
    if debias:
        problems += [(x, x, a, a), (y, y, b, b)]
    options = dict(
        backend=backend, max_iter=max_iter, tol=tol, scaling=scaling, relaxation=relaxation,
        reach=rho, overwrite_cost=True,
    )  # fmt: skip
    if len(problems) == 3 and n == m:
        # One batched solve of the three problems, their costs side by side in one buffer
        # (each formed, then copied in: stacking the points instead copied 6 n d floats,
        # 65 ms of 420 at n = 1024, d = 3072).
        cost = x.new_empty(3 * batch, n, n)
        for k, (p, q, _, _) in enumerate(problems):
            cost[k * batch : (k + 1) * batch] = solve.cost_matrix(p, q, backend=backend)
        epsilon = epsilon_from_reg(cost[:batch], reg, relative_reg)  # [B]
        check_epsilon_range(epsilon, reg, relative_reg)
        result, cost, offset = solve.sinkhorn(
            cost, torch.cat([a, a, b]).detach(), torch.cat([b, a, b]).detach(),
            epsilon=epsilon.repeat(3), **options,
        )  # fmt: skip
        fields = (cost, result.f, result.g, offset, result.n_iter, result.marginal_error)
        parts = [
            tuple(t[k * batch : (k + 1) * batch] for t in fields) for k in range(3)
        ]  # (cost, f, g, offset, n_iter, error) of each problem
    else:
        parts = []
        for k, (p, q, source, target) in enumerate(problems):
            cost = solve.cost_matrix(p, q, backend=backend)
            if k == 0:
                epsilon = epsilon_from_reg(cost, reg, relative_reg)  # [B]
                check_epsilon_range(epsilon, reg, relative_reg)
            result, cost, offset = solve.sinkhorn(
                cost, source.detach(), target.detach(), epsilon=epsilon, **options
            )
            parts.append((cost, result.f, result.g, offset, result.n_iter, result.marginal_error))
    a, b = a.detach(), b.detach()
    mass_a, mass_b = a.sum(1), b.sum(1)  # [B]

    # OT(a, b): F by one exact update from g; the plan written over the cost.
    cost, f_ab, g_ab, offset, n_iter, error = parts[0]
    plan_ab, big_f, ratio_ab = _plan_from_column_potential(cost, g_ab, a, epsilon, rho)
    col_mass = plan_ab.sum(1)  # [B, m]
    big_g = torch.where(b > 0, g_ab + offset[:, None] - epsilon[:, None] * b.log(), 0.0)
    value = _dual_value(a, b, big_f, big_g, plan_ab.sum((1, 2)), epsilon, rho)
    grad_a = _phi(big_f, rho) - epsilon[:, None] * (ratio_ab - mass_b[:, None])
    grad_b = _phi(big_g, rho) - epsilon[:, None] * (col_mass / b - mass_a[:, None])
    # dOT/dx_i = 2 sum_j P_ij (x_i - y_j) = 2 (r_i x_i - (P y)_i): one [B, n, d] buffer each,
    # the products accumulated into it (baddbmm_, addcmul_) rather than formed beside it.
    grad_x = grad_y = None
    if need_grad[0]:
        grad_x = (2 * x * (ratio_ab * a)[..., None]).baddbmm_(plan_ab, y, alpha=-2)
    if need_grad[1]:
        grad_y = (2 * y * col_mass[..., None]).baddbmm_(plan_ab.mT, x, alpha=-2)
    f_out, g_out = big_f, big_g
    if debias:
        for k, points, weights, mass in ((1, x, a, mass_a), (2, y, b, mass_b)):
            cost, f, g, offset, iters, err = parts[k]
            plan, big_h, weight_ratio = _symmetric_plan(cost, f, g, offset, weights, epsilon, rho)
            self_value = 2 * (weights * _phi(big_h, rho)).sum(1) - epsilon * (
                plan.sum((1, 2)) - mass * mass
            )
            value = value - self_value / 2
            # Half of d OT(a, a): the points and the weights sit on both sides of the plan.
            grad_weights = _phi(big_h, rho) - epsilon[:, None] * (weight_ratio - mass[:, None])
            grad = grad_x if k == 1 else grad_y
            if grad is not None:  # minus 2 (r_i x_i - (P x)_i), P symmetric
                grad.addcmul_(points, plan.sum(2)[..., None], value=-2)
                grad.baddbmm_(plan, points, alpha=2)
            if k == 1:
                f_out, grad_a = f_out - big_h, grad_a - grad_weights
            else:
                g_out, grad_b = g_out - big_h, grad_b - grad_weights
            n_iter, error = torch.maximum(n_iter, iters), torch.maximum(error, err)
        mass_gap = mass_a - mass_b
        value = value + epsilon / 2 * mass_gap * mass_gap
        grad_a = grad_a + (epsilon * mass_gap)[:, None]
        grad_b = grad_b - (epsilon * mass_gap)[:, None]
    # Autograd's saved tensors and outputs must be tensors: an empty one stands for "none".
    grads = tuple(
        grad if needed else x.new_empty(0)
        for grad, needed in zip((grad_x, grad_y, grad_a, grad_b), need_grad, strict=True)
    )
    plan_out = plan_ab if return_plan else x.new_empty(0)
    return value, f_out, g_out, epsilon, n_iter, error, plan_out, grads


def _phi(potential: torch.Tensor, rho: float) -> torch.Tensor:
    """The dual's marginal term: F when balanced, rho (1 - exp(-F / rho)) when unbalanced."""
    if math.isinf(rho):
        return potential
    return -rho * torch.expm1(-potential / rho)


def _damping(epsilon: torch.Tensor, rho: float) -> torch.Tensor:
    return 1 / (1 + epsilon / rho)  # [B]; 1 when balanced


def _dual_value(a, b, big_f, big_g, plan_mass, epsilon, rho) -> torch.Tensor:
    """<a, phi(F)> + <b, phi(G)> - epsilon (mass(P) - m_a m_b), [B] (zero weights add 0)."""
    terms = (a * _phi(big_f, rho)).sum(1) + torch.where(b > 0, b * _phi(big_g, rho), 0.0).sum(1)
    return terms - epsilon * (plan_mass - a.sum(1) * b.sum(1))


def _row_transform_in_place(cost, column_potential, epsilon):
    """Overwrites cost [B, n, m] (shifted like column_potential [B, m]) with
    E_ij = exp((g_j - C_ij) / epsilon - M_i), M_i its row maximum; returns (E, T, s) where
    T_i = -epsilon LSE_j((g_j - C_ij) / epsilon) is the c-transform (the exact balanced update
    of F) and s_i = sum_j E_ij."""
    eps = epsilon[:, None, None]
    z = cost.sub_(column_potential[:, None, :]).div_(-eps)  # (g_j - C_ij) / epsilon
    row_max = z.amax(dim=2)  # [B, n]
    e = z.sub_(row_max[..., None]).exp_()
    row_sum = e.sum(dim=2)
    transform = -epsilon[:, None] * (row_max + row_sum.log())
    return e, transform, row_sum


def _plan_from_column_potential(cost, g, a, epsilon, rho):
    """The plan of (F, g), F = damping x the c-transform of g (one exact update), written over
    cost [B, n, m]: returns (plan, F [B, n] in GeomLoss's convention, ratio [B, n]) with
    ratio_i = sum_j b_j exp((F_i + G_j - C_ij) / epsilon) (1 when balanced; the plan's rows
    are a * ratio)."""
    e, transform, row_sum = _row_transform_in_place(cost, g, epsilon)
    big_f = _damping(epsilon, rho)[:, None] * transform
    ratio = torch.exp((big_f - transform) / epsilon[:, None])
    plan = e.mul_((a * ratio / row_sum)[..., None])
    return plan, big_f, ratio


def _symmetric_plan(cost, f, g, offset, weights, epsilon, rho):
    """The symmetric plan of a self problem (OT(a, a)), written over its shifted cost: the
    solver's f and g averaged into one potential (the optimum is symmetric; GeomLoss does the
    same), then one exact update F; plan_ij = a_i a_j exp((F_i + F_j - C_ij) / epsilon).
    Returns (plan, F [B, n], ratio [B, n] = sum_j a_j exp((F_i + F_j - C_ij) / epsilon))."""
    eps = epsilon[:, None]
    h = (f + g + offset[:, None]) / 2  # [B, n] unshifted, in the solver's convention
    e, transform, row_sum = _row_transform_in_place(cost, h - offset[:, None], epsilon)
    big_f = _damping(epsilon, rho)[:, None] * transform
    # Column factor a_j exp(F_j / epsilon) / exp(h_j / epsilon): 0 where a_j = 0 (h = -inf).
    column = torch.where(weights > 0, torch.exp((big_f + eps * weights.log() - h) / eps), 0.0)
    e.mul_(column[:, None, :])
    row_factor = torch.exp((big_f - transform) / eps) / row_sum
    ratio = row_factor * e.sum(dim=2)
    plan = e.mul_((weights * row_factor)[..., None])
    return plan, big_f, ratio
