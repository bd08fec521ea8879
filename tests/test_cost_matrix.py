"""eotfast.cost_matrix against POT's ot.dist (squared Euclidean), on every backend."""

import numpy as np
import ot
import pytest
import torch

import eotfast

# Relative tolerance (to the largest cost) by the dtype the backend computes in; half inputs
# are compared with the float64 distances of the rounded inputs: products of halves are exact
# in float32, so what remains is float32 accumulation (the Triton kernel keeps float32 dots
# exact, "ieee", and its half dots accumulate in float32).
COST_RTOL = {torch.float64: 1e-12, torch.float32: 1e-5}


def output_dtype(backend, dtype):
    """float64 stays float64 everywhere; the kernels return float32; torch's GEMM keeps
    float32 and computes half inputs in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    "batch,n,m,d", [((), 7, 5, 3), ((), 33, 65, 3072), ((3,), 17, 9, 129), ((2, 2), 4, 6, 10)]
)
def test_cost_matrix_matches_pot_dist(backend, device, dtype, batch, n, m, d):
    x = (torch.rand(*batch, n, d, dtype=torch.float64) * 2 - 1).to(dtype)
    y = (torch.rand(*batch, m, d, dtype=torch.float64) * 2 - 1).to(dtype)
    cost = eotfast.cost_matrix(
        x.to(device), y.to(device), batch_dims=len(batch), backend=backend
    ).cpu()
    assert cost.shape == (*batch, n, m)
    assert cost.dtype == output_dtype(backend, dtype)
    xs, ys = x.double().reshape(-1, n, d), y.double().reshape(-1, m, d)
    for k in range(xs.shape[0]):
        expected = ot.dist(xs[k].numpy(), ys[k].numpy())
        atol = COST_RTOL[cost.dtype] * expected.max()
        np.testing.assert_allclose(
            cost.reshape(-1, n, m)[k].double().numpy(), expected, atol=atol, rtol=0
        )


def test_cost_matrix_broadcasts_leading_dimensions_on_long_features(backend, device):
    # d = 12300: beyond the largest image size of the trainer (64 x 64 x 3), not a multiple
    # of any feature tile; y's batch dimension broadcasts against x's.
    x, y = torch.randn(2, 3, 12_300), torch.randn(1, 4, 12_300)
    cost = eotfast.cost_matrix(x.to(device), y.to(device), batch_dims=1, backend=backend).cpu()
    assert cost.shape == (2, 3, 4)
    for k in range(2):
        expected = ot.dist(x[k].double().numpy(), y[0].double().numpy())
        np.testing.assert_allclose(cost[k].double().numpy(), expected, rtol=1e-5)


def test_cost_matrix_is_zero_on_identical_points_and_never_negative(backend, device):
    x = torch.randn(50, 3072).to(device)
    cost = eotfast.cost_matrix(x, x, backend=backend).cpu()
    assert (cost >= 0).all()
    assert cost.diagonal().max() <= 1e-4 * cost.max()


def test_points_far_from_the_origin_keep_their_distances(backend, device):
    # Around 1e5 the GEMM form |x|^2 + |y|^2 - 2 x.y cancels in float32 (each term ~1e11,
    # the distances ~1..100): centring the batches keeps them.
    generator = torch.Generator().manual_seed(3)
    x = 1e5 + torch.randn(12, 16, generator=generator, dtype=torch.float64)
    perm = torch.randperm(12, generator=generator)
    y = x[perm] + 0.01 * torch.randn(12, 16, generator=generator, dtype=torch.float64)
    cost = eotfast.cost_matrix(x.float().to(device), y.float().to(device), backend=backend).cpu()
    expected = ot.dist((x.float().double() - 1e5).numpy(), (y.float().double() - 1e5).numpy())
    np.testing.assert_allclose(cost.double().numpy(), expected, atol=1e-3 * expected.max())
    # ... and the exact pairs find the permutation back.
    partners = eotfast.pair(x.float().to(device), y.float().to(device), "exact", backend=backend)
    assert torch.equal(partners.cpu(), torch.argsort(perm))
