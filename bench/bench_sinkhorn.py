"""Sinkhorn to a fixed marginal error: eotfast's backends beside POT's sinkhorn_log.

Same work for every provider: one n x m problem from two image-like batches (d = 3072,
values in [-1, 1]), uniform marginals, epsilon = 0.05 * std(cost) passed to everyone as an
absolute value, stopping once ||P^T 1 - b||_2 < 1e-4 (POT's stopThr criterion; POT tests it
every 10 iterations, eotfast every iteration). Each case records the iterations and the
marginal error it reached, measured from its own plan here, beside its time.

    pytest bench/bench_sinkhorn.py --benchmark-columns=median,iqr,rounds
"""

import numpy as np
import ot
import pytest
import torch

import eotfast

N, D = 1024, 3072
RELATIVE_REG = 0.05
TOL = 1e-4
MAX_ITER = 10_000


@pytest.fixture(scope="module")
def problem():
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(N, D, generator=gen) * 2 - 1
    y = torch.rand(N, D, generator=gen) * 2 - 1 + 0.05
    cost = eotfast.cost_matrix(x, y)  # float32 [N, N]
    epsilon = float(RELATIVE_REG * cost.double().std(correction=0))
    return cost, epsilon


def column_error(plan, b):
    return float(np.linalg.norm(np.asarray(plan, dtype=np.float64).sum(0) - b))


def record(benchmark, plan, n_iter):
    error = column_error(plan, np.full(N, 1 / N))
    benchmark.extra_info.update(n=N, d=D, n_iter=int(n_iter), marginal_error=error)
    assert error < 1.05 * TOL, "the provider stopped before reaching the common tolerance"


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_sinkhorn_eotfast(benchmark, problem, backend):
    cost, epsilon = problem

    def solve():
        return eotfast.sinkhorn(
            cost, reg=epsilon, relative_reg=False, tol=TOL, max_iter=MAX_ITER, backend=backend
        )

    rounds = 10 if backend == "cpu" else 2
    result = benchmark.pedantic(solve, rounds=rounds, iterations=1, warmup_rounds=1)
    record(benchmark, result.plan(cost.double()).numpy(), result.n_iter)


def test_sinkhorn_pot_torch(benchmark, problem):
    cost, epsilon = problem
    uniform = torch.full((N,), 1 / N)

    def solve():
        return ot.bregman.sinkhorn_log(
            uniform, uniform, cost, epsilon, numItermax=MAX_ITER, stopThr=TOL, log=True
        )

    plan, log = benchmark.pedantic(solve, rounds=3, iterations=1, warmup_rounds=1)
    record(benchmark, plan.double().numpy(), log["niter"])


def test_sinkhorn_pot_numpy(benchmark, problem):
    cost, epsilon = problem
    uniform = np.full(N, 1 / N)
    cost_np = cost.double().numpy()  # POT's numpy backend works in float64

    def solve():
        return ot.bregman.sinkhorn_log(
            uniform, uniform, cost_np, epsilon, numItermax=MAX_ITER, stopThr=TOL, log=True
        )

    plan, log = benchmark.pedantic(solve, rounds=1, iterations=1)
    record(benchmark, plan, log["niter"])
