"""Backend 'torch': the pure-PyTorch reference of every op, on any device; the oracle of the
other backends' tests and the fallback where no kernel runs."""

from __future__ import annotations

import torch

from eotfast.ops.common import check_solver_values, register_sinkhorn_op

__all__ = ["cost_matrix", "draw_from_log_weights", "draw_partners", "sinkhorn", "sinkhorn_torch"]


def cost_matrix(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """||x_i - y_j||^2 = |x_i|^2 + |y_j|^2 - 2 x_i.y_j through one matrix product (the GEMM
    form: cuBLAS / MKL), clamped at 0 where rounding makes it negative; [..., n, m] in the
    inputs' dtype, float32 for half inputs (their squared norms lose too many digits at image
    dimensions, d >= 3072)."""
    if x.dtype in (torch.float16, torch.bfloat16):
        x, y = x.float(), y.float()
    x_sq = x.square().sum(-1)  # [..., n]
    y_sq = y.square().sum(-1)  # [..., m]
    cross = x @ y.mT  # [..., n, m]
    return (x_sq[..., :, None] + y_sq[..., None, :] - 2 * cross).clamp_min_(0)


def sinkhorn_reference(cost, a, b, epsilon, max_iter: int, tol: float):
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
        # In float64: squared violations of a plan of total mass 1e30 overflow float32 (the error
        # read inf), those of mass 1e-30 underflow (it read 0).
        violation = torch.linalg.vector_norm((column_mass - b).double(), dim=-1).to(cost.dtype)
        error = torch.where(active, violation, error)
        n_iter += active
        active = active & ~(error < tol)
        if cost.device.type == "cpu" and not bool(active.any()):
            break
    return f, g, n_iter, error


def _sinkhorn_checked(cost, a, b, epsilon, max_iter, tol):
    check_solver_values(cost, a, b)
    return sinkhorn_reference(cost, a, b, epsilon, max_iter, tol)


# eotfast::sinkhorn_torch: the reference as an op.
sinkhorn_torch = register_sinkhorn_op("torch", _sinkhorn_checked)
sinkhorn = sinkhorn_torch


def draw_from_log_weights(
    log_weights: torch.Tensor, sampling: str, generator: torch.Generator | None
) -> torch.Tensor:
    """One column per row of [..., n, m] unnormalized log-weights: drawn with probability
    proportional to exp(log_weights) ("sample", by the Gumbel-max trick: argmax of
    log_weights + Gumbel noise), or the most likely one ("argmax")."""
    if sampling == "argmax":
        return log_weights.argmax(dim=-1)
    uniform = torch.rand(
        log_weights.shape, generator=generator, dtype=log_weights.dtype, device=log_weights.device
    )
    # Clamp keeps log(0) out: the smallest normal float still yields a finite Gumbel draw.
    gumbel = -torch.log(-torch.log(uniform.clamp_min(torch.finfo(uniform.dtype).tiny)))
    return (log_weights + gumbel).argmax(dim=-1)


def draw_partners(cost, g, epsilon, sampling: str, generator) -> torch.Tensor:
    """A partner per row of the plan exp((f_i + g_j - C_ij) / epsilon) of [B, n, m] problems:
    row i is proportional to exp((g_j - C_ij) / epsilon) (f_i is constant on a row)."""
    log_weights = (g[..., None, :] - cost) / epsilon[..., None, None]
    return draw_from_log_weights(log_weights, sampling, generator)
