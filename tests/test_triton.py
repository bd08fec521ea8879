"""What is specific to the Triton backend (kernels/): the programs-per-problem split of the
Sinkhorn kernel, the ops' dtype checks and fakes, launch grids, the CPU error, and on a GPU:
no host sync, CUDA graphs, torch.compile. The ops themselves are tested against POT on every
backend in test_cost_matrix.py, test_sinkhorn.py and test_draw_partners.py.

Without a GPU the kernels run through Triton's interpreter on CPU tensors (conftest.py sets
TRITON_INTERPRET=1): sizes stay small because the interpreter is slow.
"""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from oracles import assert_partners_are_row_maxima, marginals, pot_emd2, pot_sinkhorn_log

import eotfast
from eotfast.ops.registry import triton_runs_on

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
pytestmark = pytest.mark.skipif(
    not triton_runs_on(DEVICE), reason="Triton cannot run here (no GPU and no interpreter)"
)
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@requires_cuda
@pytest.mark.parametrize("batch,n,m", [(1, 7, 5), (2, 33, 18), (3, 100, 70)])
def test_sinkhorn_four_programs_per_problem_match_pot_on_cuda(batch, n, m):
    # Four programs share each problem (grid barriers between the sweeps); 16 x 16 blocks,
    # so that these odd shapes span several blocks in both directions.
    from eotfast.kernels.sinkhorn import launch_sinkhorn

    generator = torch.Generator().manual_seed(1)
    cost = torch.rand(batch, n, m, generator=generator, dtype=torch.float64) * 4
    a, b = marginals((batch,), n, m, generator=generator)
    epsilon = torch.linspace(0.2, 0.5, batch, dtype=torch.float64)
    inputs = [t.float().cuda() for t in (cost, a, b, epsilon)]
    f, g, n_iter, _ = (t.cpu() for t in launch_sinkhorn(*inputs, 10, 0.0, programs=4,
                                                        block_n=16, block_m=16))  # fmt: skip
    assert (n_iter == 10).all()
    for k in range(batch):
        _, f_pot, g_pot, _ = pot_sinkhorn_log(cost[k], a[k], b[k], float(epsilon[k]),
                                              numItermax=10, stopThr=0)  # fmt: skip
        np.testing.assert_allclose(f[k].double().numpy(), f_pot, atol=2e-4 * float(cost[k].max()))
        np.testing.assert_allclose(g[k].double().numpy(), g_pot, atol=2e-4 * float(cost[k].max()))


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
    exact = pot_emd2(cost)
    assert float((plan * cost.cpu().double()).sum()) == pytest.approx(exact, rel=5e-3)


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
        ("draw_partners_triton", ("float16", "g"), "g"),
        ("cost_matrix_triton", ("float64", "x"), "x"),
    ],
)
def test_triton_ops_reject_dtypes_they_do_not_take_eager_and_fake(op, args, name):
    # The kernels read each pointer with the dtype they were compiled for, and the fakes
    # promise float32 / int64 outputs: both the op and its fake reject other dtypes.
    from torch._subclasses.fake_tensor import FakeTensorMode

    from eotfast.ops import triton_backend

    dtype, bad = getattr(torch, args[0]), args[1]

    def inputs():
        values = dict(
            cost=torch.rand(2, 5, 6, device=DEVICE), a=torch.full((2, 5), 0.2, device=DEVICE),
            b=torch.full((2, 6), 1 / 6, device=DEVICE),
            epsilon=torch.tensor([0.3, 0.4], device=DEVICE),
            g=torch.zeros(2, 6, device=DEVICE), seed=torch.tensor([7], device=DEVICE),
            x=torch.randn(2, 5, 8, device=DEVICE), y=torch.randn(2, 6, 8, device=DEVICE),
        )  # fmt: skip
        # The whole problem in the other dtype, so that the op's kernel-dtype check speaks
        # (a single mismatched tensor meets the shared "cost's dtype" check first).
        values["epsilon_start"] = values["epsilon"] * 4
        for name in ("cost", "a", "b", "epsilon", "epsilon_start") if bad == "cost" else (bad,):
            values[name] = values[name].to(dtype)
        if op == "sinkhorn_triton":
            return (values["cost"], values["a"], values["b"], values["epsilon"], 5, 0.0,
                    values["epsilon_start"], 0.5, 1.9, float("inf"))  # fmt: skip
        if op == "draw_partners_triton":
            return (values["cost"], values["g"], values["epsilon"], values["seed"], True)
        return (values["x"], values["x"].new_empty(2, 6, 8).normal_())

    function = getattr(triton_backend, op)
    with pytest.raises(TypeError, match=f"{name} must"):
        function(*inputs())
    with FakeTensorMode() as mode, pytest.raises(TypeError, match=f"{name} must"):
        function(*(mode.from_tensor(t) if isinstance(t, torch.Tensor) else t for t in inputs()))


def test_triton_launches_put_the_batch_on_the_unbounded_grid_axis(monkeypatch):
    # CUDA allows 2^31 - 1 programs on grid axis 0 but 65535 on axes 1 and 2: a batch of
    # 100,000 problems must fit, and a grid over the limits must be refused with a message.
    from eotfast.kernels import _launch
    from eotfast.kernels.cost_matrix import launch_cost_matrix
    from eotfast.kernels.draw_partners import launch_draw_partners
    from eotfast.kernels.sinkhorn import launch_sinkhorn

    grids = []
    monkeypatch.setattr(_launch, "wrap_triton", lambda kernel: _GridRecorder(grids))
    batch = 100_000
    meta = lambda *shape, dtype=torch.float32: torch.empty(*shape, dtype=dtype, device="meta")  # noqa: E731
    launch_cost_matrix(meta(batch, 3, 4), meta(batch, 5, 4))
    launch_sinkhorn(meta(batch, 3, 5), meta(batch, 3), meta(batch, 5), meta(batch), 10, 1e-4)
    launch_draw_partners(
        meta(batch, 3, 5), meta(batch, 5), meta(batch), meta(1, dtype=torch.int64), True
    )
    assert [grid[0] for grid in grids] == [batch] * 3, grids
    with pytest.raises(ValueError, match="exceeds the CUDA limits"):
        launch_draw_partners(
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


def assert_same_transport_cost(plan, reference_plan, cost):
    """Plans of one problem solved to marginal error 1e-4 along different iterates (plain
    against accelerated): entries may differ by ~1e-4 of their row's mass, <P, C> by ~1e-4."""
    ours = (plan.double() * cost.double()).sum(dim=(-2, -1))
    theirs = (reference_plan.double() * cost.double()).sum(dim=(-2, -1))
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=0)


# ----------------------------------------------------------------------------- GPU only
@requires_cuda
@pytest.mark.parametrize("n,m,batch", [(64, 64, 8), (500, 700, 1), (1024, 1024, 2)])
def test_triton_matches_torch_backend_on_cuda(n, m, batch):
    x = torch.randn(batch, n, 3072, device="cuda")
    y = torch.randn(batch, m, 3072, device="cuda")
    cost = eotfast.cost_matrix(x, y, batch_dims=1, backend="torch")
    triton_cost = eotfast.cost_matrix(x, y, batch_dims=1, backend="triton")
    assert torch.allclose(triton_cost, cost, rtol=1e-5, atol=1e-2)
    # Plain, the kernel follows the reference's iterates; accelerated (the defaults), the two
    # reach the same fixed point.
    for options in ({"scaling": None}, {}):
        ours = eotfast.sinkhorn(cost, tol=1e-4, backend="triton", **options)
        reference = eotfast.sinkhorn(cost, tol=1e-4, backend="torch", **options)
        assert (ours.marginal_error < 1e-4).all()
        if "scaling" in options:  # plain: the same iterates, the same plan
            assert (ours.n_iter - reference.n_iter).abs().max() <= 2
            assert torch.allclose(ours.plan(cost), reference.plan(cost), atol=1e-6)
        else:  # two plans within 1e-4 of the marginals: the same transport cost to ~1e-4
            assert_same_transport_cost(ours.plan(cost), reference.plan(cost), cost)


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
    assert_partners_are_row_maxima(j.cpu(), x.cpu(), y.cpu())


@requires_cuda
def test_compiled_step_calling_pair_triton_has_no_graph_break():
    def step(x, y):
        j = eotfast.pair(x, y, backend="triton")  # [n]: images are samples first
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
    from eotfast.kernels.sinkhorn import launch_sinkhorn

    x = torch.randn(batch, n, 3072, device="cuda")
    y = torch.randn(batch, m, 3072, device="cuda") + 0.1
    cost = eotfast.cost_matrix(x, y, batch_dims=1, backend="torch")
    cost = cost - cost.amin(dim=(-2, -1), keepdim=True)
    epsilon = 0.05 * cost.flatten(1).std(dim=1)
    a = torch.full((batch, n), 1 / n, device="cuda")
    b = torch.full((batch, m), 1 / m, device="cuda")
    reference = eotfast.sinkhorn(cost, reg=0.05, tol=1e-4, backend="torch", scaling=None)
    # Accelerated: epsilon scaling from the cost's range, over-relaxed at the target; every
    # program must take the same relaxation decisions (they are made on the shared error).
    accelerated = dict(epsilon_start=cost.amax(dim=(-2, -1)), scaling=0.5, relaxation=1.9)
    sms = multiprocessor_count(torch.device("cuda"))
    for programs in sorted({1, 2, 7, 16, sms // batch}):
        for options in ({}, accelerated):
            first = launch_sinkhorn(cost, a, b, epsilon, 2000, 1e-4, programs=programs, **options)
            assert (first[3] < 1e-4).all(), (programs, first[3])
            if not options:
                assert (first[2] - reference.n_iter).abs().max() <= 2, (programs, first[2])
            plan = torch.exp(
                (first[0][:, :, None] + first[1][:, None, :] - cost) / epsilon[:, None, None]
            )
            if options:
                assert_same_transport_cost(plan, reference.plan(cost), cost)
            else:
                assert torch.allclose(plan, reference.plan(cost), atol=1e-6), programs
            for _ in range(10):
                again = launch_sinkhorn(
                    cost, a, b, epsilon, 2000, 1e-4, programs=programs, **options
                )
                for one, other in zip(first, again, strict=True):
                    assert torch.equal(one, other), f"programs={programs}: results move"


def test_float64_cost_beyond_float32_range_is_refused_not_solved_to_nan():
    # The kernels solve in float32: a finite float64 cost of 1e39 would cast to inf and give
    # NaN potentials; on CPU tensors (the interpreter) it is refused with the reason.
    cost = torch.rand(4, 5, dtype=torch.float64) * 1e39
    if DEVICE.type != "cpu":
        pytest.skip("values are checked on CPU tensors only (reading GPU values would sync)")
    with pytest.raises(ValueError, match="beyond float32's range"):
        eotfast.sinkhorn(cost, backend="triton")
