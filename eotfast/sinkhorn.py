"""Log-domain Sinkhorn: the public function, its PyTorch reference, and the registered ops."""

from __future__ import annotations

from typing import NamedTuple

import torch

from eotfast._backends import require_cpu_extension, resolve_backend
from eotfast._validation import (
    check_finite_values,
    check_marginal_values,
    check_positive,
    check_same_device,
    check_tensor,
)

__all__ = ["SinkhornResult", "sinkhorn", "sinkhorn_reference", "epsilon_from_reg"]

_SOLVER_DTYPES = (torch.float32, torch.float64)


class SinkhornResult(NamedTuple):
    """Output of :func:`sinkhorn`; leading dimensions are those of the cost matrix.

    The plan is not stored (it is as large as the cost); :meth:`plan` and :meth:`log_plan`
    rebuild it from the potentials.
    """

    f: torch.Tensor  # [..., n] row (source) potential, in cost units
    g: torch.Tensor  # [..., m] column (target) potential, in cost units
    epsilon: torch.Tensor  # [...] absolute regularization used (reg * std(cost) by default)
    n_iter: torch.Tensor  # [...] int64, iterations done (g update + f update each)
    marginal_error: torch.Tensor  # [...] ||P^T 1 - b||_2 of the returned plan (rows exact)

    def log_plan(self, cost: torch.Tensor) -> torch.Tensor:
        """log P = (f_i + g_j - C_ij) / epsilon, shape [..., n, m]."""
        eps = self.epsilon[..., None, None]
        return (self.f[..., :, None] + self.g[..., None, :] - cost) / eps

    def plan(self, cost: torch.Tensor) -> torch.Tensor:
        """The transport plan P, shape [..., n, m]; rows sum to a, columns to b up to the error."""
        return self.log_plan(cost).exp()


def epsilon_from_reg(cost: torch.Tensor, reg: float, relative_reg: bool) -> torch.Tensor:
    """Absolute epsilon per problem, shape cost.shape[:-2].

    Relative (default): epsilon = reg * std(cost) over each problem's n x m entries, the
    convention of OTT-JAX. Raw image costs (d = 3072 and up) are in the thousands and tightly
    concentrated, so an absolute reg such as 0.05 is tiny next to their spread; measured here,
    that setting makes non-log Sinkhorn underflow to a uniform plan. A problem whose costs are
    all equal (std 0) gets epsilon = reg: every plan is optimal for it.
    """
    batch_shape = cost.shape[:-2]
    if not relative_reg:
        return torch.full(batch_shape, reg, dtype=cost.dtype, device=cost.device)
    std = cost.flatten(-2).std(dim=-1, correction=0)
    return reg * torch.where(std > 0, std, torch.ones_like(std))


def sinkhorn_reference(
    cost: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    epsilon: torch.Tensor,
    max_iter: int,
    tol: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pure-PyTorch log-domain Sinkhorn on [B, n, m] problems: the oracle of the other backends.

    Same iteration and stopping rule as the compiled kernels and as POT's ``sinkhorn_log``
    (g update, then f update; error ||P^T 1 - b||_2 after the f update). Each problem freezes
    once its error is below `tol`. On CPU tensors the loop also ends when all problems have
    stopped; on a GPU it runs `max_iter` iterations (frozen problems stay frozen), because
    ending early would need the host to read a device value.
    """
    batch, n, m = cost.shape
    eps = epsilon[:, None, None]
    log_a, log_b = a.log(), b.log()
    f = cost.new_zeros(batch, n)
    g = cost.new_zeros(batch, m)
    n_iter = torch.zeros(batch, dtype=torch.int64, device=cost.device)
    error = torch.full((batch,), float("inf"), dtype=cost.dtype, device=cost.device)
    active = torch.ones(batch, dtype=torch.bool, device=cost.device)
    for _ in range(max_iter):
        g_new = epsilon[:, None] * (log_b - torch.logsumexp((f[:, :, None] - cost) / eps, dim=1))
        g = torch.where(active[:, None], g_new, g)
        f_new = epsilon[:, None] * (log_a - torch.logsumexp((g[:, None, :] - cost) / eps, dim=2))
        f = torch.where(active[:, None], f_new, f)
        column_mass = torch.exp((f[:, :, None] + g[:, None, :] - cost) / eps).sum(dim=1)
        error = torch.where(active, torch.linalg.vector_norm(column_mass - b, dim=-1), error)
        n_iter += active
        active = active & ~(error < tol)
        if cost.device.type == "cpu" and not bool(active.any()):
            break
    return f, g, n_iter, error


def _empty_solution(cost, a, b, epsilon, max_iter, tol):
    batch, n, m = cost.shape
    return (
        cost.new_empty(batch, n),
        cost.new_empty(batch, m),
        cost.new_empty(batch, dtype=torch.int64),
        cost.new_empty(batch),
    )


def _check_solver_values(cost: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    # Inside the op, so that compiled callers get the same errors as eager ones.
    check_finite_values("cost", cost)
    check_marginal_values(a, b)


@torch.library.custom_op("eotfast::sinkhorn_torch", mutates_args=())
def sinkhorn_torch(
    cost: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    epsilon: torch.Tensor,
    max_iter: int,
    tol: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backend 'torch': :func:`sinkhorn_reference` as an op, opaque to torch.compile (tracing
    would unroll up to max_iter iterations into the graph)."""
    _check_solver_values(cost, a, b)
    return sinkhorn_reference(cost, a, b, epsilon, max_iter, tol)


@torch.library.custom_op("eotfast::sinkhorn_cpu", mutates_args=(), device_types="cpu")
def sinkhorn_cpu(
    cost: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    epsilon: torch.Tensor,
    max_iter: int,
    tol: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backend 'cpu': the C++ kernels of csrc/sinkhorn_cpu.cpp on contiguous [B, n, m] problems."""
    extension = require_cpu_extension()
    _check_solver_values(cost, a, b)
    cost, a, b, epsilon = (t.contiguous() for t in (cost, a, b, epsilon))
    f, g, n_iter, error = _empty_solution(cost, a, b, epsilon, max_iter, tol)
    batch, n, m = cost.shape
    solve = {
        torch.float32: extension.sinkhorn_log_float32,
        torch.float64: extension.sinkhorn_log_float64,
    }[cost.dtype]
    solve(
        cost.data_ptr(), a.data_ptr(), b.data_ptr(), epsilon.data_ptr(),
        f.data_ptr(), g.data_ptr(), n_iter.data_ptr(), error.data_ptr(),
        batch, n, m, max_iter, tol, torch.get_num_threads(),
    )  # fmt: skip
    return f, g, n_iter, error


sinkhorn_torch.register_fake(_empty_solution)
sinkhorn_cpu.register_fake(_empty_solution)

_SOLVER_OPS = {"torch": sinkhorn_torch, "cpu": sinkhorn_cpu}


def _solver(backend: str):
    """The solve function of a resolved backend; Triton is imported only when asked for."""
    if backend == "triton":
        from eotfast._triton_ops import solve_sinkhorn_triton

        return solve_sinkhorn_triton
    if backend == "cuda":
        from eotfast._cuda_ops import solve_sinkhorn_cuda

        return solve_sinkhorn_cuda
    return _SOLVER_OPS[backend]


def _broadcast_marginal(
    name: str, marginal: torch.Tensor | None, batch_shape: torch.Size, size: int, cost: torch.Tensor
) -> torch.Tensor:
    """The marginal as a [B, size] tensor of cost's dtype; uniform when None."""
    batch = batch_shape.numel()
    if marginal is None:
        return torch.full((batch, size), 1.0 / size, dtype=cost.dtype, device=cost.device)
    check_tensor(name, marginal, min_dim=1)
    check_same_device(cost=cost, **{name: marginal})
    if marginal.shape[-1] != size or marginal.shape[:-1] not in (torch.Size(), batch_shape):
        raise ValueError(
            f"{name} must have shape ({size},) or {(*batch_shape, size)} to match cost of shape "
            f"{(*batch_shape, *cost.shape[-2:])}, got {tuple(marginal.shape)}"
        )
    return marginal.to(cost.dtype).expand(*batch_shape, size).reshape(batch, size)


def sinkhorn(
    cost: torch.Tensor,
    a: torch.Tensor | None = None,
    b: torch.Tensor | None = None,
    *,
    reg: float = 0.05,
    relative_reg: bool = True,
    max_iter: int = 1000,
    tol: float = 1e-4,
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
        A problem stops once ||P^T 1 - b||_2 < tol (POT's ``stopThr`` criterion, tested every
        iteration here). 0 runs exactly ``max_iter`` iterations.
    backend : {"auto", "torch", "cpu", "triton", "cuda"}
        "cpu": the C++ kernels; "triton": the Triton kernels (CUDA tensors; CPU tensors only
        under ``TRITON_INTERPRET=1``); "cuda": the CUDA kernels of csrc/cuda (CUDA tensors);
        "torch": the PyTorch reference (any device); "auto": the fastest available for cost's
        device. "triton" and "cuda" solve in float32.

    Returns
    -------
    SinkhornResult
        Potentials f [..., n] and g [..., m], the epsilon used, iterations done and the
        marginal error reached, per problem. ``result.plan(cost)`` gives the plan. The solve
        is not differentiable: outputs carry no gradient (``result.plan(cost)`` does carry
        one through ``cost``, with the potentials held fixed).
    """
    result, _, offset = _sinkhorn_on_shifted_cost(
        cost, a, b, reg, relative_reg, max_iter, tol, backend
    )
    return result._replace(g=result.g + offset[..., None])


def _sinkhorn_on_shifted_cost(cost, a, b, reg, relative_reg, max_iter, tol, backend):
    """Solves on cost - min(cost) per problem; returns (result for the shifted cost, shifted
    cost, offset). The shift leaves the plan and f unchanged and lowers g by the offset
    (iterate by iterate, so POT's sequence is kept). It matters in float32: image costs sit
    around 2000, where a float32 step is 1.2e-4, so potentials of that size hold the marginal
    error above ~1e-4 at epsilon = 1e-3 * std; shifted, the potentials are ~20x smaller and the
    error goes below 1e-5 (measured, d = 3072, n = 64)."""
    check_tensor("cost", cost, min_dim=2)
    reg = check_positive("reg", reg)
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
        raise ValueError(f"max_iter must be an integer >= 1, got {max_iter!r}")
    if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not tol >= 0:
        raise ValueError(f"tol must be a number >= 0, got {tol!r}")
    # The solvers are not differentiable (no autograd formula is registered): work on detached
    # inputs, so the outputs say so instead of failing in backward.
    cost = cost.detach()
    if cost.dtype not in _SOLVER_DTYPES:
        cost = cost.float()
    backend = resolve_backend(backend, cost.device)
    batch_shape, (n, m) = cost.shape[:-2], cost.shape[-2:]
    a = _broadcast_marginal("a", a, batch_shape, n, cost).detach()  # [B, n]
    b = _broadcast_marginal("b", b, batch_shape, m, cost).detach()  # [B, m]
    epsilon = epsilon_from_reg(cost, reg, relative_reg)  # [...]
    offset = cost.amin(dim=(-2, -1))  # [...]
    shifted_cost = cost - offset[..., None, None]  # [..., n, m]
    f, g, n_iter, error = _solver(backend)(
        shifted_cost.reshape(-1, n, m), a, b, epsilon.reshape(-1), max_iter, float(tol)
    )
    result = SinkhornResult(
        f=f.reshape(*batch_shape, n),
        g=g.reshape(*batch_shape, m),
        epsilon=epsilon,
        n_iter=n_iter.reshape(batch_shape),
        marginal_error=error.reshape(batch_shape),
    )
    return result, shifted_cost, offset
