"""eotfast.sinkhorn_divergence against POT (values: ot.solve_sample and the primal of
ot.unbalanced.sinkhorn_unbalanced's plan; gradients: POT's envelope gradients) and against
finite differences (torch.autograd.gradcheck), on every backend."""

import math

import numpy as np
import ot
import pytest
import torch
from oracles import solve_dtype

import eotfast

# |ours - POT's| / max(1, |POT's|) on converged problems, by the dtype the backend solves in.
VALUE_RTOL = {torch.float64: 1e-9, torch.float32: 2e-4}
CONVERGED = {torch.float64: 1e-12, torch.float32: 1e-6}  # tol of the solves


def clouds(n, m, d=3, batch=(), dtype=torch.float64, seed=0):
    """Two point clouds [*batch, n, d] and [*batch, m, d], shifted and shrunk apart."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(*batch, n, d, generator=gen, dtype=dtype)
    y = 0.7 * torch.randn(*batch, m, d, generator=gen, dtype=dtype) + 0.5
    return x, y


def weights(size, mass=1.0, seed=1, dtype=torch.float64):
    w = torch.rand(size, generator=torch.Generator().manual_seed(seed), dtype=dtype) + 0.2
    return mass * w / w.sum()


def kl(p, q) -> float:
    return float(np.sum(p * np.log(p / q) - p + q))


def pot_ot(x, y, a, b, epsilon, rho=None) -> float:
    """The oracle: OT_epsilon(a, b) = min <P, C> + eps KL(P | a b^T) (+ rho KL(P 1 | a) +
    rho KL(P^T 1 | b)), C the squared distances, the primal of POT's plan in float64
    (ot.sinkhorn's log-domain solver, or ot.unbalanced.sinkhorn_unbalanced, to 1e-14)."""
    x, y, a, b = (t.double().numpy() for t in (x, y, a, b))
    cost = ot.dist(x, y)
    if rho is None:
        b = b * (a.sum() / b.sum())  # float32 weights' masses differ in float64's last digits
        plan = ot.sinkhorn(
            a, b, cost, epsilon, method="sinkhorn_log", stopThr=1e-14, numItermax=100_000
        )
        return float((plan * cost).sum()) + epsilon * kl(plan, np.outer(a, b))
    plan = ot.unbalanced.sinkhorn_unbalanced(
        a, b, cost, epsilon, rho, reg_type="kl", stopThr=1e-15, numItermax=100_000
    )
    return (
        float((plan * cost).sum())
        + epsilon * kl(plan, np.outer(a, b))
        + rho * kl(plan.sum(1), a)
        + rho * kl(plan.sum(0), b)
    )


def pot_divergence(x, y, a, b, epsilon, rho=None, debias=True) -> float:
    value = pot_ot(x, y, a, b, epsilon, rho)
    if not debias:
        return value
    mass_gap = float(a.sum() - b.sum())
    return (
        value
        - pot_ot(x, x, a, a, epsilon, rho) / 2
        - pot_ot(y, y, b, b, epsilon, rho) / 2
        + epsilon / 2 * mass_gap**2
    )


def unbalanced_refused(backend, call):
    """The GPU kernels solve balanced problems only: a reach is an error naming it."""
    with pytest.raises(ValueError, match="reach .unbalanced OT. is not implemented"):
        call()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("n,m", [(13, 13), (17, 11)])  # n = m: one batched solve of three
@pytest.mark.parametrize("reach", [None, 1.5])
@pytest.mark.parametrize("debias", [True, False])
def test_value_matches_pot(request, backend, device, dtype, n, m, reach, debias):
    if "interpreter" in request.keywords and (n, m, debias, dtype) != (13, 13, True, torch.float32):
        pytest.skip("the interpreter runs one balanced case and the refusal (a GPU runs all)")
    x, y = clouds(n, m, dtype=dtype)
    a, b = weights(n, dtype=dtype), weights(m, 1.0 if reach is None else 1.6, dtype=dtype)
    epsilon = 1.0  # POT's plain iteration converges slowly on the self terms below it

    def call():
        return eotfast.sinkhorn_divergence(
            x.to(device), y.to(device), a.to(device), b.to(device), reg=epsilon,
            relative_reg=False, reach=reach, debias=debias, tol=CONVERGED[precision],
            max_iter=100_000, backend=backend, return_result=True,
        )  # fmt: skip

    precision = solve_dtype(backend, dtype)
    if reach is not None and backend in ("triton", "cuda"):
        return unbalanced_refused(backend, call)
    result = call()
    expected = pot_divergence(x, y, a, b, epsilon, reach, debias)
    assert result.value.shape == ()
    assert result.value.dtype == dtype
    assert abs(float(result.value) - expected) <= VALUE_RTOL[precision] * max(1, abs(expected))
    assert float(result.marginal_error) < CONVERGED[precision]
    assert float(result.epsilon) == pytest.approx(epsilon)


@pytest.mark.parametrize("relative_reg", [True, False])
def test_relative_reg_is_relative_to_the_cross_costs_spread(relative_reg):
    x, y = clouds(20, 15)
    reg = 0.3 if relative_reg else 1.0
    result = eotfast.sinkhorn_divergence(
        x, y, reg=reg, relative_reg=relative_reg, tol=1e-12, max_iter=10**5, return_result=True
    )
    cost = ot.dist(x.numpy(), y.numpy())
    epsilon = reg * cost.std() if relative_reg else reg
    assert float(result.epsilon) == pytest.approx(epsilon, rel=1e-9)
    expected = pot_divergence(x, y, weights(20) * 0 + 1 / 20, weights(15) * 0 + 1 / 15, epsilon)
    assert float(result.value) == pytest.approx(expected, rel=1e-9)


def test_gradient_matches_pots_envelope_gradient(backend, device):
    # POT's ot.solve_sample(grad="envelope"): the gradient of <P, C> + eps KL at the plan, by
    # autograd through the cost with the plan held fixed.
    x, y = clouds(25, 18, dtype=torch.float32 if backend in ("triton", "cuda") else torch.float64)
    x64 = x.double().requires_grad_()
    expected = ot.solve_sample(
        x64, y.double(), reg=0.5, metric="sqeuclidean", grad="envelope", max_iter=10**5,
        tol=1e-14,
    ).value  # fmt: skip
    expected.backward()
    xs = x.to(device).requires_grad_()
    value = eotfast.sinkhorn_divergence(
        xs, y.to(device), reg=0.5, relative_reg=False, debias=False, backend=backend,
        tol=CONVERGED[solve_dtype(backend, x.dtype)], max_iter=10**5,
    )  # fmt: skip
    value.backward()
    atol = 1e-10 if x.dtype == torch.float64 else 2e-5
    np.testing.assert_allclose(xs.grad.cpu().double(), x64.grad, atol=atol)


@pytest.mark.parametrize("backend", ["torch", "cpu"])
@pytest.mark.parametrize("reach", [None, 0.7])
@pytest.mark.parametrize("debias", [True, False])
@pytest.mark.parametrize("n,m", [(6, 6), (7, 5)])
def test_gradcheck_against_finite_differences(backend, reach, debias, n, m):
    # Envelope gradients of the converged value, in x, y and (unbalanced: masses free) a, b.
    x, y = clouds(n, m, d=2)
    a, b = weights(n, 1.0), weights(m, 1.0 if reach is None else 1.3)
    inputs = [x.requires_grad_(), y.requires_grad_()]
    if reach is not None:
        inputs += [a.requires_grad_(), b.requires_grad_()]

    def divergence(x, y, a=a, b=b):
        return eotfast.sinkhorn_divergence(
            x, y, a, b, reg=0.5, relative_reg=False, reach=reach, debias=debias, tol=1e-14,
            max_iter=10**5, backend=backend,
        )  # fmt: skip

    assert torch.autograd.gradcheck(divergence, inputs, eps=1e-6, atol=1e-6, rtol=1e-5)


def test_balanced_weight_gradient_along_mass_preserving_directions():
    # Balanced, a alone cannot move (masses must stay equal): the gradient's component along
    # any zero-sum direction is the derivative of the value, by finite differences.
    x, y = clouds(8, 6, d=2)
    a, b = weights(8), weights(6)
    a.requires_grad_()
    options = dict(reg=0.5, relative_reg=False, tol=1e-14, max_iter=10**5)
    eotfast.sinkhorn_divergence(x, y, a, b, **options).backward()
    direction = torch.randn(8, dtype=torch.float64)
    direction -= direction.mean()
    h = 1e-6
    with torch.no_grad():
        up = eotfast.sinkhorn_divergence(x, y, a + h * direction, b, **options)
        down = eotfast.sinkhorn_divergence(x, y, a - h * direction, b, **options)
    assert float(a.grad @ direction) == pytest.approx(float(up - down) / (2 * h), rel=1e-6)


def test_divergence_is_zero_on_equal_measures_and_positive_otherwise(backend, device):
    x, y = clouds(12, 12, dtype=torch.float32)
    precision = solve_dtype(backend, torch.float32)
    # epsilon 1: the self problems converge in ~90 iterations (at 0.2, in 26,000).
    options = dict(reg=1.0, relative_reg=False, tol=1e-6, backend=backend)
    same = eotfast.sinkhorn_divergence(x.to(device), x.to(device), **options)
    apart = eotfast.sinkhorn_divergence(x.to(device), y.to(device), **options)
    assert abs(float(same)) < (1e-5 if precision == torch.float32 else 1e-10)
    assert float(apart) > 0.1


def test_batched_problems_stop_on_their_own_with_the_values_of_single_calls(backend, device):
    # Three problems of different difficulty (the same clouds at three scales, the same
    # absolute epsilon): each stops at its own iteration count and equals its solo value.
    x, y = clouds(10, 8)
    scales = torch.tensor([0.5, 1.0, 1.5], dtype=torch.float64)[:, None, None]
    xs, ys = scales * x, scales * y  # [3, n, d], [3, m, d]
    dtype = torch.float32 if backend in ("triton", "cuda") else torch.float64
    options = dict(
        reg=2.0, relative_reg=False, tol=CONVERGED[dtype] * 10, max_iter=10**4, backend=backend
    )
    batched = eotfast.sinkhorn_divergence(
        xs.to(device, dtype), ys.to(device, dtype), batch_dims=1, return_result=True, **options
    )
    assert batched.value.shape == (3,) and batched.f.shape == (3, 10)
    assert len(set(batched.n_iter.tolist())) == 3, batched.n_iter
    for k in range(3):
        solo = eotfast.sinkhorn_divergence(
            xs[k].to(device, dtype), ys[k].to(device, dtype), return_result=True, **options
        )
        assert float(batched.value[k]) == pytest.approx(float(solo.value), rel=1e-5, abs=1e-6)
        assert int(batched.n_iter[k]) == int(solo.n_iter)


def test_inputs_follow_the_samples_first_contract():
    # Images [n, C, H, W] are n samples of d = C H W; batch_dims=1 reads independent problems,
    # and batch dimensions broadcast (one target cloud for every problem).
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(6, 2, 3, 3, generator=gen, dtype=torch.float64)
    y = torch.randn(5, 2, 3, 3, generator=gen, dtype=torch.float64)
    options = dict(reg=0.1, tol=1e-12, max_iter=10**5)
    flat = eotfast.sinkhorn_divergence(x.flatten(1), y.flatten(1), **options)
    assert float(eotfast.sinkhorn_divergence(x, y, **options)) == pytest.approx(float(flat))
    batched = eotfast.sinkhorn_divergence(torch.stack([x, 2 * x]), y[None], batch_dims=1, **options)
    assert batched.shape == (2,)
    assert float(batched[0]) == pytest.approx(float(flat), rel=1e-9)
    with pytest.raises(ValueError, match="pass batch_dims=1"):
        eotfast.sinkhorn_divergence(torch.stack([x, x]), torch.stack([y, y]))


def test_plan_and_potentials_come_from_the_same_solve():
    x, y = clouds(9, 7)
    a, b = weights(9), weights(7)
    result = eotfast.sinkhorn_divergence(
        x, y, a, b, reg=0.5, relative_reg=False, debias=False, tol=1e-13, max_iter=10**5,
        return_result=True, return_plan=True,
    )  # fmt: skip
    expected = ot.sinkhorn(a.numpy(), b.numpy(), ot.dist(x.numpy(), y.numpy()), 0.5,
                           stopThr=1e-14, numItermax=10**5)  # fmt: skip
    np.testing.assert_allclose(result.plan.numpy(), expected, atol=1e-12)
    # GeomLoss's convention: P = a_i b_j exp((f_i + g_j - C_ij) / epsilon).
    cost = torch.cdist(x, y) ** 2
    rebuilt = a[:, None] * b[None, :] * torch.exp((result.f[:, None] + result.g - cost) / 0.5)
    np.testing.assert_allclose(rebuilt.numpy(), expected, atol=1e-10)


def test_compiled_fullgraph_matches_eager():
    x, y = clouds(16, 12, dtype=torch.float32)

    def loss(x, y):
        return eotfast.sinkhorn_divergence(x, y, reg=0.2, relative_reg=False, tol=1e-5)

    xe = x.clone().requires_grad_()
    eager = loss(xe, y)
    eager.backward()
    xc = x.clone().requires_grad_()
    compiled = torch.compile(loss, fullgraph=True)(xc, y)
    compiled.backward()
    assert float(compiled) == pytest.approx(float(eager), rel=1e-6)
    torch.testing.assert_close(xc.grad, xe.grad, rtol=1e-4, atol=1e-5)


def test_a_gradient_flow_moves_one_cloud_onto_the_other():
    # The README's example: gradient steps on S(x, y) in x bring x onto y.
    x, y = clouds(40, 30)
    x.requires_grad_()
    start = float(eotfast.sinkhorn_divergence(x, y, reg=0.01, relative_reg=False))
    for _ in range(60):
        loss = eotfast.sinkhorn_divergence(x, y, reg=0.01, relative_reg=False)
        (grad,) = torch.autograd.grad(loss, x)
        with torch.no_grad():
            x -= 0.5 * grad * x.shape[0]  # a step per point: the gradient carries 1/n
    end = float(eotfast.sinkhorn_divergence(x, y, reg=0.01, relative_reg=False))
    assert end < 0.05 * start, (start, end)


@pytest.mark.parametrize(
    "change,match",
    [
        (dict(x=torch.full((5, 2), math.nan)), "x contains NaN"),
        (dict(y=torch.zeros(4, 3)), "x and y must have samples of the same shape"),
        (dict(a=-torch.ones(5) / 5), "a must be nonnegative"),
        (dict(b=torch.ones(3) / 3), r"b must have shape \(4,\)"),
        (dict(b=torch.ones(4)), "a and b must have the same total mass"),
        (dict(reach=0.0), "reach must be None .balanced OT. or a number > 0"),
        (dict(reg=-1.0), "reg must be a finite number > 0"),
        (dict(debias=1), "debias must be a bool"),
    ],
)
def test_bad_input_gets_an_error_naming_it(change, match):
    arguments = dict(x=torch.randn(5, 2), y=torch.randn(4, 2), a=None, b=None) | change
    with pytest.raises((ValueError, TypeError), match=match):
        eotfast.sinkhorn_divergence(**arguments)
