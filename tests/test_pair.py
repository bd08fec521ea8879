"""eotfast.pair: pairing quality against the exact optimum (scipy), sampling against the plan."""

import pytest
import torch
from oracles import optimum, total

import eotfast


def gap_closed(cost, columns):
    """Fraction of the gap between random pairing (expected cost) and the optimal assignment
    (scipy) that the pairing closes: 0 = no better than random, 1 = optimal."""
    random = cost.double().mean(1).sum().item()
    return (random - total(cost, columns)) / (random - optimum(cost))


@pytest.mark.slow
def test_sampled_sinkhorn_pairs_close_95_percent_of_the_gap(clustered_domains):
    x, y = clustered_domains(n=256, d=3072)
    cost = eotfast.cost_matrix(x, y)
    closed = [
        gap_closed(cost, eotfast.pair(x, y, "sinkhorn", generator=torch.Generator().manual_seed(s)))
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
        x.expand(draws, n, d), y.expand(draws, m, d), "sinkhorn", reg=0.5, tol=1e-12,
        generator=torch.Generator().manual_seed(0), backend=backend, batch_dims=1,
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
        eotfast.pair(x, y, "sinkhorn", generator=torch.Generator().manual_seed(s))
        for s in (7, 7, 8)
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
    cases = [("auto", None), ("sinkhorn", "sample"), ("sinkhorn", "permutation"),
             ("exact", None), ("emd", "sample"), ("random", None)]  # fmt: skip
    for method, sampling in cases:
        columns = eotfast.pair(x, y, method=method, sampling=sampling, batch_dims=2)
        assert columns.shape == (2, 3, 16) and columns.dtype == torch.int64
        assert columns.device == x.device


# ----------------------------------------------------------------------- input contract
def test_image_batches_are_samples_first_as_torchcfm_and_pot_read_them(clustered_domains):
    # [n, C, H, W] is n samples of C * H * W features (torchcfm and ot.dist flatten the same
    # way): scipy's optimum on the flattened cost, one partner per image.
    x, y = clustered_domains(n=16, d=3 * 8 * 8)
    images_x, images_y = x.view(16, 3, 8, 8), y.view(16, 3, 8, 8)
    cost = eotfast.cost_matrix(images_x, images_y)
    assert cost.shape == (16, 16)
    assert torch.allclose(cost.double(), torch.cdist(x.double(), y.double()) ** 2, atol=1e-3)
    columns = eotfast.pair(images_x, images_y, "exact")
    assert columns.shape == (16,)
    assert total(cost, columns) == pytest.approx(optimum(cost), rel=1e-6)
    # [n]: n samples of 1 feature; in 1-D the optimal pairing is monotone (sorted to sorted)
    x1, y1 = torch.randn(16, dtype=torch.float64), torch.randn(16, dtype=torch.float64)
    one_feature = eotfast.pair(x1, y1, "exact")
    assert torch.equal(y1[one_feature[x1.argsort()]], y1.sort().values)


def test_batch_dims_pairs_each_problem_as_on_its_own(clustered_domains):
    x, y = clustered_domains(n=4 * 12, d=3 * 4 * 4)
    x, y = x.view(4, 12, 3, 4, 4), y.view(4, 12, 3, 4, 4)
    columns = eotfast.pair(x, y, "exact", batch_dims=1)
    assert columns.shape == (4, 12)
    for k in range(4):
        cost = torch.cdist(x[k].flatten(1).double(), y[k].flatten(1).double()) ** 2
        assert total(cost, columns[k]) == pytest.approx(optimum(cost), rel=1e-6)
    costs = eotfast.cost_matrix(x, y, batch_dims=1)
    assert costs.shape == (4, 12, 12)


@pytest.mark.parametrize(
    "x_shape,y_shape,batch_dims,hint",
    [
        ((8, 16, 5), (8, 12, 5), 0, "pass batch_dims=1"),  # old-style batches
        ((2, 3, 16, 5), (2, 3, 12, 5), 0, "pass batch_dims=2"),
        ((16, 3, 8, 8), (12, 3, 8, 8), 1, "pass batch_dims=0"),  # images read as batches
        ((16, 3, 8, 8), (16, 3, 8, 7), 0, ""),  # no reading fits: no hint
    ],
)
def test_a_shape_that_only_another_reading_fits_is_an_error_that_names_it(
    x_shape, y_shape, batch_dims, hint
):
    with pytest.raises(ValueError, match=f"batch_dims={batch_dims}") as error:
        eotfast.pair(torch.randn(x_shape), torch.randn(y_shape), batch_dims=batch_dims)
    assert hint in str(error.value)
    if not hint:
        assert "pass batch_dims" not in str(error.value)
    if batch_dims == 0:  # cost_matrix reads shapes by the same rule
        with pytest.raises(ValueError, match=hint or "samples of the same shape"):
            eotfast.cost_matrix(torch.randn(x_shape), torch.randn(y_shape))


def test_return_partners_gives_the_targets_in_their_own_shape(clustered_domains):
    x, y = clustered_domains(n=20, d=3 * 4 * 4)
    images_x, images_y = x.view(20, 3, 4, 4), y[:18].view(18, 3, 4, 4)
    j, partners = eotfast.pair(images_x[:15], images_y, return_partners=True)
    assert partners.shape == (15, 3, 4, 4) and torch.equal(partners, images_y[j])
    batched_y = images_y[:16].view(2, 8, 3, 4, 4)
    j, partners = eotfast.pair(
        images_x[:16].view(2, 8, 3, 4, 4), batched_y, "sinkhorn", batch_dims=1,
        return_partners=True,
    )  # fmt: skip
    assert partners.shape == (2, 8, 3, 4, 4)
    for k in range(2):
        assert torch.equal(partners[k], batched_y[k][j[k]])


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_exact_pairs_have_scipys_optimal_cost(clustered_domains, backend):
    x, y = clustered_domains(n=96, d=300)
    x, y = x.double(), y.double()
    columns = eotfast.pair(x, y, method="exact", backend=backend)
    assert sorted(columns.tolist()) == list(range(96))
    cost = eotfast.cost_matrix(x, y)
    assert total(cost, columns) == pytest.approx(optimum(cost), rel=1e-9)


@pytest.mark.parametrize("n,m", [(64, 64), (40, 64)])
def test_permutation_sampling_gives_distinct_targets_near_the_optimum(clustered_domains, n, m):
    # One auction phase at the Sinkhorn epsilon from its prices -g: distinct targets (a
    # permutation, or an injection when n < m) whose cost is at least the optimum and within
    # m * epsilon of it, and below that of the pairs sampled from the plan.
    x, y = clustered_domains(n=m, d=300)
    x, y = x[:n], y
    cost = eotfast.cost_matrix(x, y)
    columns = eotfast.pair(x, y, sampling="permutation")
    assert columns.shape == (n,) and columns.unique().numel() == n
    assert ((columns >= 0) & (columns < m)).all()
    epsilon = float(eotfast.sinkhorn(cost).epsilon)
    best, ours = optimum(cost), total(cost, columns)
    assert best * (1 - 1e-6) <= ours <= best + m * epsilon
    sampled = eotfast.pair(x, y, "sinkhorn", generator=torch.Generator().manual_seed(0))
    assert ours < total(cost, sampled)
    random = cost.double().mean(1).sum().item()
    assert (random - ours) / (random - best) > 0.95  # gap closed


def test_permutation_sampling_warm_start_takes_fewer_bids_than_a_cold_solve(clustered_domains):
    # The same phase (epsilon = the Sinkhorn epsilon) on the same shifted cost: from the
    # prices -g, against zero prices scaled down from range / 8, the auction's default start.
    from eotfast.lap import warm_started_assignment
    from eotfast.ops import solve

    x, y = clustered_domains(n=128, d=300)
    cost = eotfast.cost_matrix(x, y)
    result, shifted, _ = solve.sinkhorn(
        cost, None, None, epsilon=eotfast.epsilon_from_reg(cost, 0.05, True), backend="cpu",
        max_iter=1000, tol=1e-4, scaling=0.5, relaxation=None,
    )  # fmt: skip
    warm = warm_started_assignment(shifted, result, backend="cpu")
    cold = solve.auction(
        shifted, torch.zeros(128), epsilon_start=shifted.amax() / 8,
        epsilon_final=result.epsilon, scaling=0.2, max_bids=10**8, backend="cpu",
    )  # fmt: skip
    assert torch.equal(warm.epsilon, cold.epsilon)
    assert 2 * int(warm.n_bids) < int(cold.n_bids), (warm.n_bids, cold.n_bids)
    pairs = eotfast.pair(x, y, sampling="permutation", tol=1e-4, backend="cpu")
    assert torch.equal(pairs, warm.assignment)


def test_auto_pairs_are_distinct_and_optimal_on_the_cpu(clustered_domains):
    # On the CPU "auto" is the auction: scipy's optimal total, every target once.
    x, y = clustered_domains(n=96, d=300)
    columns = eotfast.pair(x, y)
    assert sorted(columns.tolist()) == list(range(96))
    cost = eotfast.cost_matrix(x, y)
    assert total(cost, columns) == pytest.approx(optimum(cost), rel=1e-6)


def test_auto_without_the_cpu_kernels_is_sinkhorn_then_the_permutation(clustered_domains):
    # The auction bids in Jacobi rounds everywhere but in the C++ kernel: off the "cpu"
    # backend "auto" warm-starts it from Sinkhorn, as on a GPU ("triton", "cuda"); "host"
    # too, whose Sinkhorn solve stays on the device.
    x, y = clustered_domains(n=48, d=300)
    expected = eotfast.pair(x, y, "sinkhorn", sampling="permutation", backend="torch")
    assert torch.equal(eotfast.pair(x, y, backend="torch"), expected)
    assert eotfast.pairing.auto_method("triton", 8, 8) == ("sinkhorn", "permutation")


def test_host_backend_solves_the_auction_with_the_cpu_kernel(clustered_domains, monkeypatch):
    # "host" serves devices without an eotfast kernel (MPS, XPU, none of them here): torch ops
    # on the device, the C++ auction on host copies of the cost. CPU tensors stand in for such
    # a device: the registry is told the CPU has no kernel, and the torch reference's auction
    # must not run. Oracle: scipy's optimum.
    from eotfast.ops import host_backend, registry, torch_backend

    monkeypatch.setattr(registry, "_KERNEL_DEVICE_TYPES", ("cuda", "meta"))

    def torch_auction(*args, **kwargs):
        raise AssertionError("the torch reference's auction ran")

    monkeypatch.setattr(torch_backend, "auction_reference", torch_auction)
    solved_on = []

    def auction_cpu(cost, *args):
        solved_on.append(cost.device)
        return torch.ops.eotfast.auction_cpu(cost, *args)

    monkeypatch.setattr(host_backend, "auction_cpu", auction_cpu)
    x, y = clustered_domains(n=96, d=300)
    cost = eotfast.cost_matrix(x, y)
    columns = eotfast.pair(x, y, method="exact", backend="host")
    assert sorted(columns.tolist()) == list(range(96))
    assert total(cost, columns) == pytest.approx(optimum(cost), rel=1e-6)
    permutation = eotfast.pair(x, y, backend="host")  # auto: Sinkhorn, then the permutation
    assert permutation.unique().numel() == 96
    assert gap_closed(cost, permutation) > 0.95
    # Compiled, the copies to the host and back are graph nodes: the same columns.
    compiled = torch.compile(
        lambda x, y: eotfast.pair(x, y, method="exact", backend="host"),
        backend="aot_eager", fullgraph=True,
    )  # fmt: skip
    assert torch.equal(compiled(x, y), columns)
    assert solved_on == [torch.device("cpu")] * 3


def test_sampling_with_a_method_that_has_no_plan_is_an_error():
    x, y = torch.randn(6, 3), torch.randn(6, 3)
    for method in ("exact", "random"):
        with pytest.raises(ValueError, match=f"method='{method}' gives distinct targets"):
            eotfast.pair(x, y, method, sampling="argmax")


def test_auto_with_more_sources_than_targets_draws_from_the_plan(clustered_domains):
    # No injection exists for n > m: "auto" draws from the Sinkhorn plan, as method "sinkhorn".
    x, y = clustered_domains(n=48, d=300)
    y = y[:32]
    drawn = eotfast.pair(x, y, generator=torch.Generator().manual_seed(3))
    expected = eotfast.pair(x, y, "sinkhorn", generator=torch.Generator().manual_seed(3))
    assert torch.equal(drawn, expected)


def test_auto_with_a_sampling_is_sinkhorn_with_that_sampling(clustered_domains):
    x, y = clustered_domains(n=40, d=300)
    for sampling in ("argmax", "permutation"):
        assert torch.equal(
            eotfast.pair(x, y, sampling=sampling), eotfast.pair(x, y, "sinkhorn", sampling=sampling)
        )


def test_permutation_sampling_refuses_more_sources_than_targets():
    x, y = torch.randn(10, 5), torch.randn(8, 5)
    with pytest.raises(ValueError, match="sampling='permutation' needs n <= m"):
        eotfast.pair(x, y, sampling="permutation")
    with pytest.raises(ValueError, match="sampling='permutation' applies to method 'sinkhorn'"):
        eotfast.pair(y, x, method="emd", sampling="permutation")


def test_sampling_modes_are_checked():
    with pytest.raises(ValueError, match="sampling must be one of"):
        eotfast.pair(torch.randn(4, 3), torch.randn(4, 3), sampling="perm")
