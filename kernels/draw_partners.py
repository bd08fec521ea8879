"""Triton kernel: one partner per row drawn from a Sinkhorn plan, without forming the plan.

Row i of the plan is proportional to exp((g_j - C_ij) / epsilon) (f_i is constant on a row), so
a draw is the Gumbel-max argmax_j (g_j - C_ij) / epsilon - log(-log U_ij), and the most likely
partner the same argmax without noise. The kernel streams the row's cost tiles once and keeps
a running (max, argmax): no [n, m] buffer of weights or noise, unlike the torch path.

Uniforms come from Philox (``tl.rand``) keyed by a seed read from device memory, so a
``torch.Generator`` fixes the draws without the host reading anything.

Reference: :func:`eotfast.ops.torch_backend.draw_partners`; test:
tests/test_draw_partners.py; bench: bench/bench_pair.py (the pair call).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from eotfast.kernels._launch import launch
from eotfast.kernels._tiles import load_cost_tile


@triton.jit
def draw_partners_kernel(
    cost_ptr, g_ptr, epsilon_ptr, seed_ptr, out_ptr,   # [B, n, m], [B, m], [B], [1] int64, [B, n]
    n, m,
    SAMPLE: tl.constexpr,                          # Gumbel-max draw, else the row's argmax
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr,
):  # fmt: skip
    problem = tl.program_id(0).to(tl.int64)  # axis 0: up to 2^31 - 1 problems
    rows = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < n
    inv_epsilon = 1.0 / tl.load(epsilon_ptr + problem).to(tl.float32)
    cost_ptr += problem * n * m
    g_ptr += problem * m
    # Philox key per problem, counter per (row, column): independent draws everywhere. The
    # counter is int64 (tl.rand splits it into two 32-bit words): n * m passes 2^31 at
    # n = m = 46341.
    seed = tl.load(seed_ptr) + problem
    best = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    best_index = tl.zeros((BLOCK_N,), tl.int32)
    for j0 in range(0, m, BLOCK_M):
        cols = j0 + tl.arange(0, BLOCK_M)
        col_mask = cols < m
        cost, mask = load_cost_tile(cost_ptr, rows, row_mask, cols, col_mask, m)
        g = tl.load(g_ptr + cols, mask=col_mask, other=0.0)
        score = (g[None, :] - cost) * inv_epsilon
        if SAMPLE:
            uniform = tl.rand(seed, rows[:, None].to(tl.int64) * m + cols[None, :])
            # 1e-30 keeps log(0) out; -log(-log u) is then at most ~4.2 below the smallest
            # draw that can matter.
            score += -tl.log(-tl.log(tl.maximum(uniform, 1e-30)))
        score = tl.where(mask, score, float("-inf"))
        block_best = tl.max(score, axis=1)
        block_index = tl.argmax(score, axis=1).to(tl.int32) + j0
        better = block_best > best  # ties keep the first column, as torch.argmax
        best = tl.where(better, block_best, best)
        best_index = tl.where(better, block_index, best_index)
    tl.store(out_ptr + problem * n + rows, best_index.to(tl.int64), mask=row_mask)


def launch_draw_partners(
    cost: torch.Tensor,
    g: torch.Tensor,
    epsilon: torch.Tensor,
    seed: torch.Tensor,
    sample: bool,
    *,
    # 32 rows x 128 columns per tile: not tuned (one streaming pass over the cost; the draw is
    # < 0.01 ms of a pair call at n = 1024 by bench/README.md's estimate).
    block_n: int = 32,
    block_m: int = 128,
    num_warps: int = 8,
) -> torch.Tensor:
    """Partner index [B, n] (int64) for [B, n, m] float32 costs, potentials g [B, m] and
    epsilon [B]; ``seed`` is a one-element int64 device tensor."""
    batch, n, m = cost.shape
    out = torch.empty((batch, n), dtype=torch.int64, device=cost.device)
    launch(draw_partners_kernel, (batch, triton.cdiv(n, block_n)), cost.device)(
        cost, g, epsilon, seed, out, n, m, SAMPLE=sample, BLOCK_N=block_n, BLOCK_M=block_m,
        # 8 warps: with 4, Philox draws for a 32 x 128 tile with scalar loads (m not a multiple
        # of 16) need 255 registers and spill 344 bytes on sm_90 (tests/test_triton_compile.py).
        num_warps=num_warps,
    )  # fmt: skip
    return out
