"""eotfast.cost_matrix against POT's ot.dist (squared Euclidean)."""

import numpy as np
import ot
import pytest
import torch

import eotfast

# Relative tolerance (to the largest cost) of the GEMM form per input dtype; half inputs are
# rounded before the float32 computation.
COST_RTOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


@pytest.mark.parametrize("dtype", list(COST_RTOL))
@pytest.mark.parametrize(
    "batch,n,m,d", [((), 7, 5, 3), ((), 33, 65, 3072), ((3,), 17, 9, 129), ((2, 2), 4, 6, 10)]
)
def test_cost_matrix_matches_pot_dist(dtype, batch, n, m, d):
    x = torch.rand(*batch, n, d, dtype=torch.float64) * 2 - 1
    y = torch.rand(*batch, m, d, dtype=torch.float64) * 2 - 1
    cost = eotfast.cost_matrix(x.to(dtype), y.to(dtype))
    assert cost.shape == (*batch, n, m)
    assert cost.dtype == (torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype)
    xs, ys = x.to(dtype).double().reshape(-1, n, d), y.to(dtype).double().reshape(-1, m, d)
    for k in range(xs.shape[0]):
        expected = ot.dist(xs[k].numpy(), ys[k].numpy())
        atol = COST_RTOL[dtype] * expected.max()
        np.testing.assert_allclose(
            cost.reshape(-1, n, m)[k].double().numpy(), expected, atol=atol, rtol=0
        )


def test_cost_matrix_is_zero_on_identical_points_and_never_negative():
    x = torch.randn(50, 3072)
    cost = eotfast.cost_matrix(x, x)
    assert (cost >= 0).all()
    assert cost.diagonal().max() <= 1e-4 * cost.max()
