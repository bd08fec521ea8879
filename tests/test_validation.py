"""Bad input gets a clear error naming the argument, never a crash in C++."""

import pytest
import torch
from oracles import backend_device

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


# Value checks made inside each backend's op (so that compiled callers get them too): every
# backend that runs on CPU tensors must raise them itself.
IN_THE_OPS = [
    (lambda b: eotfast.sinkhorn(nan_cost, backend=b), ValueError, "cost contains NaN"),
    (lambda b: eotfast.sinkhorn(inf_cost, backend=b), ValueError, "cost contains inf"),
    (lambda b: eotfast.sinkhorn(cost, a=a_bad_mass, backend=b), ValueError, "same total mass"),
    (lambda b: eotfast.sinkhorn(cost, a=a_negative, backend=b), ValueError, "a must be nonneg"),
    # Epsilons in the normal range that a solve cannot resolve: below 16 unit roundoffs of the
    # costs (reg=1e-30 in float32, 1e-50 in float64: "cpu" stopped with marginal_error NaN,
    # "torch" returned a non-finite plan), or a float32 cost range near 1e38 whose annealing
    # starts there (-inf/NaN potentials with marginal_error inf).
    (
        lambda b: eotfast.sinkhorn(cost, reg=1e-30, backend=b),
        ValueError,
        "epsilon of problem 0 is .* below the resolution .* choose a larger reg",
    ),
    (
        lambda b: eotfast.sinkhorn(cost.double(), reg=1e-50, backend=b),
        ValueError,
        "epsilon of problem 0 is .*(below the resolution|outside the positive normal).* reg",
    ),
    (
        lambda b: eotfast.sinkhorn(cost * 1e38, reg=1.0, relative_reg=False, backend=b),
        ValueError,
        "epsilon_start of problem 0 is .* rescale the cost",
    ),
]

# Argument checks made before any backend is chosen: one run each.
BEFORE_DISPATCH = [
    (lambda: eotfast.sinkhorn(cost.long()), TypeError, "cost must be a floating-point"),
    (lambda: eotfast.sinkhorn(cost[:0]), ValueError, "cost must not be empty"),
    (lambda: eotfast.sinkhorn(cost[0]), ValueError, "cost must have at least 2"),
    (lambda: eotfast.sinkhorn(cost, reg=0.0), ValueError, "reg must be a finite number > 0"),
    (lambda: eotfast.sinkhorn(cost, reg=-1), ValueError, "reg must be"),
    (lambda: eotfast.sinkhorn(cost, reg=float("nan")), ValueError, "reg must be"),
    (lambda: eotfast.sinkhorn(cost, max_iter=0), ValueError, "max_iter"),
    (lambda: eotfast.sinkhorn(cost, tol=-1.0), ValueError, "tol"),
    (lambda: eotfast.sinkhorn(cost, a=torch.ones(7) / 7), ValueError, "a must have shape"),
    (
        lambda: eotfast.sinkhorn(cost, b=torch.ones(6, dtype=torch.int64)),
        TypeError,
        "b must be a floating-point",
    ),
    (lambda: eotfast.sinkhorn(cost, backend="gpu"), ValueError, "backend must be one of"),
    (lambda: eotfast.pair(x, torch.randn(6, 4)), ValueError, "samples of the same shape"),
    (lambda: eotfast.pair(x, y[:0]), ValueError, "y must not be empty"),
    (lambda: eotfast.pair(x.long(), y), TypeError, "x must be a floating-point"),
    (lambda: eotfast.pair(x.double(), y), TypeError, "same dtype"),
    (lambda: eotfast.pair(x * float("nan"), y), ValueError, "x contains NaN"),
    (lambda: eotfast.pair(x, y.expand(2, 6, 5)), ValueError, "samples of the same shape"),
    (
        lambda: eotfast.pair(x.expand(2, 8, 5), y.expand(3, 6, 5), batch_dims=1),
        ValueError,
        "same batch dimensions",
    ),
    (lambda: eotfast.pair(x, y, batch_dims=-1), ValueError, "batch_dims must be an integer"),
    (lambda: eotfast.pair(x, y, batch_dims=2), ValueError, "x must have at least 3 dim"),
    (lambda: eotfast.pair(x, y, method="hungarian"), ValueError, "method must be one of"),
    (lambda: eotfast.pair(x, y, sampling="top1"), ValueError, "sampling must be one of"),
    (lambda: eotfast.pair(x, y.to("meta")), ValueError, "y is on meta but x is on cpu"),
    (lambda: eotfast.pair([[1.0]], y), TypeError, "x must be a torch.Tensor"),
    (lambda: eotfast.emd(nan_cost), ValueError, "cost contains NaN"),
    (lambda: eotfast.sinkhorn(cost, reg=1e-40), ValueError, "reg=1e-40 gives epsilon"),
    (lambda: eotfast.sinkhorn(cost, reg=1e300), ValueError, "outside the positive normal"),
    (lambda: eotfast.sinkhorn(cost * 1e-38), ValueError, "outside the positive normal range"),
    (lambda: eotfast.pair(x, y, reg=1e-40), ValueError, "reg=1e-40 gives epsilon"),
    (
        lambda: eotfast.sinkhorn(cost, reg=1e-40, relative_reg=False),
        ValueError,
        "outside the positive normal range of torch.float32",
    ),
    (
        lambda: eotfast.pair(torch.full((4, 3), 1e20), torch.full((5, 3), -1e20)),
        ValueError,
        "squared distances between x and y overflow torch.float32",
    ),
    (lambda: eotfast.emd(cost, max_iter=0), ValueError, "max_iter must be an integer from 1"),
    (lambda: eotfast.emd(cost, max_iter=-1), ValueError, "max_iter must be an integer from 1"),
    (lambda: eotfast.sinkhorn(cost, max_iter=2**63), ValueError, "max_iter must be an integer"),
    (lambda: eotfast.pair(x, y, "random", backend="bogus"), ValueError, "backend must be one of"),
    (lambda: eotfast.pair(x, y.double(), "random"), TypeError, "same dtype"),
    (
        lambda: eotfast.cost_matrix(torch.rand(2, 5, 3), torch.rand(3, 4, 3), batch_dims=1),
        ValueError,
        "batch dimensions of x and y must broadcast",
    ),
    (lambda: eotfast.assignment(inf_cost.mT), ValueError, "cost contains inf"),
    # absolute reg = 1e308 (float64): a NaN g with a finite error; epsilon times log-masses
    # must stay finite, so epsilon <= finfo.max / 1024
    (
        lambda: eotfast.sinkhorn(cost.double(), reg=1e308, relative_reg=False),
        ValueError,
        r"reg=1e\+308 gives epsilon",
    ),
    # float32 costs of +-3e38: the shift by the minimum overflowed and was reported as
    # "cost contains inf"
    *[
        (
            lambda solver=solver: solver(torch.tensor([[3e38, -3e38], [0.0, 1.0]])),
            ValueError,
            "cost's entries span more than torch.float32 holds",
        )
        for solver in (eotfast.sinkhorn, eotfast.auction, eotfast.assignment)
    ],
    # the plan of another cost than the solved one: a raw broadcast error before
    (
        lambda: eotfast.sinkhorn(cost).plan(cost[:2]),
        ValueError,
        r"cost must be the solved cost, of shape \(8, 6\), got \(2, 6\)",
    ),
]


@pytest.mark.parametrize("call,error,match", IN_THE_OPS)
def test_bad_values_raise_a_clear_error_in_every_backend(backend, call, error, match):
    if backend_device(backend).type != "cpu":
        pytest.skip("values are checked on CPU tensors only (reading GPU values would sync)")
    with pytest.raises(error, match=match):
        call(backend)


@pytest.mark.parametrize("call,error,match", BEFORE_DISPATCH)
def test_bad_arguments_raise_a_clear_error(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_cpu_backend_rejects_tensors_elsewhere():
    with pytest.raises(ValueError, match="backend='cpu' runs on CPU tensors"):
        eotfast.sinkhorn(cost.to("meta"), backend="cpu")


def test_extension_checks_sizes_itself():
    # The raw-pointer entry point must refuse inconsistent sizes rather than read past buffers.
    from eotfast.ops.extensions import require_cpu_extension

    extension = require_cpu_extension()
    t, inf = torch.zeros(4), float("inf")
    with pytest.raises(ValueError, match="batch, n and m must be >= 1"):
        extension.sinkhorn_float32(*(t.data_ptr(),) * 9, 1, 0, 2, 10, 0.0, 0.5, 1.0, inf, 1)
    with pytest.raises(ValueError, match="null data pointer"):
        extension.sinkhorn_float32(0, *(t.data_ptr(),) * 8, 1, 2, 2, 10, 0.0, 0.5, 1.0, inf, 1)
    with pytest.raises(ValueError, match="reach must be > 0"):
        extension.sinkhorn_float32(*(t.data_ptr(),) * 9, 1, 2, 2, 10, 0.0, 0.5, 1.0, 0.0, 1)
