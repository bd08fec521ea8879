"""The auction ops (eotfast::auction_<backend>) against scipy's linear_sum_assignment.

Every backend implements one contract: an injection of the rows into the columns whose total
cost is within m * epsilon of the optimum (exactly optimal for integer costs when
m * epsilon < 1), or epsilon = inf when max_bids stopped it. The oracle is scipy, never
another backend.
"""

import math

import numpy as np
import pytest
import torch
from oracles import assert_injection, backend_device, optimum, total

import eotfast
from eotfast.ops.registry import BACKENDS as REGISTRY

# The backends whose auction op these tests cover.
BACKENDS = ["cpu", "torch"]
DTYPES = [torch.float32, torch.float64]
# (n, m): one row, one column, n < m, n = m, and sizes that are no multiple of a vector width.
SHAPES = [(1, 1), (1, 9), (5, 9), (9, 9), (7, 13), (64, 64), (200, 257)]
MAX_BIDS = 10**8  # never reached by these tests unless they say so

pytestmark = pytest.mark.usefixtures("one_thread_for_the_torch_reference")


@pytest.fixture(params=BACKENDS)
def backend(request):
    """Overrides conftest's fixture (every registry backend) with those listed above."""
    name = request.param
    if name not in eotfast.available_backends(backend_device(name)):
        pytest.skip(f"backend {name} cannot run here")
    return name


def auction_op(backend: str):
    REGISTRY[backend].load()  # registers the backend's ops
    return getattr(torch.ops.eotfast, f"auction_{backend}")


def solve(
    cost,
    prices=None,
    *,
    epsilon_final,
    backend="cpu",
    epsilon_start=None,
    scaling=0.2,
    max_bids=MAX_BIDS,
):
    """The auction on cost [B, n, m]. epsilon_start defaults to each problem's cost range (1
    when its costs are all equal), raised to epsilon_final where it is smaller."""
    batch, _, m = cost.shape
    if prices is None:
        prices = cost.new_zeros(batch, m)
    final = torch.as_tensor(epsilon_final, dtype=cost.dtype, device=cost.device)
    final = final.expand(batch).contiguous()
    if epsilon_start is None:
        span = cost.amax((1, 2)) - cost.amin((1, 2))
        epsilon_start = torch.where(span > 0, span, torch.ones_like(span))
    start = torch.as_tensor(epsilon_start, dtype=cost.dtype, device=cost.device).expand(batch)
    start = torch.maximum(start, final)
    return auction_op(backend)(cost, prices, start, final, scaling, max_bids)


def assert_within_bound(cost, result) -> None:
    """sum C[i, sigma(i)] <= optimum + m * epsilon for each problem. The bound holds in exact
    arithmetic; the kernels compare C + p in the cost's dtype, so each row's slackness is
    also off by the rounding of a few such sums: allowed as 4 units of the dtype's precision
    at the largest |C| + |p|, per row."""
    columns, prices, epsilon, _ = result
    assert_injection(columns, cost.shape[-1])
    unit = torch.finfo(cost.dtype).eps
    for k in range(cost.shape[0]):
        m = cost.shape[-1]
        magnitude = float(cost[k].abs().max()) + float(prices[k].abs().max())
        slack = m * 4 * unit * magnitude
        bound = optimum(cost[k]) + m * float(epsilon[k]) + slack
        assert total(cost[k], columns[k]) <= bound, (k, total(cost[k], columns[k]), bound)


def assert_optimal(cost, columns) -> None:
    """Optimal total cost. Another optimal assignment may sum the same float64 values in
    another order: equal up to that rounding, where a suboptimal one is off by at least the
    costs' resolution (1 for integer costs)."""
    assert_injection(columns, cost.shape[-1])
    for k in range(cost.shape[0]):
        best = optimum(cost[k])
        assert total(cost[k], columns[k]) == pytest.approx(best, rel=1e-12, abs=0), k


# ----------------------------------------------------------------------------- the guarantee
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,m", SHAPES)
def test_random_costs_within_the_bound(backend, device, dtype, n, m):
    cost = torch.rand(3, n, m, dtype=dtype).to(device)
    result = solve(cost, epsilon_final=1e-3, backend=backend)
    columns, prices, epsilon, n_bids = result
    assert columns.shape == (3, n) and prices.shape == (3, m)
    assert prices.dtype == epsilon.dtype == dtype and n_bids.dtype == torch.int64
    assert (epsilon.cpu() == torch.tensor(1e-3, dtype=dtype)).all()
    assert (n_bids.cpu() >= 1).all()
    assert_within_bound(cost, result)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,m", SHAPES)
def test_integer_costs_are_solved_exactly(backend, device, dtype, n, m):
    # m * epsilon < 1: an epsilon-optimal assignment of integer costs is optimal.
    cost = torch.randint(0, 100, (3, n, m)).to(dtype).to(device)
    columns, _, epsilon, _ = solve(cost, epsilon_final=0.9 / m, backend=backend)
    assert (m * epsilon.cpu() < 1).all()
    assert_optimal(cost, columns)


@pytest.mark.parametrize("dtype", DTYPES)
def test_fewer_rows_than_columns_take_the_cheap_columns(backend, device, dtype):
    # The first columns are dear for every row: an injection must skip them, which the
    # padding rows (zero cost) make possible without leaving a cheap column unclaimed.
    cost = torch.randint(0, 10, (2, 6, 15)).to(dtype)
    cost[:, :, :9] += 1000
    cost = cost.to(device)
    columns, _, _, _ = solve(cost, epsilon_final=0.9 / 15, backend=backend)
    assert_optimal(cost, columns)
    assert (columns.cpu() >= 9).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_one_row_takes_its_cheapest_column(backend, device, dtype):
    cost = torch.rand(4, 1, 33, dtype=dtype).to(device)
    columns, _, _, _ = solve(cost, epsilon_final=1e-9, backend=backend)
    assert torch.equal(columns.cpu()[:, 0], cost.cpu()[:, 0].argmin(-1))


@pytest.mark.parametrize("dtype", DTYPES)
def test_one_column(backend, device, dtype):
    cost = torch.tensor([[[3.0]], [[-2.0]]], dtype=dtype).to(device)
    columns, prices, epsilon, n_bids = solve(cost, epsilon_final=1e-3, backend=backend)
    assert columns.cpu().tolist() == [[0], [0]]
    assert (epsilon.cpu() == torch.tensor(1e-3, dtype=dtype)).all()
    # One bid per phase: epsilon 1, 0.2, 0.04, 0.008, 0.0016, 0.001.
    assert n_bids.cpu().tolist() == [6, 6]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,m", [(1, 1), (5, 9), (64, 64)])
def test_all_equal_costs(backend, device, dtype, n, m):
    cost = torch.full((2, n, m), 3.5, dtype=dtype).to(device)
    columns, _, epsilon, _ = solve(cost, epsilon_final=1e-3, backend=backend)
    assert_optimal(cost, columns)
    assert (epsilon.cpu() == torch.tensor(1e-3, dtype=dtype)).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_duplicated_rows(backend, device, dtype):
    # Rows in identical pairs: each pair needs two distinct columns however ties are broken.
    base = torch.randint(0, 50, (2, 10, 24)).to(dtype)
    cost = base.repeat_interleave(2, dim=1).to(device)  # [2, 20, 24]
    columns, _, _, _ = solve(cost, epsilon_final=0.9 / 24, backend=backend)
    assert_optimal(cost, columns)


@pytest.mark.parametrize("dtype", DTYPES)
def test_duplicated_columns(backend, device, dtype):
    base = torch.randint(0, 50, (2, 20, 12)).to(dtype)
    cost = base.repeat_interleave(2, dim=2).to(device)  # [2, 20, 24]
    columns, _, _, _ = solve(cost, epsilon_final=0.9 / 24, backend=backend)
    assert_optimal(cost, columns)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scale", [1e-6, 1e6])
def test_cost_scales(backend, device, dtype, scale):
    # The bound scales with the costs when epsilon does.
    cost = (scale * torch.rand(2, 40, 50, dtype=torch.float64)).to(dtype).to(device)
    result = solve(cost, epsilon_final=1e-4 * scale, backend=backend)
    assert_within_bound(cost, result)
    integer = (scale * torch.randint(0, 100, (2, 40, 50))).to(dtype).to(device)
    columns, _, _, _ = solve(integer, epsilon_final=0.9 * scale / 50, backend=backend)
    assert_optimal(integer, columns)


# ----------------------------------------------------------------------------- batches
@pytest.mark.parametrize("dtype", DTYPES)
def test_each_problem_of_a_batch_stops_on_its_own(backend, device, dtype):
    # An easy problem (each row's own column is far the cheapest: one bid per row per phase)
    # beside a hard one: each is solved, and counts, as if it were alone.
    n = 48
    easy = 1 - torch.eye(n, dtype=dtype)
    hard = torch.randint(0, 1000, (n, n)).to(dtype)
    cost = torch.stack([easy, hard]).to(device)
    batch = solve(cost, epsilon_final=0.9 / n, backend=backend)
    assert_optimal(cost, batch[0])
    assert torch.equal(batch[0].cpu()[0], torch.arange(n))
    for k in range(2):
        alone = solve(cost[k : k + 1], epsilon_final=0.9 / n, backend=backend)
        for got, expected in zip(batch, alone, strict=True):
            assert torch.equal(got[k].cpu(), expected[0].cpu()), k
    # Epsilon 1, 0.2, 0.04 and 0.9 / 48: four phases of one bid per row for the easy one.
    n_bids = batch[3].cpu().tolist()
    assert n_bids[0] == 4 * n < n_bids[1], n_bids


@pytest.mark.parametrize("dtype", DTYPES)
def test_warm_start_with_good_prices_takes_fewer_bids(backend, device, dtype):
    cost = torch.rand(2, 100, 120, dtype=dtype).to(device)
    epsilon_final = 1e-4
    cold = solve(cost, epsilon_final=epsilon_final, backend=backend)
    prices = cold[1].clone()
    warm = solve(
        cost, prices, epsilon_final=epsilon_final, epsilon_start=epsilon_final, backend=backend
    )
    assert torch.equal(prices, cold[1]), "the input prices were modified in place"
    assert_within_bound(cost, warm)
    assert (warm[3].cpu() < cold[3].cpu()).all(), (warm[3], cold[3])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,m", SHAPES)
def test_max_bids_reached_still_gives_an_injection(backend, device, dtype, n, m):
    cost = torch.rand(2, n, m, dtype=dtype).to(device)
    columns, _, epsilon, n_bids = solve(cost, epsilon_final=1e-3, max_bids=1, backend=backend)
    assert_injection(columns, m)
    assert n_bids.cpu().tolist() == [1, 1]
    assert torch.isinf(epsilon.cpu()).all(), "a stopped problem must not claim a bound"


# ----------------------------------------------------------------------------- robustness
@pytest.mark.parametrize("dtype", DTYPES)
def test_terminates_when_epsilon_is_below_the_prices_resolution(backend, device, dtype):
    # epsilon_final far below the ulp of C + p (about 1e-3 in float32 at 1e4): every bid must
    # still raise a price, or the phase would never end.
    cost = (1e4 + torch.randint(0, 3, (2, 30, 30))).to(dtype).to(device)
    columns, _, epsilon, _ = solve(cost, epsilon_final=1e-12, backend=backend)
    assert_injection(columns, 30)
    assert (epsilon.cpu() == torch.tensor(1e-12, dtype=dtype)).all()
    assert_optimal(cost, columns)


def test_noncontiguous_inputs(backend, device):
    cost = torch.rand(2, 30, 20, dtype=torch.float64).to(device).mT  # [2, 20, 30], a view
    expected = solve(cost.contiguous(), epsilon_final=1e-6, backend=backend)
    got = solve(cost, epsilon_final=1e-6, backend=backend)
    for a, b in zip(got, expected, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_nonfinite_cost_is_refused_naming_cost(backend, device, bad):
    if device.type != "cpu":
        pytest.skip("values are checked on CPU tensors only")
    cost = torch.rand(2, 5, 6, dtype=torch.float64)
    cost[1, 2, 3] = bad
    with pytest.raises(ValueError, match="cost contains"):
        solve(cost.to(device), epsilon_final=1e-3, backend=backend)


@pytest.mark.parametrize(
    "argument,bad,match",
    [
        ("cost", lambda t: t[:, :, :4], r"n <= m"),
        ("cost", lambda t: t[0], r"cost must be a non-empty \[B, n, m\]"),
        ("cost", lambda t: t.half(), "cost must be torch.float32 or torch.float64"),
        ("prices", lambda t: t[:, :-1], r"prices must have shape \(2, 7\)"),
        ("prices", lambda t: t.double(), "prices must have cost's dtype"),
        ("epsilon_start", lambda t: t[:1], r"epsilon_start must have shape \(2,\)"),
        ("epsilon_final", lambda t: t[None], r"epsilon_final must have shape \(2,\)"),
        ("scaling", lambda value: 1.0, r"scaling must be a number in \(0, 1\)"),
        ("scaling", lambda value: 0.0, r"scaling must be a number in \(0, 1\)"),
        ("max_bids", lambda value: 0, "max_bids must be >= 1"),
    ],
)
def test_malformed_arguments_are_refused_before_any_kernel(backend, device, argument, bad, match):
    # The ops are public and hand data pointers to kernels: a wrong shape must be an error
    # naming the argument, never a read past a buffer; the fakes check the same.
    from torch._subclasses.fake_tensor import FakeTensorMode

    args = {
        "cost": torch.rand(2, 5, 7, device=device),
        "prices": torch.zeros(2, 7, device=device),
        "epsilon_start": torch.ones(2, device=device),
        "epsilon_final": torch.full((2,), 1e-3, device=device),
        "scaling": 0.2,
        "max_bids": 1000,
    }
    args[argument] = bad(args[argument])
    function = auction_op(backend).default
    with pytest.raises((ValueError, TypeError), match=match):
        function(*args.values())
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fake = [mode.from_tensor(v) if isinstance(v, torch.Tensor) else v for v in args.values()]
        with pytest.raises((ValueError, TypeError), match=match):
            function(*fake)


@pytest.mark.parametrize(
    "start,final", [(1.0, 0.0), (1.0, -1.0), (1e-3, 1e-2), (math.inf, 1e-3), (1.0, math.nan)]
)
def test_cpu_refuses_epsilons_out_of_order(start, final):
    cost = torch.rand(2, 5, 7, dtype=torch.float64)
    start = torch.tensor([1.0, start], dtype=torch.float64)
    final = torch.tensor([1e-3, final], dtype=torch.float64)
    with pytest.raises(ValueError, match="problem 1 needs finite epsilons"):
        torch.ops.eotfast.auction_cpu(cost, torch.zeros(2, 7, dtype=torch.float64), start, final,
                                      0.2, 1000)  # fmt: skip


def test_cpu_threads_give_the_same_results():
    # Problems are spread over threads; each is solved as if alone, whatever thread takes it.
    cost = torch.rand(6, 100, 128)  # enough entries for the kernel to start a second thread
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = solve(cost, epsilon_final=1e-4)
        torch.set_num_threads(2)
        two = solve(cost, epsilon_final=1e-4)
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(one, two, strict=True):
        assert torch.equal(a, b)


def test_auction_op_signature_matches_the_schema():
    """torch 2.11 infers a triton_op's schema from the wrapper's annotations even when one is
    given: the wrapper must be annotated with the schema's types."""
    from eotfast.ops.common import AUCTION_SCHEMA, with_auction_checks

    inferred = torch.library.infer_schema(with_auction_checks("op", None), mutates_args=())
    assert inferred.replace("SymInt", "int") == AUCTION_SCHEMA


def test_matches_scipy_on_image_like_costs(backend, device):
    # Squared distances of clustered points, the pairing workload: far from uniform noise.
    generator = torch.Generator().manual_seed(0)
    centres = torch.rand(4, 48, generator=generator) * 2 - 1
    labels = torch.randint(4, (2, 96, 2), generator=generator)
    points = centres[labels] + 0.3 * torch.randn(2, 96, 2, 48, generator=generator)
    cost = torch.cdist(points[:, :, 0], points[:, :, 1]).pow(2).double()
    scale = np.mean([optimum(c) for c in cost])
    result = solve(cost.to(device), epsilon_final=1e-9 * scale / 96, backend=backend)
    assert_within_bound(cost, result)
