"""eotfast.sinkhorn against POT's ot.bregman.sinkhorn_log, on every backend (torch, cpu,
triton under the interpreter or on a GPU, cuda on a GPU)."""

import importlib.util

import numpy as np
import ot
import pytest
import torch
from oracles import marginals, pot_emd2, pot_sinkhorn_log, solve_dtype

import eotfast

# Potentials are in cost units; these bound |ours - POT's| relative to the largest cost, by
# the dtype the backend solves in.
POTENTIAL_ATOL = {torch.float64: 1e-10, torch.float32: 2e-4}
PLAN_ATOL = {torch.float64: 1e-12, torch.float32: 1e-3}  # times 1 / (n m)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("batch,n,m", [((), 7, 5), ((), 33, 65), ((3,), 16, 9), ((2, 2), 5, 12)])
@pytest.mark.parametrize("uniform", [True, False])
@pytest.mark.parametrize("relative_reg", [True, False])
def test_fixed_iterations_match_pot(
    backend, device, random_problem, dtype, batch, n, m, uniform, relative_reg
):
    # tol=0 runs exactly max_iter iterations, as stopThr=0 does in POT: same iterates.
    cost, a, b = random_problem(batch, n, m, dtype=dtype, uniform=uniform)
    reg, iters = 0.1, 15
    on_device = [None if t is None else t.to(device) for t in (cost, a, b)]
    result = eotfast.sinkhorn(
        *on_device, reg=reg, relative_reg=relative_reg, max_iter=iters, tol=0.0, backend=backend,
        scaling=None,  # the plain iteration: POT's iterates
    )  # fmt: skip
    result = eotfast.SinkhornResult(*(t.cpu() for t in result))
    precision = solve_dtype(backend, dtype)
    assert result.f.shape == (*batch, n) and result.g.shape == (*batch, m)
    assert (result.n_iter == iters).all()
    cost_flat = cost.reshape(-1, n, m)
    for k in range(cost_flat.shape[0]):
        epsilon = reg * cost_flat[k].double().std(correction=0) if relative_reg else reg
        assert result.epsilon.reshape(-1)[k].item() == pytest.approx(float(epsilon), rel=1e-5)
        a_k = None if a is None else a.reshape(-1, n)[k]
        b_k = None if b is None else b.reshape(-1, m)[k]
        plan, f, g, _ = pot_sinkhorn_log(
            cost_flat[k], a_k, b_k, float(epsilon), numItermax=iters, stopThr=0
        )
        atol = POTENTIAL_ATOL[precision] * cost_flat[k].abs().max().item()
        np.testing.assert_allclose(
            result.f.reshape(-1, n)[k].double().numpy(), f, atol=atol, rtol=0
        )
        np.testing.assert_allclose(
            result.g.reshape(-1, m)[k].double().numpy(), g, atol=atol, rtol=0
        )
        ours = result.plan(cost).reshape(-1, n, m)[k].double().numpy()
        np.testing.assert_allclose(ours, plan, atol=PLAN_ATOL[precision] / (n * m))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_converged_plan_matches_pot_and_reports_its_error(backend, device, random_problem, dtype):
    cost, a, b = random_problem((), 40, 30, dtype=dtype, uniform=False)
    precision = solve_dtype(backend, dtype)
    tol = 1e-9 if precision == torch.float64 else 1e-6
    result = eotfast.sinkhorn(
        cost.to(device), a.to(device), b.to(device), reg=0.05, relative_reg=False, tol=tol,
        backend=backend,
    )  # fmt: skip
    result = eotfast.SinkhornResult(*(t.cpu() for t in result))
    plan = result.plan(cost.double()).numpy()
    pot_plan, *_ = pot_sinkhorn_log(cost, a, b, 0.05, stopThr=1e-12, numItermax=10000)
    # float32: a marginal error below 1e-6 bounds the plan's distance to POT's only up to the
    # problem's conditioning; over-relaxed iterates end 1.6e-6 away (plain ones 1e-6).
    np.testing.assert_allclose(plan, pot_plan, atol=1e-9 if precision == torch.float64 else 3e-6)
    # The reported error is that of the returned plan, rows and columns, measured here
    # independently (over-relaxed, the rows are not exact either).
    row_violation = plan.sum(1) - a.double().numpy()
    column_violation = plan.sum(0) - b.double().numpy()
    measured = np.sqrt(np.sum(row_violation**2) + np.sum(column_violation**2))
    assert result.marginal_error.item() < tol
    # float32 potentials carry ~ulp(f) / epsilon = 2.4e-6 relative rounding into each entry,
    # which the kernel's measure and this one see differently.
    slack = 1e-7 if precision == torch.float64 else 1e-6
    assert result.marginal_error.item() == pytest.approx(measured, rel=0.05, abs=slack)


@pytest.mark.parametrize("accelerated", [False, True])
def test_agrees_with_the_torch_reference_on_batched_float32(
    backend, device, random_problem, accelerated
):
    cost, a, b = random_problem((4,), 50, 70, dtype=torch.float32, uniform=False)
    # Plain: the same iterates, so the same count up to where float32 rounding crosses tol.
    # Accelerated (the defaults: epsilon scaling, over-relaxation): the C++ kernel relaxes f
    # then g and re-gauges while annealing, the others g then f, so only the fixed point
    # agrees (counts of 36 against 63 on one problem, 58 against 31 on another).
    options = {} if accelerated else {"scaling": None}
    reference = eotfast.sinkhorn(cost, a, b, backend="torch", **options)
    ours = eotfast.sinkhorn(cost.to(device), a.to(device), b.to(device), backend=backend, **options)
    ours = eotfast.SinkhornResult(*(t.cpu() for t in ours))
    if not accelerated:
        assert (ours.n_iter - reference.n_iter).abs().max() <= 1
    assert (ours.marginal_error < 1e-4).all()
    if accelerated:  # potentials are defined up to f + c, g - c: compare the plans
        torch.testing.assert_close(ours.plan(cost), reference.plan(cost), atol=1e-4, rtol=0)
        return
    atol = 1e-4 * cost.max().item()
    torch.testing.assert_close(ours.f, reference.f, atol=atol, rtol=0)
    torch.testing.assert_close(ours.g, reference.g, atol=atol, rtol=0)


def test_each_problem_stops_on_its_own(backend, device, random_problem):
    # With an absolute epsilon, scaling a cost by 3 makes its problem ~8x slower to converge.
    cost, _, _ = random_problem((), 30, 30, dtype=torch.float64)
    batch = torch.stack([cost, 3 * cost]).to(device)
    tol = 1e-6 if solve_dtype(backend, torch.float64) == torch.float64 else 1e-5
    result = eotfast.sinkhorn(
        batch, reg=0.05, relative_reg=False, tol=tol, max_iter=5000, backend=backend
    )
    easy_iters, hard_iters = result.n_iter.tolist()
    assert easy_iters < hard_iters < 5000
    assert (result.marginal_error < tol).all()
    # Stopping one problem must not disturb the other: each equals its solve alone.
    for k in range(2):
        alone = eotfast.sinkhorn(
            batch[k], reg=0.05, relative_reg=False, tol=tol, max_iter=5000, backend=backend
        )
        assert alone.n_iter.item() == result.n_iter[k].item()
        torch.testing.assert_close(alone.f, result.f[k], atol=1e-12 * float(batch.max()), rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_small_epsilon_on_image_scale_costs_stays_finite_and_converges(
    request, backend, device, dtype
):
    # d = 3072 values in [-1, 1]: costs around 2000 with a std near 40. At epsilon =
    # 1e-3 * std, exp(-C / epsilon) underflows to 0 everywhere, which is what makes
    # non-log Sinkhorn fall back to a uniform plan.
    if "interpreter" in request.keywords:
        pytest.skip("thousands of iterations: too slow for the interpreter (GPU runs it)")
    n, d = 64, 3072
    x, y = torch.rand(n, d, dtype=dtype) * 2 - 1, torch.rand(n, d, dtype=dtype) * 2 - 1
    cost = eotfast.cost_matrix(x, y)
    assert torch.exp(-cost / (1e-3 * cost.std())).max() == 0
    result = eotfast.sinkhorn(cost.to(device), reg=1e-3, max_iter=50_000, tol=1e-4, backend=backend)
    result = eotfast.SinkhornResult(*(t.cpu() for t in result))
    assert torch.isfinite(result.f).all() and torch.isfinite(result.g).all()
    assert result.marginal_error.item() < 1e-4 and result.n_iter.item() < 50_000
    # Near-exact plan, measured against POT's exact solver; a uniform plan costs the mean.
    plan = result.plan(cost.double())
    transport_cost = (plan * cost.double()).sum().item()
    exact_cost = pot_emd2(cost)
    uniform_cost = cost.double().mean().item()
    assert transport_cost == pytest.approx(exact_cost, rel=1e-3)
    assert uniform_cost - exact_cost > 10 * (transport_cost - exact_cost)


def test_plan_of_half_precision_cost_is_float32(random_problem):
    cost, _, _ = random_problem((), 6, 4, dtype=torch.float32)
    result = eotfast.sinkhorn(cost.half())
    assert result.plan(cost.half()).dtype == torch.float32
    assert result.f.dtype == result.g.dtype == torch.float64  # g holds the cost's offset


@pytest.mark.parametrize("offset", [1e5, 1e6])
def test_plan_of_a_cost_far_from_zero_meets_the_reported_error(backend, device, offset):
    # The solver works on cost - min(cost); g took the offset back in float32, rounded, and
    # plan(c) missed the row sums by 7% at 1e5 (90% at 1e6) while marginal_error said 2e-4.
    cost = offset + torch.rand(8, 8, generator=torch.Generator().manual_seed(0))
    result = eotfast.sinkhorn(cost.to(device), max_iter=10_000, backend=backend)
    plan = result.plan(cost.to(device)).double().cpu()
    measured = torch.cat([plan.sum(1) - 1 / 8, plan.sum(0) - 1 / 8]).norm()
    assert float(result.marginal_error) < 1e-4
    # float32 plan entries carry ~1e-7 relative rounding: a few 1e-7 of the unit mass.
    assert float(measured) <= float(result.marginal_error) + 1e-6


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("batch,n,m", [((), 300, 280), ((5,), 120, 150)])
def test_cpu_backend_threads_split_rows_or_problems_without_changing_results(threads, batch, n, m):
    # Large enough that the C++ side starts a thread team: rows and columns are split for one
    # problem; whole problems go to threads for a batch. 3 threads on 2 cores also exercises
    # uneven stripes and the barrier's yield.
    cost = torch.rand(*batch, n, m, dtype=torch.float64)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        ours = eotfast.sinkhorn(cost, reg=0.05, tol=1e-9, backend="cpu")
    finally:
        torch.set_num_threads(previous)
    flat = cost.reshape(-1, n, m)
    for k in range(flat.shape[0]):
        epsilon = ours.epsilon.reshape(-1)[k].item()
        plan, f, g, log = pot_sinkhorn_log(
            flat[k], None, None, epsilon, stopThr=1e-12, numItermax=20000
        )
        ours_plan = ours.plan(cost).reshape(-1, n, m)[k].numpy()
        np.testing.assert_allclose(ours_plan, plan, rtol=1e-6, atol=1e-9 * plan.max())
    assert (ours.marginal_error < 1e-9).all()


def test_outputs_carry_no_gradient_but_the_plan_does():
    cost = torch.rand(6, 5, dtype=torch.float64, requires_grad=True)
    result = eotfast.sinkhorn(cost)
    assert not result.f.requires_grad and not result.g.requires_grad
    result.plan(cost).sum().backward()
    assert cost.grad is not None and torch.isfinite(cost.grad).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("mass", [1e30, 1e-30])
def test_marginal_error_of_huge_and_tiny_masses_is_measured_not_inf_or_zero(
    backend, device, mass, dtype
):
    # Squared column violations of a plan of total mass 1e30 overflow float32 (the error read
    # inf) and those of mass 1e-30 underflow (it read 0): the error is accumulated in float64.
    generator = torch.Generator().manual_seed(6)
    cost = torch.rand(6, 5, dtype=torch.float64, generator=generator)
    a, b = marginals((), 6, 5, generator=generator)
    a, b = a * mass, b * mass
    cost, a, b = (t.to(dtype) for t in (cost, a, b))
    result = eotfast.sinkhorn(
        cost.to(device), a.to(device), b.to(device), reg=0.1, relative_reg=False, max_iter=3,
        tol=0.0, backend=backend, scaling=None,  # POT's 3 plain iterations
    )  # fmt: skip
    plan, *_ = pot_sinkhorn_log(cost, a, b, 0.1, numItermax=3, stopThr=0)
    expected = np.linalg.norm(plan.sum(0) - b.double().numpy())
    # float32 potentials near log(1e30) ~ 69 carry ~1e-6 relative rounding into the plan.
    rtol = 1e-6 if solve_dtype(backend, dtype) == torch.float64 else 5e-2
    assert float(result.marginal_error) == pytest.approx(expected, rel=rtol)


# ----------------------------------------------------------------------------- unbalanced
def pot_sinkhorn_unbalanced(cost, a, b, epsilon, reach):
    """POT's unbalanced Sinkhorn in float64, run far past any tolerance: the plan of
    min <P, C> + eps KL(P | a b^T) + rho KL(P 1 | a) + rho KL(P^T 1 | b) (reg_type="kl")."""
    return ot.unbalanced.sinkhorn_unbalanced(
        a.double().numpy(), b.double().numpy(), cost.double().numpy(), epsilon, reach,
        reg_type="kl", stopThr=1e-15, numItermax=100_000,
    )  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("reach", [0.05, 1.0])
def test_unbalanced_plan_matches_pot(backend, device, random_problem, dtype, reach):
    # Three problems of unequal mass (a sums to 1, b to 1.7), each stopping on its own.
    cost, a, b = random_problem((3,), 24, 17, dtype=dtype, uniform=False)
    b = 1.7 * b
    epsilon = 0.05
    arguments = dict(reg=epsilon, relative_reg=False, reach=reach, backend=backend)
    if backend in ("triton", "cuda"):
        with pytest.raises(ValueError, match="reach .unbalanced OT. is not implemented"):
            eotfast.sinkhorn(cost.to(device), a.to(device), b.to(device), **arguments)
        return
    tol = 1e-10 if dtype == torch.float64 else 1e-6
    result = eotfast.sinkhorn(cost, a, b, tol=tol, max_iter=20_000, **arguments)
    assert (result.marginal_error < tol).all(), result.marginal_error
    plans = result.plan(cost.double()).double()  # [3, n, m]
    for k in range(3):
        expected = pot_sinkhorn_unbalanced(cost[k], a[k], b[k], epsilon, reach)
        atol = 1e-10 if dtype == torch.float64 else 1e-5
        np.testing.assert_allclose(plans[k].numpy(), expected, atol=atol * expected.max())
        # The reported error is the distance of the plan's marginals to the fixed point's,
        # a e^(-F / rho) and b e^(-G / rho), F = f - epsilon log a, measured independently.
        a_k, b_k = a[k].double(), b[k].double()
        rows = plans[k].sum(1) - a_k * torch.exp(-(result.f[k] - epsilon * a_k.log()) / reach)
        columns = plans[k].sum(0) - b_k * torch.exp(-(result.g[k] - epsilon * b_k.log()) / reach)
        measured = torch.cat([rows, columns]).norm()
        assert float(measured) < tol + (1e-9 if dtype == torch.float64 else 2e-6)
    # Unbalanced: mass is created or destroyed where moving it costs more than rho allows.
    assert not torch.allclose(plans.sum((1, 2)), torch.ones(3, dtype=torch.float64), atol=1e-3)


def test_a_large_reach_is_balanced(random_problem):
    cost, a, b = random_problem((), 20, 15, uniform=False)
    balanced = eotfast.sinkhorn(cost, a, b, reg=0.1, relative_reg=False, tol=1e-10)
    loose = eotfast.sinkhorn(cost, a, b, reg=0.1, relative_reg=False, tol=1e-10, reach=1e9)
    np.testing.assert_allclose(loose.plan(cost), balanced.plan(cost), atol=1e-7)


@pytest.mark.parametrize("reach", [0, -1.0, "1", True, float("nan")])
def test_reach_must_be_positive(random_problem, reach):
    cost, a, b = random_problem((), 5, 4)
    with pytest.raises(ValueError, match="reach must be None .balanced OT. or a number > 0"):
        eotfast.sinkhorn(cost, reach=reach)


def test_balanced_marginals_must_share_their_mass_but_unbalanced_ones_need_not(random_problem):
    cost, a, b = random_problem((), 5, 4, uniform=False)
    with pytest.raises(ValueError, match="a and b must have the same total mass"):
        eotfast.sinkhorn(cost, a, 2 * b)
    assert torch.isfinite(eotfast.sinkhorn(cost, a, 2 * b, reach=1.0).f).all()


def test_relaxation_constants_agree():
    """The over-relaxation rule has one source, eotfast.ops.common: the torch reference and
    kernels/sinkhorn.py import its constants; the C++ kernels (CPU and CUDA) read the copies in
    csrc/sinkhorn_math.h, which must equal them (a backend with other constants converges to
    the same fixed point but stops after other iteration counts than the reference)."""
    import re
    from pathlib import Path

    from eotfast.ops import common

    header = (Path(__file__).resolve().parents[1] / "csrc" / "sinkhorn_math.h").read_text()
    copies = dict(re.findall(r"constexpr \w+ (k\w+) = ([0-9.]+);", header))
    assert int(copies["kStallCheckRounds"]) == common.STALL_CHECK_ROUNDS
    assert int(copies["kProbeRounds"]) == common.PROBE_ROUNDS
    assert float(copies["kSlowRate"]) == common.SLOW_RATE
    power = common.SLOW_RATE ** (common.PROBE_ROUNDS // 2)
    assert float(copies["kSlowRatePower"]) == pytest.approx(power, rel=1e-12)
    if importlib.util.find_spec("triton") is not None:
        from eotfast.kernels import sinkhorn as kernel

        assert kernel.PROBE_ROUNDS.value == common.PROBE_ROUNDS
        assert kernel.STALL_CHECK_ROUNDS.value == common.STALL_CHECK_ROUNDS
        assert kernel.SLOW_RATE_POWER.value == pytest.approx(power, rel=1e-12)


# ----------------------------------------------------------------------------- zero mass
def pot_plan_without_zero_mass(cost, a, b, epsilon, reach):
    """The oracle for marginals with zero entries: POT solves the problem with those rows and
    columns removed (a point of zero mass carries none in the plan, and with the entropy taken
    relative to a b^T it adds nothing to the objective either), and the plan gets zero rows
    and columns back. POT never sees log(0), so its own handling of it is not under test."""
    rows, columns = a > 0, b > 0
    sub_cost, sub_a, sub_b = cost[rows][:, columns], a[rows], b[columns]
    if np.isinf(reach):
        # float32 marginals of one mass differ by rounding once in float64 (1e-8), which kept
        # POT's balanced stopping test above any threshold for all of numItermax (a minute).
        sub_b = sub_b * (sub_a.sum() / sub_b.sum())
        sub_plan, *_ = pot_sinkhorn_log(
            sub_cost, sub_a, sub_b, epsilon, stopThr=1e-14, numItermax=100_000
        )
    else:
        sub_plan = pot_sinkhorn_unbalanced(sub_cost, sub_a, sub_b, epsilon, reach)
    plan = np.zeros(tuple(cost.shape))
    plan[np.ix_(rows.numpy(), columns.numpy())] = sub_plan
    return plan


# (zeros of a, zeros of b) of the middle problem of a batch of 3; n = 6, m = 5. The first
# source (or target) is the case that broke: the C++ kernel's annealing gauge read f[0].
ZERO_MASS_CASES = {
    "first_source": ([0], []),
    "first_target": ([], [0]),
    "last_source_and_target": ([5], [4]),
    "several_with_the_first_of_each": ([0, 2, 3], [0, 4]),
    "all_sources_but_one": ([0, 1, 2, 4, 5], []),
}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("reach", [np.inf, 1.0])
@pytest.mark.parametrize("case", list(ZERO_MASS_CASES))
def test_zero_mass_points_carry_no_mass_and_the_rest_matches_pot(
    backend, device, random_problem, dtype, reach, case
):
    n, m, epsilon = 6, 5, 0.1
    cost, a, b = random_problem((3,), n, m, dtype=torch.float64, uniform=False)
    zero_a, zero_b = ZERO_MASS_CASES[case]
    a[1, zero_a] = 0  # only the middle problem: its neighbours must be unaffected too
    b[1, zero_b] = 0
    a, b = a / a.sum(-1, keepdim=True), b / b.sum(-1, keepdim=True)
    if not np.isinf(reach):
        b = 1.7 * b  # unbalanced: unequal masses
    cost, a, b = (t.to(dtype) for t in (cost, a, b))
    if not np.isinf(reach) and backend in ("triton", "cuda"):
        pytest.skip("unbalanced OT is refused there (test_unbalanced_plan_matches_pot)")
    arguments = dict(reg=epsilon, relative_reg=False, backend=backend)
    if not np.isinf(reach):
        arguments["reach"] = reach
    precision = solve_dtype(backend, dtype)
    # The float32 GPU kernels keep f unshifted: with all the mass on one source its f is 20
    # epsilon, whose rounding alone held triton's error at 1.9e-6 (cpu and torch reach 1e-6).
    gpu_float32 = backend in ("triton", "cuda")
    tol = 1e-10 if precision == torch.float64 else 1e-5 if gpu_float32 else 1e-6
    result = eotfast.sinkhorn(
        cost.to(device), a.to(device), b.to(device), tol=tol, max_iter=20_000, **arguments
    )
    result = eotfast.SinkhornResult(*(t.cpu() for t in result))
    f, g = result.f.double(), result.g.double()
    a64, b64 = a.double(), b.double()
    # Finite potentials wherever there is mass (-inf, the convention, only where there is
    # none), and an error that is a number below tol: it read NaN with f = -inf everywhere.
    assert torch.isfinite(f[a > 0]).all(), f
    assert torch.isfinite(g[b > 0]).all(), g
    assert (f[a == 0] == -np.inf).all() and (g[b == 0] == -np.inf).all()
    assert torch.isfinite(result.marginal_error).all(), result.marginal_error
    assert (result.marginal_error < tol).all(), result.marginal_error
    plans = result.plan(cost.double()).double()
    for k in range(3):
        expected = pot_plan_without_zero_mass(cost[k].double(), a64[k], b64[k], epsilon, reach)
        atol = 1e-9 if precision == torch.float64 else 3 * tol
        np.testing.assert_allclose(plans[k].numpy(), expected, atol=atol * expected.max(), rtol=0)
        # The plan's marginals are within the reported error of their targets (a and b, or
        # a e^(-F / rho) and b e^(-G / rho) unbalanced), measured here independently.
        row_target = a64[k] * torch.exp(-(f[k] - epsilon * a64[k].log()) / reach)
        column_target = b64[k] * torch.exp(-(g[k] - epsilon * b64[k].log()) / reach)
        row_target = torch.where(a64[k] > 0, row_target, 0.0)
        column_target = torch.where(b64[k] > 0, column_target, 0.0)
        measured = torch.cat([plans[k].sum(1) - row_target, plans[k].sum(0) - column_target])
        slack = 1e-9 if precision == torch.float64 else 2 * tol
        assert float(measured.norm()) <= float(result.marginal_error[k]) + slack
