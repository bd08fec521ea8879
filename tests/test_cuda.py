"""Backend "cuda" (csrc/cuda) against POT and the torch reference. Needs a GPU: skipped
without one. The arithmetic it shares with the CPU kernels (csrc/sinkhorn_math.h: exp,
potential updates) is tested against POT on every machine through backend "cpu"
(test_sinkhorn.py); that the module builds and imports is tested in test_build.py."""

import numpy as np
import ot
import pytest
import torch

import eotfast

pytestmark = pytest.mark.skipif(
    not (torch.cuda.is_available() and eotfast.cuda_extension_available()),
    reason="needs a CUDA GPU and the eotfast._cuda module",
)


@pytest.mark.parametrize(
    "dtype,rtol", [(torch.float32, 1e-5), (torch.float16, 1e-5), (torch.bfloat16, 1e-5)]
)
@pytest.mark.parametrize("batch,n,m,d", [(1, 5, 7, 3), (2, 33, 17, 70), (3, 100, 64, 3072)])
def test_cost_matrix_cuda_matches_pot(dtype, rtol, batch, n, m, d):
    x, y = torch.randn(batch, n, d).to(dtype), torch.randn(batch, m, d).to(dtype)
    cost = eotfast.cost_matrix(x.cuda(), y.cuda(), backend="cuda").cpu()
    for k in range(batch):
        expected = ot.dist(x[k].double().numpy(), y[k].double().numpy())
        np.testing.assert_allclose(
            cost[k].double().numpy(), expected, rtol=0, atol=rtol * expected.max()
        )


@pytest.mark.parametrize("batch,n,m", [(1, 7, 5), (2, 33, 18), (4, 300, 257)])
@pytest.mark.parametrize("uniform", [True, False])
def test_sinkhorn_cuda_fixed_iterations_match_pot(batch, n, m, uniform):
    generator = torch.Generator().manual_seed(1)
    cost = torch.rand(batch, n, m, generator=generator) * 4
    if uniform:
        a, b = torch.full((batch, n), 1 / n), torch.full((batch, m), 1 / m)
    else:
        a, b = torch.rand(batch, n) + 0.1, torch.rand(batch, m) + 0.1
        a, b = a / a.sum(-1, keepdim=True), b / b.sum(-1, keepdim=True)
    epsilon = torch.linspace(0.2, 0.5, batch)
    from eotfast._cuda_ops import sinkhorn_cuda

    f, g, n_iter, _ = (
        t.cpu() for t in sinkhorn_cuda(*(t.cuda() for t in (cost, a, b, epsilon)), 10, 0.0)
    )
    assert (n_iter == 10).all()
    for k in range(batch):
        _, log = ot.bregman.sinkhorn_log(
            a[k].double().numpy(),
            b[k].double().numpy(),
            cost[k].double().numpy(),
            float(epsilon[k]),
            numItermax=10,
            stopThr=0,
            log=True,
            warn=False,
        )
        np.testing.assert_allclose(
            f[k].double().numpy(),
            float(epsilon[k]) * log["log_u"],
            atol=2e-4 * float(cost[k].max()),
        )
        np.testing.assert_allclose(
            g[k].double().numpy(),
            float(epsilon[k]) * log["log_v"],
            atol=2e-4 * float(cost[k].max()),
        )


@pytest.mark.parametrize("n,m,batch", [(64, 64, 8), (500, 700, 1)])
def test_cuda_matches_torch_backend(n, m, batch):
    x, y = torch.randn(batch, n, 3072, device="cuda"), torch.randn(batch, m, 3072, device="cuda")
    cost = eotfast.cost_matrix(x, y, backend="torch")
    ours = eotfast.sinkhorn(cost, tol=1e-4, backend="cuda")
    reference = eotfast.sinkhorn(cost, tol=1e-4, backend="torch")
    assert (ours.marginal_error < 1e-4).all()
    assert (ours.n_iter - reference.n_iter).abs().max() <= 2
    assert torch.allclose(ours.plan(cost), reference.plan(cost), atol=1e-6)


def test_sinkhorn_cuda_stops_per_problem():
    n, m, tol = 19, 21, 1e-5
    cost = torch.stack([0.01 * torch.rand(n, m), 4 * torch.rand(n, m)]).cuda()
    result = eotfast.sinkhorn(
        cost, reg=0.05, relative_reg=False, tol=tol, max_iter=5000, backend="cuda"
    )
    assert result.n_iter[0] < result.n_iter[1] < 5000
    assert (result.marginal_error < tol).all()


def test_pair_cuda_has_no_host_sync():
    x, y = torch.randn(256, 3072, device="cuda"), torch.randn(256, 3072, device="cuda")
    eotfast.pair(x, y, backend="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        j = eotfast.pair(x, y, backend="cuda")
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert j.shape == (256,)


def test_cuda_kernels_run_on_the_callers_stream():
    x, y = torch.randn(2, 128, 768, device="cuda"), torch.randn(2, 128, 768, device="cuda")
    expected = eotfast.sinkhorn(eotfast.cost_matrix(x, y, backend="torch"), backend="torch")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        # Slow the stream down first: a kernel on the default stream would read x, y (or
        # write results) before this stream's producer ran, and the results would differ.
        torch.cuda._sleep(50_000_000)
        x2, y2 = x * 1.0, y * 1.0
        cost = eotfast.cost_matrix(x2, y2, backend="cuda")
        result = eotfast.sinkhorn(cost, backend="cuda")
    torch.cuda.current_stream().wait_stream(stream)
    assert torch.allclose(result.f, expected.f, atol=1e-3 * float(cost.max()))
    assert (result.n_iter - expected.n_iter).abs().max() <= 2


def test_cuda_ops_pass_opcheck():
    from eotfast import _cuda_ops

    cost = torch.rand(2, 5, 6, device="cuda")
    a, b = torch.full((2, 5), 0.2, device="cuda"), torch.full((2, 6), 1 / 6, device="cuda")
    epsilon = torch.tensor([0.3, 0.4], device="cuda")
    tests = ("test_schema", "test_faketensor")
    torch.library.opcheck(
        _cuda_ops.cost_matrix_cuda,
        (torch.randn(2, 5, 8, device="cuda"), torch.randn(2, 6, 8, device="cuda")),
        test_utils=tests,
    )
    torch.library.opcheck(_cuda_ops.sinkhorn_cuda, (cost, a, b, epsilon, 5, 0.0), test_utils=tests)
