"""linear_sum_assignment: eotfast's, in scipy's contract, beside scipy's on the same input.

Both providers get the same float64 numpy cost (squared distances of image-like batches,
d = 3072, computed once outside the timing) and return numpy index arrays: `eotfast_cpu` is
``eotfast.linear_sum_assignment`` (the C++ auction on CPU tensors sharing the array's memory;
a batch in one call), `scipy_lsa` is ``scipy.optimize.linear_sum_assignment`` (one call per
problem). Both must reach scipy's optimal total: scipy exactly, eotfast within its documented
bound (1e-9 * n * F, F the largest entry of the cost minus each row's minimum). The eotfast
case records its speed-up over scipy's median on the same cost (`speedup_vs_scipy`).

    pytest bench/bench_linear_sum_assignment.py                 # n = 256, 1024; 256 x 8
    pytest bench/bench_linear_sum_assignment.py --bench-heavy   # + n = 4096 (scipy: seconds)
"""

import time

import numpy as np
import pytest
from _bench_utils import image_batches, median_s, record, size_params
from scipy.optimize import linear_sum_assignment as scipy_lsa

import eotfast

D = 3072
SIZES = [(256, 1), (1024, 1), (256, 8)]
HEAVY = [(4096, 1)]
# scipy's results and median per (n, batch), from its case (which runs first) or, when that
# case was not selected, from one timed call in eotfast's: the oracle and the speed-up's base.
_SCIPY = {}


def image_costs(n: int, batch: int) -> np.ndarray:
    """[batch, n, n] float64 squared distances between image-like batches."""
    x, y = image_batches(n, D, batch)
    return np.stack([eotfast.cost_matrix(x[k], y[k]).double().numpy() for k in range(batch)])


def solve_with_scipy(costs: np.ndarray) -> list:
    return [scipy_lsa(cost) for cost in costs]


def scipy_reference(costs: np.ndarray, n: int, batch: int) -> dict:
    if (n, batch) not in _SCIPY:
        start = time.perf_counter()
        pairs = solve_with_scipy(costs)
        _SCIPY[(n, batch)] = {"pairs": pairs, "median_s": time.perf_counter() - start}
    return _SCIPY[(n, batch)]


def guaranteed_excess(cost: np.ndarray) -> float:
    """eotfast's documented bound on one square problem, plus the float64 rounding of the
    sums (a few ulps of the largest entry per pair)."""
    n = cost.shape[0]
    largest = (cost - cost.min(axis=1, keepdims=True)).max()
    return 1e-9 * n * largest + 8 * n * np.finfo(np.float64).eps * np.abs(cost).max()


@pytest.mark.parametrize("provider", ["scipy_lsa", "eotfast_cpu"])
@pytest.mark.parametrize("n,batch", size_params(SIZES, HEAVY, keys=("n", "b")))
def test_linear_sum_assignment(benchmark, provider, n, batch):
    costs = image_costs(n, batch)
    if provider == "scipy_lsa":
        pairs = benchmark.pedantic(
            solve_with_scipy, (costs,), rounds=1 if n >= 4096 else 5, iterations=1
        )
        _SCIPY[(n, batch)] = {"pairs": pairs, "median_s": median_s(benchmark)}
        rows = np.stack([r for r, _ in pairs])
        cols = np.stack([c for _, c in pairs])
    else:
        problem = costs[0] if batch == 1 else costs  # scipy's 2-D form for one problem
        rows, cols = benchmark.pedantic(
            eotfast.linear_sum_assignment, (problem,), rounds=3 if n >= 4096 else 10,
            iterations=1, warmup_rounds=1,
        )  # fmt: skip
        rows, cols = rows.reshape(batch, -1), cols.reshape(batch, -1)
    reference = scipy_reference(costs, n, batch)
    excess = []
    for k in range(batch):
        assert rows[k].dtype == cols[k].dtype == np.int64
        assert np.array_equal(rows[k], np.arange(n)) and len(np.unique(cols[k])) == n
        optimal = costs[k][reference["pairs"][k]].sum()
        total = costs[k][rows[k], cols[k]].sum()
        bound = 0.0 if provider == "scipy_lsa" else guaranteed_excess(costs[k])
        assert optimal - 1e-9 * abs(optimal) <= total <= optimal + bound, (k, total, optimal)
        excess.append(float((total - optimal) / optimal))
    quality = {"gap_closed": 1.0, "distinct_targets": 1.0, "relative_excess": max(excess)}
    if provider == "eotfast_cpu":
        quality["scipy_median_s"] = reference["median_s"]
        quality["speedup_vs_scipy"] = reference["median_s"] / median_s(benchmark)
    record(benchmark, "linear_sum_assignment", provider, n, D, batch, **quality)
