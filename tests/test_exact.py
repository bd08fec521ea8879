"""eotfast.emd against ot.emd2, eotfast.assignment against scipy's linear_sum_assignment."""

import numpy as np
import ot
import pytest
import scipy.optimize
import torch

import eotfast


@pytest.mark.parametrize(
    "batch,n,m,uniform", [((), 20, 20, True), ((), 15, 25, False), ((3,), 10, 7, False)]
)
def test_emd_reaches_pot_optimal_cost(random_problem, batch, n, m, uniform):
    cost, a, b = random_problem(batch, n, m, dtype=torch.float64, uniform=uniform)
    plan = eotfast.emd(cost, a, b)
    assert plan.shape == cost.shape and plan.dtype == cost.dtype
    flat_cost, flat_plan = cost.reshape(-1, n, m), plan.reshape(-1, n, m)
    for k in range(flat_cost.shape[0]):
        a_k = np.full(n, 1 / n) if a is None else a.reshape(-1, n)[k].numpy()
        b_k = np.full(m, 1 / m) if b is None else b.reshape(-1, m)[k].numpy()
        expected = ot.emd2(a_k, b_k, flat_cost[k].numpy())
        assert (flat_plan[k] * flat_cost[k]).sum().item() == pytest.approx(expected, rel=1e-10)
        np.testing.assert_allclose(flat_plan[k].sum(1).numpy(), a_k, atol=1e-12)
        np.testing.assert_allclose(flat_plan[k].sum(0).numpy(), b_k, atol=1e-12)


@pytest.mark.parametrize("batch,n,m", [((), 30, 30), ((4,), 12, 12), ((), 10, 16)])
def test_assignment_reaches_scipy_optimal_cost(batch, n, m):
    cost = torch.rand(*batch, n, m, dtype=torch.float64)
    columns = eotfast.assignment(cost)
    assert columns.shape == (*batch, n) and columns.dtype == torch.int64
    flat_cost, flat_columns = cost.reshape(-1, n, m), columns.reshape(-1, n)
    for k in range(flat_cost.shape[0]):
        rows, cols = scipy.optimize.linear_sum_assignment(flat_cost[k].numpy())
        assert len(set(flat_columns[k].tolist())) == n  # one-to-one
        ours = flat_cost[k][torch.arange(n), flat_columns[k]].sum().item()
        assert ours == pytest.approx(flat_cost[k].numpy()[rows, cols].sum(), rel=1e-12)


def test_assignment_rejects_more_rows_than_columns():
    with pytest.raises(ValueError, match="n <= m"):
        eotfast.assignment(torch.rand(5, 4))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_emd_of_a_low_precision_cost_with_uniform_marginals(dtype):
    # 1/30 and 1/17 rounded to half precision differ in total mass by ~1e-4: the marginals
    # are built in float64, as POT solves, and the plan returned in the cost's dtype.
    cost = torch.rand(30, 17, dtype=torch.float64).to(dtype)
    plan = eotfast.emd(cost)
    assert plan.dtype == dtype and plan.shape == (30, 17)
    expected = ot.emd2(np.full(30, 1 / 30), np.full(17, 1 / 17), cost.double().numpy())
    total = (plan.double() * cost.double()).sum().item()
    assert total == pytest.approx(expected, rel=1e-2)  # the plan rounded to the cost's dtype
