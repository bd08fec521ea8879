"""Triton backend (kernels/) against POT, closed forms and the torch reference.

Without a GPU the kernels run through Triton's interpreter on CPU tensors (conftest.py sets
TRITON_INTERPRET=1): sizes stay small because the interpreter is slow. With a GPU the same
tests run on CUDA tensors, and the GPU-only tests at the end run too.
"""

import os
import subprocess
import sys

import numpy as np
import ot
import pytest
import torch

import eotfast
from eotfast._backends import triton_runs_on

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
pytestmark = pytest.mark.skipif(
    not triton_runs_on(DEVICE), reason="Triton cannot run here (no GPU and no interpreter)"
)
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

# dtype of the points -> tolerance on the cost, relative to the largest cost. Half inputs are
# compared with the float64 distances of the rounded inputs: products of halves are exact in
# float32, so what remains is float32 accumulation (and TF32-free float32 dots: "ieee").
COST_RTOL = {torch.float32: 1e-5, torch.float16: 1e-5, torch.bfloat16: 1e-5}
# Potentials after a fixed number of float32 iterations, relative to the largest cost.
POTENTIAL_ATOL = 2e-4


@pytest.fixture(
    params=[
        "one_program",
        pytest.param("four_programs", marks=requires_cuda),  # grid barriers: GPU only
    ]
)
def sinkhorn_path(request):
    """The Sinkhorn launcher with one program per problem (the only schedule the interpreter
    can run), or four programs per problem meeting at grid barriers."""
    from eotfast.kernels.sinkhorn import sinkhorn_log

    programs = {"one_program": 1, "four_programs": 4}[request.param]
    # Small blocks, so that the odd shapes below span several blocks in both directions.
    return lambda *args: sinkhorn_log(*args, programs=programs, block_n=16, block_m=16)


def marginals(batch, n, m, uniform, generator):
    if uniform:
        return torch.full((batch, n), 1 / n), torch.full((batch, m), 1 / m)
    a = torch.rand(batch, n, generator=generator) + 0.1
    b = torch.rand(batch, m, generator=generator) + 0.1
    return a / a.sum(-1, keepdim=True), b / b.sum(-1, keepdim=True)


@pytest.mark.parametrize("dtype", list(COST_RTOL))
@pytest.mark.parametrize("batch,n,m,d", [(1, 5, 7, 3), (2, 33, 17, 70), (3, 16, 16, 64)])
def test_cost_matrix_triton_matches_pot(dtype, batch, n, m, d):
    from eotfast._triton_ops import cost_matrix_triton

    x = torch.randn(batch, n, d).to(dtype)
    y = torch.randn(batch, m, d).to(dtype)
    cost = cost_matrix_triton(x.to(DEVICE), y.to(DEVICE)).cpu()
    assert cost.dtype == torch.float32 and cost.shape == (batch, n, m)
    for k in range(batch):
        expected = ot.dist(x[k].double().numpy(), y[k].double().numpy())
        np.testing.assert_allclose(
            cost[k].double().numpy(), expected, rtol=0, atol=COST_RTOL[dtype] * expected.max()
        )


def test_cost_matrix_triton_long_features():
    # d = 12300: beyond the largest image size of the trainer (64 x 64 x 3), not a multiple
    # of the tile; broadcast leading dimensions through the public function.
    x, y = torch.randn(2, 3, 12_300), torch.randn(1, 4, 12_300)
    cost = eotfast.cost_matrix(x.to(DEVICE), y.to(DEVICE), backend="triton").cpu()
    for k in range(2):
        expected = ot.dist(x[k].double().numpy(), y[0].double().numpy())
        np.testing.assert_allclose(cost[k].double().numpy(), expected, rtol=1e-5)


@pytest.mark.parametrize("batch,n,m", [(1, 7, 5), (2, 33, 18)])
@pytest.mark.parametrize("uniform", [True, False])
def test_sinkhorn_triton_fixed_iterations_match_pot(sinkhorn_path, batch, n, m, uniform):
    generator = torch.Generator().manual_seed(1)
    cost = torch.rand(batch, n, m, generator=generator) * 4
    a, b = marginals(batch, n, m, uniform, generator)
    epsilon = torch.linspace(0.2, 0.5, batch)
    iters = 10
    f, g, n_iter, error = (
        t.cpu() for t in sinkhorn_path(*(t.to(DEVICE) for t in (cost, a, b, epsilon)), iters, 0.0)
    )
    assert (n_iter == iters).all()
    for k in range(batch):
        plan, log = ot.bregman.sinkhorn_log(
            a[k].double().numpy(),
            b[k].double().numpy(),
            cost[k].double().numpy(),
            float(epsilon[k]),
            numItermax=iters,
            stopThr=0,
            log=True,
            warn=False,
        )
        atol = POTENTIAL_ATOL * float(cost[k].max())
        np.testing.assert_allclose(
            f[k].double().numpy(), float(epsilon[k]) * log["log_u"], atol=atol, rtol=0
        )
        np.testing.assert_allclose(
            g[k].double().numpy(), float(epsilon[k]) * log["log_v"], atol=atol, rtol=0
        )
        # The reported error is that of the returned plan, measured here in float64.
        column_error = np.linalg.norm(plan.sum(0) - b[k].double().numpy())
        assert float(error[k]) == pytest.approx(column_error, rel=1e-3, abs=1e-6)


def test_sinkhorn_triton_stops_per_problem(sinkhorn_path):
    # Problem 0: nearly constant cost, the uniform start is almost optimal (a few
    # iterations); problem 1: a spread-out cost at a small epsilon (many more).
    generator = torch.Generator().manual_seed(2)
    n, m, tol = 19, 21, 1e-5
    cost = torch.stack(
        [0.01 * torch.rand(n, m, generator=generator), 4 * torch.rand(n, m, generator=generator)]
    )
    a, b = marginals(2, n, m, uniform=False, generator=generator)
    epsilon = torch.tensor([0.5, 0.1])
    f, g, n_iter, error = (
        t.cpu() for t in sinkhorn_path(*(t.to(DEVICE) for t in (cost, a, b, epsilon)), 2000, tol)
    )
    assert n_iter[0] < n_iter[1] < 2000, n_iter
    assert (error < tol).all(), error
    for k in range(2):  # check the claim independently: the plan's marginals in float64
        plan = torch.exp(
            (f[k, :, None].double() + g[k, None, :].double() - cost[k].double()) / float(epsilon[k])
        )
        assert torch.allclose(plan.sum(1), a[k].double(), atol=1e-5)
        assert torch.linalg.vector_norm(plan.sum(0) - b[k].double()) < 1.5 * tol


def test_sinkhorn_triton_agrees_with_torch_reference_on_batched_api():
    generator = torch.Generator().manual_seed(3)
    cost = torch.rand(3, 12, 9, generator=generator, dtype=torch.float64) * 100 + 50
    ours = eotfast.sinkhorn(cost.to(DEVICE), reg=0.05, tol=1e-5, backend="triton")
    reference = eotfast.sinkhorn(cost, reg=0.05, tol=1e-5, backend="torch")
    assert ours.f.dtype == torch.float64  # solved in float32, returned in the input's dtype
    assert (ours.n_iter.cpu() - reference.n_iter).abs().max() <= 2
    assert (ours.marginal_error.cpu() < 1e-5).all()
    assert torch.allclose(ours.plan(cost.to(DEVICE)).cpu(), reference.plan(cost), atol=2e-5)


def test_sinkhorn_triton_small_epsilon_is_finite_and_near_exact():
    # epsilon = 0.01 * std on a d = 32 point cloud: exp(-C / eps) underflows in float32 for
    # most entries (C / eps ~ 100..300); the log domain keeps it finite.
    x, y = torch.randn(10, 32), torch.randn(10, 32)
    cost = eotfast.cost_matrix(x, y).to(DEVICE)
    assert (torch.exp(-cost / (0.01 * cost.std())) == 0).float().mean() > 0.5
    result = eotfast.sinkhorn(cost, reg=0.01, tol=1e-3, max_iter=1000, backend="triton")
    assert torch.isfinite(result.f).all() and torch.isfinite(result.g).all()
    assert float(result.marginal_error) < 1e-3
    plan = result.plan(cost).cpu().double()
    exact = ot.emd2(np.full(10, 0.1), np.full(10, 0.1), cost.cpu().double().numpy())
    assert float((plan * cost.cpu().double()).sum()) == pytest.approx(exact, rel=5e-3)


def test_pair_sample_triton_frequencies_match_plan_rows():
    # 4000 identical rows: each draw is independent (Philox counter per row), so the
    # frequencies estimate the row's distribution softmax((g - C) / eps), a closed form.
    from eotfast._triton_ops import pair_sample_triton

    rows, m = 4000, 6
    generator = torch.Generator().manual_seed(4)
    row_cost = torch.rand(m, generator=generator)
    cost = row_cost.expand(1, rows, m).contiguous()
    g = torch.rand(1, m, generator=generator) * 0.5
    epsilon = torch.tensor([0.3])
    expected = torch.softmax((g[0] - row_cost) / epsilon, dim=0)
    seed = torch.tensor([1234], device=DEVICE)
    drawn = pair_sample_triton(cost.to(DEVICE), g.to(DEVICE), epsilon.to(DEVICE), seed, True).cpu()
    frequencies = torch.bincount(drawn.flatten(), minlength=m).double() / rows
    total_variation = 0.5 * (frequencies - expected.double()).abs().sum()
    # Expected TV of 4000 draws over 6 outcomes is ~0.015; 0.04 leaves a wide margin yet
    # fails for any bias of the size of one outcome's probability.
    assert total_variation < 0.04, (frequencies, expected)


def assert_partners_are_row_maxima(partners, x, y):
    """Each partner has the largest plan weight of its row, up to float32 rounding, in the
    torch reference's plan: ties may pick either column, so the indices are not compared."""
    cost = eotfast.cost_matrix(x.double(), y.double())
    result = eotfast.sinkhorn(cost, backend="torch", tol=1e-9, max_iter=5000)
    log_weights = (result.g[..., None, :] - cost) / result.epsilon[..., None, None]
    chosen = log_weights.gather(-1, partners.cpu()[..., None]).squeeze(-1)
    best = log_weights.amax(-1)
    assert (best - chosen <= 1e-3 * best.abs().clamp_min(1)).all(), (best - chosen).max()


def test_pair_triton_end_to_end_matches_torch_backend():
    x, y = torch.randn(2, 20, 50), torch.randn(2, 23, 50)
    ours = eotfast.pair(x.to(DEVICE), y.to(DEVICE), backend="triton", sampling="argmax")
    assert_partners_are_row_maxima(ours, x, y)

    def draw(seed):
        generator = torch.Generator(DEVICE).manual_seed(seed)
        return eotfast.pair(x.to(DEVICE), y.to(DEVICE), backend="triton", generator=generator)

    assert torch.equal(draw(5), draw(5))
    assert not torch.equal(draw(5), draw(6))
    assert draw(5).shape == (2, 20) and draw(5).dtype == torch.int64


def test_triton_ops_pass_opcheck():
    from eotfast import _triton_ops

    x, y = torch.randn(2, 5, 8, device=DEVICE), torch.randn(2, 6, 8, device=DEVICE)
    cost = torch.rand(2, 5, 6, device=DEVICE)
    a, b = torch.full((2, 5), 0.2, device=DEVICE), torch.full((2, 6), 1 / 6, device=DEVICE)
    epsilon = torch.tensor([0.3, 0.4], device=DEVICE)
    seed = torch.tensor([7], device=DEVICE)
    # The kernels' outputs are not differentiable; opcheck tests schema and fake tensors.
    tests = ("test_schema", "test_faketensor")
    torch.library.opcheck(_triton_ops.cost_matrix_triton, (x, y), test_utils=tests)
    torch.library.opcheck(
        _triton_ops.sinkhorn_triton, (cost, a, b, epsilon, 5, 0.0), test_utils=tests
    )
    torch.library.opcheck(
        _triton_ops.pair_sample_triton, (cost, b, epsilon, seed, True), test_utils=tests
    )


def test_sinkhorn_triton_stops_inside_one_launch_whatever_max_iter():
    # One launch runs every round: a problem that converges in a few iterations returns
    # after them even with max_iter = 10^6 (the interpreter would take hours for 10^6 rounds).
    cost = torch.rand(1, 6, 5).to(DEVICE)
    result = eotfast.sinkhorn(cost, reg=1.0, tol=1e-6, max_iter=1_000_000, backend="triton")
    assert int(result.n_iter) < 100 and float(result.marginal_error) < 1e-6


@pytest.mark.parametrize(
    "op,args,name",
    [
        ("sinkhorn_triton", ("float64", "a"), "a"),
        ("sinkhorn_triton", ("float64", "cost"), "cost"),
        ("pair_sample_triton", ("float16", "g"), "g"),
        ("cost_matrix_triton", ("float64", "x"), "x"),
    ],
)
def test_triton_ops_reject_dtypes_they_do_not_take_eager_and_fake(op, args, name):
    # The kernels read each pointer with the dtype they were compiled for, and the fakes
    # promise float32 / int64 outputs: both the op and its fake reject other dtypes.
    from torch._subclasses.fake_tensor import FakeTensorMode

    from eotfast import _triton_ops

    dtype, bad = getattr(torch, args[0]), args[1]

    def inputs():
        values = dict(
            cost=torch.rand(2, 5, 6, device=DEVICE), a=torch.full((2, 5), 0.2, device=DEVICE),
            b=torch.full((2, 6), 1 / 6, device=DEVICE),
            epsilon=torch.tensor([0.3, 0.4], device=DEVICE),
            g=torch.zeros(2, 6, device=DEVICE), seed=torch.tensor([7], device=DEVICE),
            x=torch.randn(2, 5, 8, device=DEVICE), y=torch.randn(2, 6, 8, device=DEVICE),
        )  # fmt: skip
        values[bad] = values[bad].to(dtype)
        if op == "sinkhorn_triton":
            return (values["cost"], values["a"], values["b"], values["epsilon"], 5, 0.0)
        if op == "pair_sample_triton":
            return (values["cost"], values["g"], values["epsilon"], values["seed"], True)
        return (values["x"], values["x"].new_empty(2, 6, 8).normal_())

    function = getattr(_triton_ops, op)
    with pytest.raises(TypeError, match=f"{name} must be"):
        function(*inputs())
    with FakeTensorMode() as mode, pytest.raises(TypeError, match=f"{name} must be"):
        function(*(mode.from_tensor(t) if isinstance(t, torch.Tensor) else t for t in inputs()))


def test_triton_launches_put_the_batch_on_the_unbounded_grid_axis(monkeypatch):
    # CUDA allows 2^31 - 1 programs on grid axis 0 but 65535 on axes 1 and 2: a batch of
    # 100,000 problems must fit, and a grid over the limits must be refused with a message.
    from eotfast.kernels import _launch
    from eotfast.kernels.cost_matrix import cost_matrix_triton
    from eotfast.kernels.pair_sampling import pair_sample_triton
    from eotfast.kernels.sinkhorn import sinkhorn_log

    grids = []
    monkeypatch.setattr(_launch, "wrap_triton", lambda kernel: _GridRecorder(grids))
    batch = 100_000
    meta = lambda *shape, dtype=torch.float32: torch.empty(*shape, dtype=dtype, device="meta")  # noqa: E731
    cost_matrix_triton(meta(batch, 3, 4), meta(batch, 5, 4))
    sinkhorn_log(meta(batch, 3, 5), meta(batch, 3), meta(batch, 5), meta(batch), 10, 1e-4)
    pair_sample_triton(
        meta(batch, 3, 5), meta(batch, 5), meta(batch), meta(1, dtype=torch.int64), True
    )
    assert [grid[0] for grid in grids] == [batch] * 3, grids
    with pytest.raises(ValueError, match="exceeds the CUDA limits"):
        pair_sample_triton(
            meta(1, 65536 * 32 + 1, 2), meta(1, 2), meta(1), meta(1, dtype=torch.int64), True
        )


class _GridRecorder:
    """Stands in for wrap_triton(kernel): records the grid, launches nothing."""

    def __init__(self, grids):
        self.grids = grids

    def __getitem__(self, grid):
        self.grids.append(grid)
        return lambda *args, **kwargs: None


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU error without a GPU")
def test_triton_backend_on_cpu_without_interpreter_names_cpu_backend():
    code = "import torch, eotfast\neotfast.sinkhorn(torch.rand(3, 3), backend='triton')\n"
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    completed = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert completed.returncode != 0
    assert "backend='cpu'" in completed.stderr and "TRITON_INTERPRET" in completed.stderr


# ----------------------------------------------------------------------------- GPU only
@requires_cuda
@pytest.mark.parametrize("n,m,batch", [(64, 64, 8), (500, 700, 1), (1024, 1024, 2)])
def test_triton_matches_torch_backend_on_cuda(n, m, batch):
    x = torch.randn(batch, n, 3072, device="cuda")
    y = torch.randn(batch, m, 3072, device="cuda")
    cost = eotfast.cost_matrix(x, y, backend="torch")
    assert torch.allclose(eotfast.cost_matrix(x, y, backend="triton"), cost, rtol=1e-5, atol=1e-2)
    ours = eotfast.sinkhorn(cost, tol=1e-4, backend="triton")
    reference = eotfast.sinkhorn(cost, tol=1e-4, backend="torch")
    assert (ours.marginal_error < 1e-4).all()
    assert (ours.n_iter - reference.n_iter).abs().max() <= 2
    assert torch.allclose(ours.plan(cost), reference.plan(cost), atol=1e-6)


@requires_cuda
def test_pair_triton_has_no_host_sync():
    x, y = torch.randn(256, 3072, device="cuda"), torch.randn(256, 3072, device="cuda")
    eotfast.pair(x, y, backend="triton")  # compile the kernels outside the check
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        j = eotfast.pair(x, y, backend="triton")
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert j.shape == (256,)


@requires_cuda
def test_pair_triton_captures_in_cuda_graph():
    x, y = torch.randn(128, 768, device="cuda"), torch.randn(128, 768, device="cuda")
    eotfast.pair(x, y, backend="triton", sampling="argmax")  # warm-up compiles the kernels
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        j = eotfast.pair(x, y, backend="triton", sampling="argmax")
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.cuda.synchronize()
    assert_partners_are_row_maxima(j, x.cpu(), y.cpu())


@requires_cuda
def test_compiled_step_calling_pair_triton_has_no_graph_break():
    def step(x, y):
        j = eotfast.pair(x.flatten(1), y.flatten(1), backend="triton")
        return (x - y[j]).square().mean()

    x, y = torch.randn(64, 3, 16, 16, device="cuda"), torch.randn(64, 3, 16, 16, device="cuda")
    explanation = torch._dynamo.explain(step)(x, y)
    assert explanation.graph_break_count == 0
    compiled = torch.compile(step, fullgraph=True)
    assert torch.isfinite(compiled(x, y))


@requires_cuda
@pytest.mark.parametrize("n,m,batch", [(1024, 1024, 1), (700, 500, 3), (4096, 4096, 1)])
def test_sinkhorn_triton_programs_agree_and_repeat_bitwise_on_cuda(n, m, batch):
    # The grid barrier's hand-overs (partials, new g, f) between the programs of a problem:
    # every split must reach the reference's fixed point, and a split must give the same bits
    # on every run (a missing barrier shows as results that move from run to run).
    from eotfast.kernels._launch import multiprocessor_count
    from eotfast.kernels.sinkhorn import sinkhorn_log

    x = torch.randn(batch, n, 3072, device="cuda")
    y = torch.randn(batch, m, 3072, device="cuda") + 0.1
    cost = eotfast.cost_matrix(x, y, backend="torch")
    cost = cost - cost.amin(dim=(-2, -1), keepdim=True)
    epsilon = 0.05 * cost.flatten(1).std(dim=1)
    a = torch.full((batch, n), 1 / n, device="cuda")
    b = torch.full((batch, m), 1 / m, device="cuda")
    reference = eotfast.sinkhorn(cost, reg=0.05, tol=1e-4, backend="torch")
    sms = multiprocessor_count(torch.device("cuda"))
    for programs in sorted({1, 2, 7, 16, sms // batch}):
        first = sinkhorn_log(cost, a, b, epsilon, 2000, 1e-4, programs=programs)
        assert (first[3] < 1e-4).all(), (programs, first[3])
        assert (first[2] - reference.n_iter).abs().max() <= 2, (programs, first[2])
        plan = torch.exp(
            (first[0][:, :, None] + first[1][:, None, :] - cost) / epsilon[:, None, None]
        )
        assert torch.allclose(plan, reference.plan(cost), atol=1e-6), programs
        for _ in range(10):
            again = sinkhorn_log(cost, a, b, epsilon, 2000, 1e-4, programs=programs)
            for one, other in zip(first, again, strict=True):
                assert torch.equal(one, other), f"programs={programs}: results move between runs"
