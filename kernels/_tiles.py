"""Tile loads shared by the Triton kernels."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def load_cost_tile(cost_ptr, rows, row_mask, cols, col_mask, m):
    """Tile C[rows, cols] of a row-major [n, m] cost (0 where masked) and its mask."""
    mask = row_mask[:, None] & col_mask[None, :]
    cost = tl.load(cost_ptr + rows[:, None].to(tl.int64) * m + cols[None, :], mask=mask, other=0.0)
    return cost, mask
