"""Triton kernel: batched squared Euclidean cost matrix ||x_i - y_j||^2 on tensor-core tiles.

Reference: :func:`eotfast.ops.torch_backend.cost_matrix` (GEMM form) and POT's ``ot.dist``;
test: tests/test_cost_matrix.py (backend "triton"); bench: bench/bench_cost_matrix.py.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from eotfast.kernels._launch import launch


@triton.jit
def cost_matrix_kernel(
    x_ptr, y_ptr, out_ptr,            # [B, n, d], [B, m, d] inputs; [B, n, m] float32 output
    n, m, d,
    stride_xb, stride_xn, stride_yb, stride_ym,  # the feature dimension is contiguous
    stride_ob, stride_on,             # the output's column dimension is contiguous
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,    # "ieee" for float32: TF32 would lose the small
                                      # differences of large norms (C = |x|^2 + |y|^2 - 2 x.y)
):  # fmt: skip
    # The batch on axis 0, which allows 2^31 - 1 programs (axes 1 and 2 stop at 65535).
    batch, pid_n, pid_m = tl.program_id(0).to(tl.int64), tl.program_id(1), tl.program_id(2)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask, col_mask = rows < n, cols < m
    ks = tl.arange(0, BLOCK_D)
    # Pointers advanced by BLOCK_D each step, as in Triton's matmul tutorial: rebuilding
    # base + k0 + ks every step kept one more 64-bit base alive across the loop, which ptxas
    # spilled and reloaded every step (sm_90, n and m not multiples of 16).
    x_ptrs = x_ptr + batch * stride_xb + rows[:, None].to(tl.int64) * stride_xn + ks[None, :]
    y_ptrs = y_ptr + batch * stride_yb + cols[:, None].to(tl.int64) * stride_ym + ks[None, :]

    dot = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    x_sq = tl.zeros((BLOCK_N,), dtype=tl.float32)
    y_sq = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for k0 in range(0, d, BLOCK_D):
        k_mask = (k0 + ks) < d
        x = tl.load(x_ptrs, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        y = tl.load(y_ptrs, mask=col_mask[:, None] & k_mask[None, :], other=0.0)
        dot = tl.dot(x, tl.trans(y), dot, input_precision=INPUT_PRECISION)  # fp32 accumulation
        x32, y32 = x.to(tl.float32), y.to(tl.float32)
        x_sq += tl.sum(x32 * x32, axis=1)
        y_sq += tl.sum(y32 * y32, axis=1)
        x_ptrs += BLOCK_D
        y_ptrs += BLOCK_D
    # Rounding can take the GEMM form slightly below zero for near-identical points.
    cost = tl.maximum(x_sq[:, None] + y_sq[None, :] - 2.0 * dot, 0.0)
    out = out_ptr + batch * stride_ob + rows[:, None].to(tl.int64) * stride_on + cols[None, :]
    tl.store(out, cost, mask=row_mask[:, None] & col_mask[None, :])


def launch_cost_matrix(
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    # 64 x 64 x 32: the tile of Triton's matmul tutorial, not tuned here (measured on an H100 at
    # n = 1024, d = 3072, float32 "ieee" dots: 0.70 ms, 9.2 TFLOP/s of the CUDA cores' ~67).
    block_n: int = 64,
    block_m: int = 64,
    block_d: int = 32,
    num_warps: int | None = None,
) -> torch.Tensor:
    """[B, n, d] x [B, m, d] (float32, float16 or bfloat16) -> [B, n, m] float32."""
    if x.dtype == torch.bfloat16 and x.device.type == "cpu":
        # Triton's interpreter (CPU tensors) reads bfloat16 as zeros (numpy has no bfloat16);
        # bfloat16 -> float32 is exact, so the result is the same. GPUs take bfloat16 as is.
        x, y = x.float(), y.float()
    x, y = x.contiguous(), y.contiguous()
    batch, n, d = x.shape
    m = y.shape[1]
    out = torch.empty((batch, n, m), dtype=torch.float32, device=x.device)
    if num_warps is None:
        num_warps = 4 if n % 16 == 0 and m % 16 == 0 else 8
    grid = (batch, triton.cdiv(n, block_n), triton.cdiv(m, block_m))
    launch(cost_matrix_kernel, grid, x.device)(
        x,
        y,
        out,
        n,
        m,
        d,
        x.stride(0),
        x.stride(1),
        y.stride(0),
        y.stride(1),
        out.stride(0),
        out.stride(1),
        BLOCK_N=block_n,
        BLOCK_M=block_m,
        BLOCK_D=block_d,
        INPUT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        # 4 warps where n and m are multiples of 16 (the JIT specializes on that): measured on
        # an H100 at n = 1024, d = 3072, float32, 0.70 ms against 1.13 ms with 8. Otherwise 8:
        # with 4, the masked loads need up to 255 registers and spill (16 bytes at n = 33,
        # m = 17, d = 70 on sm_90; tests/test_triton_compile.py).
        num_warps=num_warps,
    )
    return out
