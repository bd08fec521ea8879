"""eotfast.emd against ot.emd2, eotfast.assignment against scipy's linear_sum_assignment."""

import math

import numpy as np
import pytest
import torch
from oracles import optimum, pot_emd2, total

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
        expected = pot_emd2(flat_cost[k], a_k, b_k)
        assert (flat_plan[k] * flat_cost[k]).sum().item() == pytest.approx(expected, rel=1e-10)
        np.testing.assert_allclose(flat_plan[k].sum(1).numpy(), a_k, atol=1e-12)
        np.testing.assert_allclose(flat_plan[k].sum(0).numpy(), b_k, atol=1e-12)


SHAPES = [((), 30, 30), ((4,), 12, 12), ((), 10, 16), ((2, 3), 7, 9), ((), 1, 5), ((), 6, 9)]


def skip_slow_interpreter_cases(backend, device, shape, dtype):
    """The Triton interpreter takes ~20 s for one 12 x 16 auction: one small case there."""
    if (
        backend == "triton"
        and device.type == "cpu"
        and (shape, dtype) != (SHAPES[-1], torch.float32)
    ):
        pytest.skip("Triton interpreter: the small case only")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("batch,n,m", SHAPES)
def test_auction_is_within_its_bound_of_scipy(backend, device, batch, n, m, dtype):
    skip_slow_interpreter_cases(backend, device, (batch, n, m), dtype)
    cost = torch.rand(*batch, n, m, dtype=torch.float64).to(dtype).to(device)
    result = eotfast.auction(cost, backend=backend)
    assert isinstance(result, eotfast.AuctionResult)
    assert result.assignment.shape == (*batch, n) and result.assignment.dtype == torch.int64
    assert result.prices.shape == (*batch, m) and result.prices.dtype == dtype
    assert result.epsilon.shape == result.bound.shape == result.n_bids.shape == batch
    assert all(t.device == cost.device for t in result)
    assert torch.equal(result.bound, m * result.epsilon)
    flat = [t.reshape(-1, *t.shape[len(batch) :]).cpu() for t in (cost, *result)]
    for k in range(flat[0].shape[0]):
        cost_k, columns, prices, _, _, bound = (t[k] for t in flat)
        assert columns.unique().numel() == n  # one-to-one
        # The kernels compare C + p in the cost's dtype: a few units of its precision per row.
        magnitude = float(cost_k.abs().max()) + float(prices.abs().max())
        slack = m * 4 * torch.finfo(dtype).eps * magnitude
        best = optimum(cost_k)
        assert best - 1e-9 <= total(cost_k, columns) <= best + float(bound) + slack
        # The default bound: 1e-6 of the gap between a random assignment's expected total and
        # the sum of the row minima (a lower bound of the optimum), or 16 ulps of the largest
        # row range per column.
        c64 = cost_k.double()
        gap = float((c64.mean(-1) - c64.amin(-1)).sum())
        span = float((c64.amax(-1) - c64.amin(-1)).max())
        assert float(bound) <= 1.001 * max(1e-6 * gap, m * 16 * torch.finfo(dtype).eps * span)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("batch,n,m", SHAPES)
def test_auction_matches_scipy_exactly_on_integer_costs(backend, device, batch, n, m, dtype):
    skip_slow_interpreter_cases(backend, device, (batch, n, m), dtype)
    cost = torch.randint(0, 1000, (*batch, n, m)).to(dtype).to(device)
    result = eotfast.auction(cost, backend=backend)
    assert (result.bound.cpu() < 1).all()  # so the assignment is optimal
    flat_cost, flat_columns = cost.reshape(-1, n, m), result.assignment.reshape(-1, n)
    for k in range(flat_cost.shape[0]):
        assert total(flat_cost[k], flat_columns[k]) == optimum(flat_cost[k])


@pytest.mark.parametrize("batch,n,m", [((), 30, 30), ((4,), 12, 12), ((), 10, 16)])
def test_assignment_reaches_scipy_optimal_cost(batch, n, m):
    cost = torch.randint(0, 100, (*batch, n, m)).double() + torch.rand(()).double()
    columns = eotfast.assignment(cost)
    assert columns.shape == (*batch, n) and columns.dtype == torch.int64
    flat_cost, flat_columns = cost.reshape(-1, n, m), columns.reshape(-1, n)
    for k in range(flat_cost.shape[0]):
        assert len(set(flat_columns[k].tolist())) == n  # one-to-one
        assert total(flat_cost[k], flat_columns[k]) == pytest.approx(
            optimum(flat_cost[k]), rel=1e-12
        )


def test_assignment_of_a_half_precision_cost():
    cost = torch.randint(0, 50, (20, 20)).to(torch.bfloat16)
    columns = eotfast.assignment(cost)
    assert total(cost, columns) == optimum(cost)


def test_assignment_rejects_more_rows_than_columns():
    with pytest.raises(ValueError, match="n <= m"):
        eotfast.assignment(torch.rand(5, 4))


def test_warm_start_from_the_optimal_prices_takes_fewer_bids():
    cost = torch.rand(3, 60, 70, dtype=torch.float64)
    cold = eotfast.auction(cost)
    warm = eotfast.auction(cost, cold.prices, epsilon_start=cold.epsilon)
    assert (warm.n_bids < cold.n_bids).all(), (warm.n_bids, cold.n_bids)
    for k in range(3):
        assert total(cost[k], warm.assignment[k]) <= optimum(cost[k]) + float(warm.bound[k])


def test_a_larger_epsilon_gives_a_larger_bound_and_fewer_bids():
    cost = torch.rand(2, 50, 50, dtype=torch.float64)
    fine, coarse = eotfast.auction(cost), eotfast.auction(cost, epsilon=1e-2)
    assert torch.equal(coarse.bound, torch.full((2,), 50 * 1e-2, dtype=torch.float64))
    assert (coarse.n_bids < fine.n_bids).all()
    for k in range(2):
        assert total(cost[k], coarse.assignment[k]) <= optimum(cost[k]) + 0.5


def test_max_bids_reached_is_reported_and_assignment_refuses_it():
    cost = torch.rand(2, 20, 20, dtype=torch.float64)
    result = eotfast.auction(cost, max_bids=5)
    assert torch.isinf(result.epsilon).all() and torch.isinf(result.bound).all()
    for columns in result.assignment:
        assert columns.unique().numel() == 20  # still one-to-one


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(cost=torch.rand(5, 4)), ValueError, "n <= m"),
        (dict(cost=[[1.0]]), TypeError, "cost must be a torch.Tensor"),
        (dict(cost=torch.ones(3, 3, dtype=torch.int64)), TypeError, "cost must be a floating"),
        (dict(cost=torch.tensor([[0.0, float("nan")]])), ValueError, "cost contains NaN"),
        (dict(prices=torch.zeros(3)), ValueError, r"prices must have shape \(4,\)"),
        (dict(prices=torch.tensor([0.0, 0, 0, float("inf")])), ValueError, "prices contains"),
        (dict(epsilon=0.0), ValueError, "epsilon must be a number in"),
        (dict(epsilon="small"), TypeError, "epsilon must be a number"),
        (dict(epsilon=torch.tensor(-1.0)), ValueError, "epsilon must be > 0"),
        (dict(epsilon=torch.ones(2)), ValueError, "epsilon must be a number or a tensor broad"),
        (dict(epsilon_start=math.inf), ValueError, "epsilon_start must be a number in"),
        (dict(scaling=1.0), ValueError, "scaling must be a number in"),
        (dict(max_bids=0), ValueError, "max_bids must be an integer"),
        (dict(backend="gpu"), ValueError, "backend must be one of"),
    ],
)
def test_auction_refuses_bad_arguments_naming_them(kwargs, error, match):
    arguments = dict(cost=torch.rand(3, 4))
    arguments.update(kwargs)
    with pytest.raises(error, match=match):
        eotfast.auction(arguments.pop("cost"), **arguments)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_emd_of_a_low_precision_cost_with_uniform_marginals(dtype):
    # 1/30 and 1/17 rounded to half precision differ in total mass by ~1e-4: the marginals
    # are built in float64, as POT solves, and the plan returned in the cost's dtype.
    cost = torch.rand(30, 17, dtype=torch.float64).to(dtype)
    plan = eotfast.emd(cost)
    assert plan.dtype == dtype and plan.shape == (30, 17)
    expected = pot_emd2(cost)
    ours = (plan.double() * cost.double()).sum().item()
    assert ours == pytest.approx(expected, rel=1e-2)  # the plan rounded to the cost's dtype


@pytest.mark.parametrize("offset", [1e6, -1e6, 1e12])
def test_assignment_is_optimal_whatever_offset_the_costs_share(backend, device, offset):
    # The default epsilon scaled with the costs' magnitude: on 1e6 + U(0, 1) (float64,
    # 24 x 24) the bound was 24, ~n times the spread, and the auction closed 82-93% of the
    # gap between random columns and scipy's optimum; an offset changes neither.
    skip_slow_interpreter_cases(backend, device, ((), 24, 24), torch.float64)
    generator = torch.Generator().manual_seed(3)
    spread = torch.rand(2, 24, 24, dtype=torch.float64, generator=generator)
    cost = offset + spread
    # Row offsets too: each row's own constant changes no optimal assignment.
    cost = cost + 1e3 * torch.rand(2, 24, 1, dtype=torch.float64, generator=generator)
    result = eotfast.auction(cost.to(device), backend=backend)
    columns = eotfast.assignment(cost.to(device), backend=backend).cpu()
    for k in range(2):
        best = optimum(spread[k] + (cost[k] - spread[k]))
        assert float(result.bound[k]) < 1e-4, result.bound
        assert total(cost[k], columns[k]) - best <= 1e-4 + 24 * 4e-16 * abs(offset)


def test_large_warm_start_prices_and_tiny_costs_keep_the_bound(backend, device):
    # A price common to every column changes no bid, and the auction is scale-free: prices of
    # 1e6 on U(0, 1) float32 costs gave a bound of 23-46 (16 ulps of 1e6 per column), and
    # float32 costs of 1e-40 (subnormal) a bound of 2.8e-37, ~1000 times their spread.
    skip_slow_interpreter_cases(backend, device, ((), 24, 24), torch.float32)
    generator = torch.Generator().manual_seed(4)
    unit = torch.rand(24, 24, generator=generator)
    warm = eotfast.auction(
        unit.to(device), prices=torch.full((24,), 1e6, device=device), backend=backend
    )
    assert float(warm.bound) < 1e-3
    assert total(unit, warm.assignment.cpu()) <= optimum(unit) + float(warm.bound) + 1e-4
    tiny = unit * 1e-40  # subnormal float32 entries
    result = eotfast.auction(tiny.to(device), backend=backend)
    scaled = tiny.double() * 1e40  # the same problem in normal numbers, for scipy
    assert 0 < float(result.bound) < 1e-43  # 24 subnormal steps: the reported floor
    assert total(scaled, result.assignment.cpu()) <= optimum(scaled) + 1e-4
