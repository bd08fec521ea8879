"""eotfast.pair: pairing quality against the exact optimum (scipy), sampling against the plan."""

import pytest
import scipy.optimize
import torch

import eotfast


def gap_closed(cost, columns):
    """Fraction of the gap between random pairing (expected cost) and the optimal assignment
    (scipy) that the pairing closes: 0 = no better than random, 1 = optimal."""
    n = cost.shape[0]
    rows, cols = scipy.optimize.linear_sum_assignment(cost.double().numpy())
    optimal = cost.double().numpy()[rows, cols].sum()
    random = cost.double().mean(1).sum().item()
    ours = cost.double()[torch.arange(n), columns].sum().item()
    return (random - ours) / (random - optimal)


@pytest.mark.slow
def test_default_sinkhorn_pairs_close_95_percent_of_the_gap(clustered_domains):
    x, y = clustered_domains(n=256, d=3072)
    cost = eotfast.cost_matrix(x, y)
    closed = [
        gap_closed(cost, eotfast.pair(x, y, generator=torch.Generator().manual_seed(s)))
        for s in range(3)
    ]
    assert min(closed) >= 0.95


def test_exact_pairs_are_an_optimal_permutation(clustered_domains):
    x, y = clustered_domains(n=128, d=3072)
    columns = eotfast.pair(x, y, method="exact")
    assert sorted(columns.tolist()) == list(range(128))
    assert gap_closed(eotfast.cost_matrix(x, y), columns) == pytest.approx(1.0, abs=1e-9)


def test_emd_pairs_are_optimal_on_square_uniform_problems(clustered_domains):
    x, y = clustered_domains(n=64, d=300)
    columns = eotfast.pair(x, y, method="emd")
    assert gap_closed(eotfast.cost_matrix(x, y), columns) == pytest.approx(1.0, abs=1e-9)


def test_random_pairs_are_distinct_and_close_no_gap_on_average(clustered_domains):
    x, y = clustered_domains(n=128, d=300)
    cost = eotfast.cost_matrix(x, y)
    closed = []
    for seed in range(20):
        columns = eotfast.pair(x, y, method="random", generator=torch.Generator().manual_seed(seed))
        assert sorted(columns.tolist()) == list(range(128))
        closed.append(gap_closed(cost, columns))
    assert abs(sum(closed) / len(closed)) < 0.1


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_sampled_pair_frequencies_follow_the_plan(backend):
    # 20000 copies of one small problem in a batch: each row's empirical target frequencies
    # must match its plan row (the plan computed independently by POT-equivalent potentials).
    n, m, d, draws = 4, 5, 3, 20000
    x, y = torch.randn(n, d, dtype=torch.float64), torch.randn(m, d, dtype=torch.float64)
    cost = eotfast.cost_matrix(x, y)
    plan = eotfast.sinkhorn(cost, reg=0.5, tol=1e-12).plan(cost)
    row_distribution = plan / plan.sum(1, keepdim=True)
    columns = eotfast.pair(
        x.expand(draws, n, d), y.expand(draws, m, d), reg=0.5, tol=1e-12,
        generator=torch.Generator().manual_seed(0), backend=backend,
    )  # fmt: skip
    frequencies = (
        torch.stack([torch.bincount(columns[:, i], minlength=m) for i in range(n)]) / draws
    )
    total_variation = 0.5 * (frequencies - row_distribution).abs().sum(1)
    assert total_variation.max() < 0.02  # sampling noise at 20000 draws is ~0.01
    assert row_distribution.max(1).values.min() < 0.9  # the plan is not concentrated


def test_fixed_generator_seed_reproduces_pairs(clustered_domains):
    x, y = clustered_domains(n=64, d=100)
    first, second, other = (
        eotfast.pair(x, y, generator=torch.Generator().manual_seed(s)) for s in (7, 7, 8)
    )
    assert torch.equal(first, second)
    assert not torch.equal(first, other)


def test_argmax_sampling_takes_each_rows_most_likely_target():
    x, y = torch.randn(30, 8, dtype=torch.float64), torch.randn(40, 8, dtype=torch.float64)
    cost = eotfast.cost_matrix(x, y)
    plan = eotfast.sinkhorn(cost, tol=1e-10).plan(cost)
    columns = eotfast.pair(x, y, sampling="argmax", tol=1e-10)
    assert torch.equal(columns, plan.argmax(1))


def test_pair_keeps_batch_shape_device_and_dtype():
    x, y = torch.randn(2, 3, 16, 10), torch.randn(2, 3, 16, 10)
    for method in ("sinkhorn", "exact", "emd", "random"):
        columns = eotfast.pair(x, y, method=method)
        assert columns.shape == (2, 3, 16) and columns.dtype == torch.int64
        assert columns.device == x.device
