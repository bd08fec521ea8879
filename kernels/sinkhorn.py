"""Triton kernels: batched log-domain Sinkhorn with per-problem stopping decided on the device.

Iterates as POT's ``ot.bregman.sinkhorn_log`` and the torch reference
:func:`eotfast.sinkhorn.sinkhorn_reference`: from f = 0,
``g_j = eps (log b_j - LSE_i((f_i - C_ij) / eps))`` then
``f_i = eps (log a_i - LSE_j((g_j - C_ij) / eps))``; a problem stops once
``||P^T 1 - b||_2 < tol`` for P = exp((f + g - C) / eps) (rows exact after the f update).

The error costs no extra sweep: the column log-sum-exp that updates g also gives the column
masses of the current plan, ``exp(g_j / eps + LSE_i((f_i - C_ij) / eps))``. So each round
starts with the column sweep, reads the error of the plan of the previous round, and only
then commits the new g (kept in ``g_next`` until the verdict) and sweeps the rows.

Two paths, same math:
- ``sinkhorn_log_persistent``: one launch, one program per problem, every iteration inside
  the kernel. No launch overhead and CUDA-graph / torch.compile friendly; a problem uses one
  SM, so it suits batches and small problems.
- ``sinkhorn_log_tiled``: a problem is spread over row blocks and column blocks, three
  launches per iteration (column sweep, per-problem check, row sweep); finished problems
  return at once from every kernel. The host launches max_iter iterations and never reads a
  value back.

Tests: tests/test_triton.py (against POT and the torch reference, under TRITON_INTERPRET=1 on
the CPU); bench: bench/bench_sinkhorn.py.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from eotfast.kernels._launch import launch
from eotfast.kernels._tiles import load_cost_tile

LOG2E = 1.4426950408889634  # exp(x) = exp2(x * log2(e)): exp2 is the GPU's native exponent
LN2 = 0.6931471805599453


@triton.jit
def _online_logsumexp_step(running_max, running_sum, z, AXIS: tl.constexpr):
    """One block of an online log-sum-exp in base 2 along AXIS (z = -inf where masked)."""
    new_max = tl.maximum(running_max, tl.max(z, axis=AXIS))
    safe_max = tl.where(new_max == float("-inf"), 0.0, new_max)  # all masked so far
    if AXIS == 0:
        block_sum = tl.sum(tl.exp2(z - safe_max[None, :]), axis=0)
    else:
        block_sum = tl.sum(tl.exp2(z - safe_max[:, None]), axis=1)
    running_sum = running_sum * tl.exp2(running_max - safe_max) + block_sum
    return new_max, running_sum


@triton.jit
def _column_logsumexp(
    cost_ptr, f_ptr, cols, col_mask, n, m, inv_eps2, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr
):
    """LSE_i((f_i - C_ij) / eps) for a block of columns, in natural-log units [BLOCK_M]."""
    running_max = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    running_sum = tl.zeros((BLOCK_M,), tl.float32)
    for i0 in range(0, n, BLOCK_N):
        rows = i0 + tl.arange(0, BLOCK_N)
        row_mask = rows < n
        cost, mask = load_cost_tile(cost_ptr, rows, row_mask, cols, col_mask, m)
        f = tl.load(f_ptr + rows, mask=row_mask, other=0.0)
        z = tl.where(mask, (f[:, None] - cost) * inv_eps2, float("-inf"))  # base-2 units
        running_max, running_sum = _online_logsumexp_step(running_max, running_sum, z, 0)
    return (running_max + tl.log2(running_sum)) * LN2


@triton.jit
def _row_logsumexp(
    cost_ptr, g_ptr, rows, row_mask, m, inv_eps2, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr
):
    """LSE_j((g_j - C_ij) / eps) for a block of rows, in natural-log units [BLOCK_N]."""
    running_max = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    running_sum = tl.zeros((BLOCK_N,), tl.float32)
    for j0 in range(0, m, BLOCK_M):
        cols = j0 + tl.arange(0, BLOCK_M)
        col_mask = cols < m
        cost, mask = load_cost_tile(cost_ptr, rows, row_mask, cols, col_mask, m)
        g = tl.load(g_ptr + cols, mask=col_mask, other=0.0)
        z = tl.where(mask, (g[None, :] - cost) * inv_eps2, float("-inf"))
        running_max, running_sum = _online_logsumexp_step(running_max, running_sum, z, 1)
    return (running_max + tl.log2(running_sum)) * LN2


@triton.jit
def _column_update(
    cost_ptr,
    b_ptr,
    f_ptr,
    g_ptr,
    g_next_ptr,
    cols,
    n,
    m,
    eps,
    inv_eps2,
    BLOCK_N: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    """g_next for a block of columns; returns the block's sum of (column mass - b_j)^2 for
    the current plan (f, g)."""
    col_mask = cols < m
    lse = _column_logsumexp(cost_ptr, f_ptr, cols, col_mask, n, m, inv_eps2, BLOCK_N, BLOCK_M)
    b = tl.load(b_ptr + cols, mask=col_mask, other=1.0)
    g = tl.load(g_ptr + cols, mask=col_mask, other=0.0)
    mass = tl.exp2((g / eps + lse) * LOG2E)
    violation = tl.where(col_mask, (mass - b) * (mass - b), 0.0)
    tl.store(g_next_ptr + cols, eps * (tl.log(b) - lse), mask=col_mask)
    return tl.sum(violation, axis=0)


@triton.jit
def sinkhorn_log_persistent_kernel(
    cost_ptr, a_ptr, b_ptr, eps_ptr,          # [B, n, m], [B, n], [B, m], [B]
    f_ptr, g_ptr, g_next_ptr,                 # [B, n], [B, m], [B, m] (scratch)
    n_iter_ptr, error_ptr,                    # [B] int64, [B]
    n, m, max_iter, tol,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr,
):  # fmt: skip
    problem = tl.program_id(0).to(tl.int64)
    cost_ptr += problem * n * m
    a_ptr += problem * n
    f_ptr += problem * n
    b_ptr += problem * m
    g_ptr += problem * m
    g_next_ptr += problem * m
    eps = tl.load(eps_ptr + problem).to(tl.float32)
    inv_eps2 = LOG2E / eps

    for i0 in range(0, n, BLOCK_N):  # f = 0 (POT's start)
        rows = i0 + tl.arange(0, BLOCK_N)
        tl.store(f_ptr + rows, tl.zeros((BLOCK_N,), tl.float32), mask=rows < n)
    for j0 in range(0, m, BLOCK_M):
        cols = j0 + tl.arange(0, BLOCK_M)
        tl.store(g_ptr + cols, tl.zeros((BLOCK_M,), tl.float32), mask=cols < m)

    iteration = tl.full((), 0, tl.int32)
    error = tl.full((), float("inf"), tl.float32)
    proceed = iteration < max_iter
    while proceed:
        # Column sweep: g_next, and the error of the plan (f, g) of the previous round.
        squared = tl.zeros((), tl.float32)
        for j0 in range(0, m, BLOCK_M):
            cols = j0 + tl.arange(0, BLOCK_M)
            squared += _column_update(
                cost_ptr,
                b_ptr,
                f_ptr,
                g_ptr,
                g_next_ptr,
                cols,
                n,
                m,
                eps,
                inv_eps2,
                BLOCK_N,
                BLOCK_M,
            )
        error = tl.where(iteration > 0, tl.sqrt(squared), error)
        # NaN compares false: a problem that went NaN stops, and reports it.
        update = (error >= tol) & (iteration < max_iter)
        # Stores below are masked by "index < limit": limits 0 when the round is not kept.
        m_kept, n_kept = tl.where(update, m, 0), tl.where(update, n, 0)
        for j0 in range(0, m, BLOCK_M):
            cols = j0 + tl.arange(0, BLOCK_M)
            tl.store(
                g_ptr + cols, tl.load(g_next_ptr + cols, mask=cols < m_kept), mask=cols < m_kept
            )
        # Row sweep: f from the new g.
        for i0 in range(0, n, BLOCK_N):
            rows = i0 + tl.arange(0, BLOCK_N)
            row_mask = rows < n
            lse = _row_logsumexp(cost_ptr, g_ptr, rows, row_mask, m, inv_eps2, BLOCK_N, BLOCK_M)
            a = tl.load(a_ptr + rows, mask=row_mask, other=1.0)
            tl.store(f_ptr + rows, eps * (tl.log(a) - lse), mask=rows < n_kept)
        iteration += update.to(tl.int32)
        proceed = update
    tl.store(n_iter_ptr + problem, iteration.to(tl.int64))
    tl.store(error_ptr + problem, error)


@triton.jit
def sinkhorn_log_column_kernel(
    cost_ptr,
    b_ptr,
    f_ptr,
    g_ptr,
    g_next_ptr,
    eps_ptr,
    active_ptr,
    squared_ptr,
    n,
    m,
    BLOCK_N: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    """Tiled path, step 1 of a round: g_next for one column block; adds the block's squared
    marginal violation of the current plan to squared[problem]. Grid (column blocks, B)."""
    problem = tl.program_id(1).to(tl.int64)
    if tl.load(active_ptr + problem) == 0:
        return
    eps = tl.load(eps_ptr + problem).to(tl.float32)
    cols = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    squared = _column_update(
        cost_ptr + problem * n * m,
        b_ptr + problem * m,
        f_ptr + problem * n,
        g_ptr + problem * m,
        g_next_ptr + problem * m,
        cols,
        n,
        m,
        eps,
        LOG2E / eps,
        BLOCK_N,
        BLOCK_M,
    )
    tl.atomic_add(squared_ptr + problem, squared)


@triton.jit
def sinkhorn_log_check_kernel(
    g_ptr,
    g_next_ptr,
    active_ptr,
    squared_ptr,
    n_iter_ptr,
    error_ptr,
    m,
    max_iter,
    tol,
    BLOCK_M: tl.constexpr,
):
    """Tiled path, step 2: the verdict for one problem. Converged, diverged or out of
    iterations: the problem turns inactive, keeping (f, g). Otherwise g = g_next and the
    round counts. Grid (B,)."""
    problem = tl.program_id(0).to(tl.int64)
    if tl.load(active_ptr + problem) == 0:
        return
    iteration = tl.load(n_iter_ptr + problem)
    squared = tl.load(squared_ptr + problem)
    tl.store(squared_ptr + problem, 0.0)
    error = tl.where(iteration > 0, tl.sqrt(squared), float("inf"))
    tl.store(error_ptr + problem, error)
    if (error >= tol) & (iteration < max_iter):
        for j0 in range(0, m, BLOCK_M):
            cols = j0 + tl.arange(0, BLOCK_M)
            offsets = problem * m + cols
            tl.store(g_ptr + offsets, tl.load(g_next_ptr + offsets, mask=cols < m), mask=cols < m)
        tl.store(n_iter_ptr + problem, iteration + 1)
    else:
        tl.store(active_ptr + problem, 0)


@triton.jit
def sinkhorn_log_row_kernel(
    cost_ptr,
    a_ptr,
    f_ptr,
    g_ptr,
    eps_ptr,
    active_ptr,
    n,
    m,
    BLOCK_N: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    """Tiled path, step 3: f for one row block from the committed g. Grid (row blocks, B)."""
    problem = tl.program_id(1).to(tl.int64)
    if tl.load(active_ptr + problem) == 0:
        return
    eps = tl.load(eps_ptr + problem).to(tl.float32)
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < n
    lse = _row_logsumexp(
        cost_ptr + problem * n * m,
        g_ptr + problem * m,
        rows,
        row_mask,
        m,
        LOG2E / eps,
        BLOCK_N,
        BLOCK_M,
    )
    a = tl.load(a_ptr + problem * n + rows, mask=row_mask, other=1.0)
    tl.store(f_ptr + problem * n + rows, eps * (tl.log(a) - lse), mask=row_mask)


def _solution_buffers(cost: torch.Tensor):
    batch, n, m = cost.shape
    device = cost.device
    return (
        torch.zeros((batch, n), dtype=torch.float32, device=device),
        torch.zeros((batch, m), dtype=torch.float32, device=device),
        torch.empty((batch, m), dtype=torch.float32, device=device),
        torch.zeros((batch,), dtype=torch.int64, device=device),
        torch.full((batch,), float("inf"), dtype=torch.float32, device=device),
    )


def sinkhorn_log_persistent(
    cost, a, b, epsilon, max_iter: int, tol: float, *, block_n: int = 64, block_m: int = 64
):
    """[B, n, m] float32 problems, one program each, one launch. Returns (f, g, n_iter,
    marginal_error) as the torch reference does."""
    batch, n, m = cost.shape
    f, g, g_next, n_iter, error = _solution_buffers(cost)
    launch(sinkhorn_log_persistent_kernel, (batch,))(
        cost,
        a,
        b,
        epsilon,
        f,
        g,
        g_next,
        n_iter,
        error,
        n,
        m,
        max_iter,
        tol,
        BLOCK_N=block_n,
        BLOCK_M=block_m,
    )
    return f, g, n_iter, error


def sinkhorn_log_tiled(
    cost, a, b, epsilon, max_iter: int, tol: float, *, block_n: int = 64, block_m: int = 64
):
    """[B, n, m] float32 problems spread over row and column blocks: 3 launches per round,
    max_iter + 1 rounds (the last one only measures). Returns as the persistent path."""
    batch, n, m = cost.shape
    f, g, g_next, n_iter, error = _solution_buffers(cost)
    active = torch.ones((batch,), dtype=torch.int32, device=cost.device)
    squared = torch.zeros((batch,), dtype=torch.float32, device=cost.device)
    column_grid = (triton.cdiv(m, block_m), batch)
    row_grid = (triton.cdiv(n, block_n), batch)
    for _ in range(max_iter + 1):
        launch(sinkhorn_log_column_kernel, column_grid)(
            cost, b, f, g, g_next, epsilon, active, squared, n, m, BLOCK_N=block_n, BLOCK_M=block_m
        )
        launch(sinkhorn_log_check_kernel, (batch,))(
            g, g_next, active, squared, n_iter, error, m, max_iter, tol, BLOCK_M=block_m
        )
        launch(sinkhorn_log_row_kernel, row_grid)(
            cost, a, f, g, epsilon, active, n, m, BLOCK_N=block_n, BLOCK_M=block_m
        )
    return f, g, n_iter, error
