"""assignment: exact one-to-one pairing of two equal-size batches (the optimal permutation).

Providers: eotfast.assignment (scipy's linear_sum_assignment behind a registered op, batched),
scipy's linear_sum_assignment called directly, and POT's exact plan (ot.emd) turned into a
permutation by row argmax. The cost matrix is computed once, outside the timing. Every
provider must return the same optimal total cost (checked).
"""

import numpy as np
import ot
import pytest
from _bench_utils import image_batches, record, size_params
from scipy.optimize import linear_sum_assignment

import eotfast

D = 3072
SIZES = [(64, 1), (256, 1), (1024, 1), (256, 8)]
HEAVY = [(4096, 1)]


@pytest.mark.parametrize("provider", ["eotfast", "scipy_lsa", "pot_emd"])
@pytest.mark.parametrize("n,batch", size_params(SIZES, HEAVY, keys=("n", "b")))
def test_assignment(benchmark, provider, n, batch):
    x, y = image_batches(n, D, batch)
    cost = eotfast.cost_matrix(x, y)  # [batch, n, n] float32
    cost64 = cost.double().numpy()
    uniform = np.full(n, 1 / n)

    if provider == "eotfast":

        def solve():
            return eotfast.assignment(cost).numpy()
    elif provider == "scipy_lsa":

        def solve():
            return np.stack([linear_sum_assignment(cost64[k])[1] for k in range(batch)])
    else:

        def solve():
            plans = [ot.emd(uniform, uniform, cost64[k], numItermax=10_000_000)
                     for k in range(batch)]  # fmt: skip
            return np.stack([p.argmax(1) for p in plans])

    columns = benchmark.pedantic(solve, rounds=1 if n >= 4096 else 3, iterations=1)
    totals = [cost64[k][np.arange(n), columns[k]].sum() for k in range(batch)]
    optimal = [cost64[k][linear_sum_assignment(cost64[k])].sum() for k in range(batch)]
    assert np.allclose(totals, optimal, rtol=1e-9), f"{provider} is not optimal"
    assert all(len(set(c.tolist())) == n for c in columns), f"{provider} is not a permutation"
    record(benchmark, "assignment", provider, n, D, batch, gap_closed=1.0, distinct_targets=1.0)
