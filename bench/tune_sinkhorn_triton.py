"""Sweep of the Triton Sinkhorn launch settings on a GPU: programs per problem, warps per
program and block size, on image-like costs at epsilon = 0.05 * std(cost), tol = 1e-4.

    python bench/tune_sinkhorn_triton.py            # prints a table, one row per setting

Each row: iterations, reached marginal error, median time of a whole solve (one launch, CUDA
events through triton.testing.do_bench), time per iteration and nanoseconds per cost entry
per iteration (two sweeps over the cost each). The defaults of kernels/sinkhorn.py
(programs_per_problem, 64 x 64 blocks, 8 warps) come from this table and from the
register report of tests/test_triton_compile.py.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import torch
import triton.testing

sys.path.insert(0, str(Path(__file__).parent))
from _bench_utils import RELATIVE_REG, TOL, image_batches  # noqa: E402
from eotfast.kernels._launch import multiprocessor_count  # noqa: E402
from eotfast.kernels.sinkhorn import launch_sinkhorn, programs_per_problem  # noqa: E402

import eotfast  # noqa: E402,F401

CASES = [(256, 1), (1024, 1), (4096, 1), (64, 64), (1024, 8)]  # (n, batch)
BLOCKS = [(64, 64), (128, 64), (256, 64), (128, 32), (256, 32)]  # (BLOCK_N, BLOCK_M)
D = 3072


def main() -> None:
    device = torch.device("cuda")
    sms = multiprocessor_count(device)
    print(f"{torch.cuda.get_device_name()}: {sms} SMs; torch {torch.__version__}")
    header = "n     batch programs warps block  iters  error     total_ms  us/iter  ns/entry/iter"
    print(header)
    for n, batch in CASES:
        x, y = image_batches(n, D, batch)
        cost = eotfast.cost_matrix(x.to(device), y.to(device), batch_dims=1, backend="torch")
        cost = cost - cost.amin(dim=(-2, -1), keepdim=True)  # as sinkhorn() shifts it
        epsilon = RELATIVE_REG * cost.flatten(1).std(dim=1, correction=0)
        a = torch.full((batch, n), 1 / n, device=device)
        auto = programs_per_problem(batch, n, n, device, 64)
        for programs in sorted({1, auto, min(2 * auto, sms // batch)}):
            for warps in (4, 8):
                for block_n, block_m in BLOCKS:
                    solve = functools.partial(
                        launch_sinkhorn, cost, a, a, epsilon, 10_000, TOL, programs=programs,
                        block_n=block_n, block_m=block_m, num_warps=warps,
                    )  # fmt: skip
                    f, g, n_iter, error = solve()
                    milliseconds = triton.testing.do_bench(
                        solve, warmup=10, rep=100, return_mode="median"
                    )
                    iters = int(n_iter.max())
                    per_iter_us = 1e3 * milliseconds / max(iters, 1)
                    ns_entry = 1e3 * per_iter_us / (batch * n * n)
                    print(
                        f"{n:<5} {batch:<5} {programs:<8} {warps:<5} {block_n}x{block_m:<6} "
                        f"{iters:<6} {float(error.max()):<9.2e} {milliseconds:<9.3f} "
                        f"{per_iter_us:<8.2f} {ns_entry:.4f}",
                        flush=True,
                    )


if __name__ == "__main__":
    main()
