"""Bad input gets a clear error naming the argument, never a crash in C++."""

import pytest
import torch

import eotfast

x = torch.randn(8, 5)
y = torch.randn(6, 5)
cost = torch.rand(8, 6)
nan_cost = cost.clone()
nan_cost[2, 3] = float("nan")
inf_cost = cost.clone()
inf_cost[0, 0] = float("inf")
a_bad_mass = torch.full((8,), 1 / 4)
a_negative = torch.full((8,), 1 / 8)
a_negative[0], a_negative[1] = -0.1, 0.1 + 1 / 4


@pytest.mark.parametrize(
    "call,error,match",
    [
        (lambda b: eotfast.sinkhorn(nan_cost, backend=b), ValueError, "cost contains NaN"),
        (lambda b: eotfast.sinkhorn(inf_cost, backend=b), ValueError, "cost contains inf"),
        (
            lambda b: eotfast.sinkhorn(cost.long(), backend=b),
            TypeError,
            "cost must be a floating-point",
        ),
        (lambda b: eotfast.sinkhorn(cost[:0], backend=b), ValueError, "cost must not be empty"),
        (lambda b: eotfast.sinkhorn(cost[0], backend=b), ValueError, "cost must have at least 2"),
        (
            lambda b: eotfast.sinkhorn(cost, reg=0.0, backend=b),
            ValueError,
            "reg must be a finite number > 0",
        ),
        (lambda b: eotfast.sinkhorn(cost, reg=-1, backend=b), ValueError, "reg must be"),
        (lambda b: eotfast.sinkhorn(cost, reg=float("nan"), backend=b), ValueError, "reg must be"),
        (lambda b: eotfast.sinkhorn(cost, max_iter=0, backend=b), ValueError, "max_iter"),
        (lambda b: eotfast.sinkhorn(cost, tol=-1.0, backend=b), ValueError, "tol"),
        (lambda b: eotfast.sinkhorn(cost, a=a_bad_mass, backend=b), ValueError, "same total mass"),
        (
            lambda b: eotfast.sinkhorn(cost, a=a_negative, backend=b),
            ValueError,
            "a must be nonnegative",
        ),
        (
            lambda b: eotfast.sinkhorn(cost, a=torch.ones(7) / 7, backend=b),
            ValueError,
            "a must have shape",
        ),
        (
            lambda b: eotfast.sinkhorn(cost, b=torch.ones(6, dtype=torch.int64), backend=b),
            TypeError,
            "b must be a floating-point",
        ),
        (lambda b: eotfast.sinkhorn(cost, backend="gpu"), ValueError, "backend must be one of"),
        (
            lambda b: eotfast.pair(x, torch.randn(6, 4), backend=b),
            ValueError,
            "same feature dimension",
        ),
        (lambda b: eotfast.pair(x, y[:0], backend=b), ValueError, "y must not be empty"),
        (lambda b: eotfast.pair(x.long(), y, backend=b), TypeError, "x must be a floating-point"),
        (lambda b: eotfast.pair(x.double(), y, backend=b), TypeError, "same dtype"),
        (lambda b: eotfast.pair(x * float("nan"), y, backend=b), ValueError, "x contains NaN"),
        (lambda b: eotfast.pair(x, y.expand(2, 6, 5), backend=b), ValueError, "leading"),
        (
            lambda b: eotfast.pair(x, y, method="hungarian", backend=b),
            ValueError,
            "method must be one of",
        ),
        (
            lambda b: eotfast.pair(x, y, sampling="top1", backend=b),
            ValueError,
            "sampling must be one of",
        ),
        (
            lambda b: eotfast.pair(x, y.to("meta"), backend=b),
            ValueError,
            "y is on meta but x is on cpu",
        ),
        (lambda b: eotfast.pair([[1.0]], y, backend=b), TypeError, "x must be a torch.Tensor"),
        (lambda b: eotfast.emd(nan_cost), ValueError, "cost contains NaN"),
        (lambda b: eotfast.assignment(inf_cost.mT), ValueError, "cost contains inf"),
    ],
)
@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_bad_input_raises_a_clear_error(call, error, match, backend):
    with pytest.raises(error, match=match):
        call(backend)


def test_cpu_backend_rejects_tensors_elsewhere():
    with pytest.raises(ValueError, match="backend='cpu' runs on CPU tensors"):
        eotfast.sinkhorn(cost.to("meta"), backend="cpu")


def test_extension_checks_sizes_itself():
    # The raw-pointer entry point must refuse inconsistent sizes rather than read past buffers.
    from eotfast._backends import require_cpu_extension

    extension = require_cpu_extension()
    t = torch.zeros(4)
    with pytest.raises(ValueError, match="batch, n and m must be >= 1"):
        extension.sinkhorn_log_float32(*(t.data_ptr(),) * 8, 1, 0, 2, 10, 0.0, 1)
    with pytest.raises(ValueError, match="null data pointer"):
        extension.sinkhorn_log_float32(0, *(t.data_ptr(),) * 7, 1, 2, 2, 10, 0.0, 1)
