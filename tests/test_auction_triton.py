"""The Triton auction (eotfast::auction_triton, kernels/auction.py) against scipy's
linear_sum_assignment.

The contract of every auction op: an injection of the rows into the columns whose total cost
is within m * epsilon of the optimum (exactly optimal for integer costs when m * epsilon < 1),
or epsilon = inf when max_bids stopped the problem. The oracle is scipy, never another
backend.

Without a GPU the kernel runs through Triton's interpreter on CPU tensors (conftest.py sets
TRITON_INTERPRET=1), about 0.1 s per round of bids: the problems stay small and the epsilon
schedules short. The interpreter runs a program's warps in lockstep, so it cannot show a
missing barrier: tests/test_triton_compile.py checks the compiled kernel for that, and the
GPU tests below repeat a solve to catch results that move between runs.
"""

import math

import numpy as np
import pytest
import torch
from oracles import assert_injection, optimum, total

from eotfast.ops.registry import triton_runs_on

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
pytestmark = [
    pytest.mark.skipif(
        not triton_runs_on(DEVICE), reason="Triton cannot run here (no GPU and no interpreter)"
    ),
    *([pytest.mark.interpreter] if DEVICE.type == "cpu" else []),
]
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
DTYPES = [torch.float32, torch.float64]
MAX_BIDS = 10**8  # never reached by these tests unless they say so


def solve(cost, prices=None, *, epsilon_final, epsilon_start=None, scaling=0.2,
          max_bids=MAX_BIDS):  # fmt: skip
    """eotfast::auction_triton on cost [B, n, m] (moved to DEVICE). epsilon_start defaults to
    each problem's cost range (1 when its costs are all equal), at least epsilon_final."""
    from eotfast.ops.triton_backend import auction_triton

    cost = cost.to(DEVICE)
    batch, _, m = cost.shape
    if prices is None:
        prices = cost.new_zeros(batch, m)
    final = torch.as_tensor(epsilon_final, dtype=cost.dtype, device=DEVICE).expand(batch)
    if epsilon_start is None:
        span = cost.amax((1, 2)) - cost.amin((1, 2))
        epsilon_start = torch.where(span > 0, span, torch.ones_like(span))
    start = torch.as_tensor(epsilon_start, dtype=cost.dtype, device=DEVICE).expand(batch)
    start = torch.maximum(start, final)
    return auction_triton(cost, prices.to(DEVICE), start.contiguous(), final.contiguous(),
                          scaling, max_bids)  # fmt: skip


def assert_within_bound(cost, result) -> None:
    """sum C[i, sigma(i)] <= optimum + m * epsilon per problem, up to the rounding of the
    sums C + p the kernel compares (4 units of the dtype at the largest |C| + |p|, per row)."""
    columns, prices, epsilon, _ = result
    m = cost.shape[-1]
    assert_injection(columns, m)
    unit = torch.finfo(cost.dtype).eps
    for k in range(cost.shape[0]):
        magnitude = float(cost[k].abs().max()) + float(prices[k].abs().max())
        bound = optimum(cost[k]) + m * float(epsilon[k]) + m * 4 * unit * magnitude
        assert total(cost[k], columns[k]) <= bound, (k, total(cost[k], columns[k]), bound)


def assert_optimal(cost, columns) -> None:
    """Optimal total cost (another optimal assignment may sum the same values in another
    order; a suboptimal one of integer costs is off by at least 1)."""
    assert_injection(columns, cost.shape[-1])
    for k in range(cost.shape[0]):
        assert total(cost[k], columns[k]) == pytest.approx(optimum(cost[k]), rel=1e-12, abs=0)


# ----------------------------------------------------------------------------- the guarantee
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,m", [(4, 4), (3, 6)])
def test_random_costs_within_the_bound(dtype, n, m):
    cost = torch.rand(2, n, m, dtype=dtype)
    result = solve(cost, epsilon_final=1e-2)
    columns, prices, epsilon, n_bids = result
    assert columns.shape == (2, n) and prices.shape == (2, m) and epsilon.shape == (2,)
    assert prices.dtype == epsilon.dtype == dtype and n_bids.dtype == torch.int64
    assert (epsilon.cpu() == torch.tensor(1e-2, dtype=dtype)).all()
    assert (n_bids.cpu() >= n).all()
    assert_within_bound(cost, result)


@pytest.mark.parametrize("dtype", DTYPES)
def test_integer_costs_are_solved_exactly(dtype):
    # m * epsilon < 1: an epsilon-optimal assignment of integer costs is optimal.
    cost = torch.randint(0, 20, (2, 5, 7)).to(dtype)
    columns, _, epsilon, _ = solve(cost, epsilon_final=0.9 / 7)
    assert (7 * epsilon.cpu() < 1).all()
    assert_optimal(cost, columns)


@pytest.mark.parametrize("dtype", DTYPES)
def test_fewer_rows_than_columns_take_the_cheap_columns(dtype):
    # The first columns are dear for every row: the injection skips them, which the virtual
    # rows (zero cost) allow without leaving a cheap column unclaimed.
    cost = torch.randint(0, 10, (1, 3, 6)).to(dtype)
    cost[:, :, :3] += 1000
    columns, _, _, _ = solve(cost, epsilon_final=0.9 / 6)
    assert_optimal(cost, columns)
    assert (columns.cpu() >= 3).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_one_row_takes_its_cheapest_column(dtype):
    cost = torch.stack([torch.randperm(5), torch.randperm(5)])[:, None, :].to(dtype)  # [2, 1, 5]
    columns, _, _, _ = solve(cost, epsilon_final=0.9 / 5)
    assert torch.equal(columns.cpu()[:, 0], cost[:, 0].argmin(-1))


@pytest.mark.parametrize("dtype", DTYPES)
def test_one_column(dtype):
    cost = torch.tensor([[[3.0]], [[-2.0]]], dtype=dtype)
    columns, prices, epsilon, n_bids = solve(cost, epsilon_final=1e-3, epsilon_start=1.0)
    assert columns.cpu().tolist() == [[0], [0]]
    assert (epsilon.cpu() == torch.tensor(1e-3, dtype=dtype)).all()
    # One bid per phase: epsilon 1, 0.2, 0.04, 0.008, 0.0016, 0.001 (w2 = w1: each bid
    # raises the price by epsilon).
    assert n_bids.cpu().tolist() == [6, 6]
    expected = torch.tensor(1 + 0.2 + 0.04 + 0.008 + 0.0016 + 0.001, dtype=dtype)
    torch.testing.assert_close(prices.cpu(), expected.expand(2, 1))


@pytest.mark.parametrize("dtype", DTYPES)
def test_all_equal_costs(dtype):
    cost = torch.full((1, 4, 6), 3.5, dtype=dtype)
    columns, _, epsilon, _ = solve(cost, epsilon_final=1e-2)
    assert_injection(columns, 6)
    assert (epsilon.cpu() == torch.tensor(1e-2, dtype=dtype)).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_duplicated_rows(dtype):
    # Rows in identical pairs: each pair needs two distinct columns however ties are broken.
    cost = torch.randint(0, 10, (1, 3, 7)).to(dtype).repeat_interleave(2, dim=1)  # [1, 6, 7]
    columns, _, _, _ = solve(cost, epsilon_final=0.9 / 7)
    assert_optimal(cost, columns)


@pytest.mark.parametrize("dtype", DTYPES)
def test_duplicated_columns(dtype):
    cost = torch.randint(0, 10, (1, 5, 4)).to(dtype).repeat_interleave(2, dim=2)  # [1, 5, 8]
    columns, _, _, _ = solve(cost, epsilon_final=0.9 / 8)
    assert_optimal(cost, columns)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scale", [1e-6, 1e6])
def test_cost_scales(dtype, scale):
    # The bound scales with the costs when epsilon does.
    cost = (scale * torch.rand(1, 4, 5, dtype=torch.float64)).to(dtype)
    assert_within_bound(cost, solve(cost, epsilon_final=1e-2 * scale))
    integer = (scale * torch.randint(0, 20, (1, 4, 5))).to(dtype)
    columns, _, _, _ = solve(integer, epsilon_final=0.9 * scale / 5)
    assert_optimal(integer, columns)


# ----------------------------------------------------------------------------- batches
@pytest.mark.parametrize("dtype", DTYPES)
def test_each_problem_of_a_batch_stops_on_its_own(dtype):
    # An easy problem (each row's own column is far the cheapest: one bid per row per phase)
    # beside a hard one: each is solved, and counts, as if it were alone.
    n = 5
    easy = 1 - torch.eye(n, dtype=dtype)
    hard = torch.randint(0, 100, (n, n)).to(dtype)
    cost = torch.stack([easy, hard])
    batch = solve(cost, epsilon_final=0.9 / n)
    assert_optimal(cost, batch[0])
    assert torch.equal(batch[0].cpu()[0], torch.arange(n))
    for k in range(2):
        alone = solve(cost[k : k + 1], epsilon_final=0.9 / n)
        for got, expected in zip(batch, alone, strict=True):
            assert torch.equal(got[k].cpu(), expected[0].cpu()), k
    # Epsilon 1, 0.2 and 0.9 / 5: three phases of one bid per row for the easy problem.
    n_bids = batch[3].cpu().tolist()
    assert n_bids[0] == 3 * n < n_bids[1], n_bids


@pytest.mark.parametrize("dtype", DTYPES)
def test_warm_start_with_good_prices_takes_fewer_bids(dtype):
    cost = torch.rand(1, 5, 7, dtype=dtype)
    cold = solve(cost, epsilon_final=1e-3)
    prices = cold[1].clone()
    warm = solve(cost, prices, epsilon_final=1e-3, epsilon_start=1e-3)
    assert torch.equal(prices, cold[1]), "the input prices were modified in place"
    assert_within_bound(cost, warm)
    assert (warm[3].cpu() < cold[3].cpu()).all(), (warm[3], cold[3])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("max_bids", [1, 7])
def test_max_bids_reached_still_gives_an_injection(dtype, max_bids):
    # One bid: the first queued row's; seven: some rows hold columns, the others take the
    # columns no real row holds. Either way an injection, and no bound claimed.
    cost = torch.rand(2, 4, 6, dtype=dtype)
    columns, _, epsilon, n_bids = solve(cost, epsilon_final=1e-3, max_bids=max_bids)
    assert_injection(columns, 6)
    assert n_bids.cpu().tolist() == [max_bids, max_bids]
    assert torch.isinf(epsilon.cpu()).all(), "a stopped problem must not claim a bound"


# ----------------------------------------------------------------------------- robustness
@pytest.mark.parametrize("dtype", DTYPES)
def test_terminates_when_increments_are_below_the_prices_ulp(dtype):
    # Prices of 2^24 (float32) or 2^53 (float64): one ulp is 2, and every increment (at most
    # the cost range 2 plus epsilon) rounds away; each bid must still raise its price (to the
    # next float), or the phase would never end.
    big = 2.0**24 if dtype == torch.float32 else 2.0**53
    cost = torch.randint(0, 3, (1, 4, 5)).to(dtype)
    prices = torch.full((1, 5), big, dtype=dtype)
    columns, final_prices, epsilon, n_bids = solve(cost, prices, epsilon_final=1e-3,
                                                   epsilon_start=1e-3)  # fmt: skip
    assert_injection(columns, 5)
    assert (epsilon.cpu() == torch.tensor(1e-3, dtype=dtype)).all()
    raised = final_prices.cpu() > prices
    assert 5 <= int(n_bids) < 1000 and raised.sum() >= 4, (n_bids, final_prices)


def test_scaling_within_an_ulp_of_one_still_lowers_epsilon():
    # In float32, 1 - 1e-12 is 1: epsilon * scaling would stay epsilon, phase after phase. It
    # steps to the next float down instead: three ulps above epsilon_final, four phases (one
    # bid each on a 1 x 1 problem).
    final = torch.tensor(0.5)
    start = final
    for _ in range(3):
        start = torch.nextafter(start, torch.tensor(1.0))
    cost = torch.zeros(1, 1, 1)
    _, _, epsilon, n_bids = solve(cost, epsilon_final=final, epsilon_start=start,
                                  scaling=1 - 1e-12)  # fmt: skip
    assert n_bids.cpu().tolist() == [4] and float(epsilon) == 0.5


@pytest.mark.slow
def test_bid_tiles_do_not_change_the_result():
    # Small tiles make every pass loop over several (slots, columns, bids): a round's bids
    # and winners do not depend on how they are split.
    from eotfast.kernels.auction import launch_auction

    cost = torch.randint(0, 30, (1, 5, 9)).double().to(DEVICE)
    prices = torch.zeros(1, 9, dtype=torch.float64, device=DEVICE)
    start = torch.full((1,), 30.0, dtype=torch.float64, device=DEVICE)
    final = torch.full((1,), 0.9 / 9, dtype=torch.float64, device=DEVICE)
    tiled = launch_auction(cost, prices, start, final, 0.2, MAX_BIDS, block_n=2, block_m=4,
                           block_s=4)  # fmt: skip
    assert_optimal(cost, tiled[0])
    whole = launch_auction(cost, prices, start, final, 0.2, MAX_BIDS)
    for got, expected in zip(tiled, whole, strict=True):
        assert torch.equal(got, expected)


def test_noncontiguous_inputs():
    cost = torch.rand(1, 6, 4, dtype=torch.float64).mT  # [1, 4, 6], a view
    expected = solve(cost.contiguous(), epsilon_final=1e-2)
    got = solve(cost, epsilon_final=1e-2)
    for a, b in zip(got, expected, strict=True):
        assert torch.equal(a, b)


def test_launch_puts_the_batch_on_the_unbounded_grid_axis(monkeypatch):
    # One program per problem on grid axis 0 (up to 2^31 - 1 programs): a batch of 100,000.
    from eotfast.kernels import _launch
    from eotfast.kernels.auction import launch_auction

    grids = []

    class Recorder:
        def __getitem__(self, grid):
            grids.append(grid)
            return lambda *args, **kwargs: None

    monkeypatch.setattr(_launch, "wrap_triton", lambda kernel: Recorder())
    meta = lambda *shape: torch.empty(*shape, device="meta")  # noqa: E731
    launch_auction(meta(100_000, 3, 5), meta(100_000, 5), meta(100_000), meta(100_000), 0.2, 10)
    assert grids == [(100_000,)]


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_nonfinite_cost_is_refused_naming_cost(bad):
    if DEVICE.type != "cpu":
        pytest.skip("values are checked on CPU tensors only (reading GPU values would sync)")
    cost = torch.rand(2, 5, 6, dtype=torch.float64)
    cost[1, 2, 3] = bad
    with pytest.raises(ValueError, match="cost contains"):
        solve(cost, epsilon_final=1e-3)


@pytest.mark.parametrize("start,final", [(1.0, 0.0), (1e-3, 1e-2), (math.inf, 1e-3)])
def test_epsilons_out_of_order_are_refused_on_cpu_tensors(start, final):
    from eotfast.ops.triton_backend import auction_triton

    if DEVICE.type != "cpu":
        pytest.skip("values are checked on CPU tensors only (reading GPU values would sync)")
    cost = torch.rand(2, 5, 7, dtype=torch.float64)
    start = torch.tensor([1.0, start], dtype=torch.float64)
    final = torch.tensor([1e-3, final], dtype=torch.float64)
    with pytest.raises(ValueError, match="problem 1 needs finite epsilons"):
        auction_triton(cost, torch.zeros(2, 7, dtype=torch.float64), start, final, 0.2, 1000)


@pytest.mark.parametrize(
    "argument,bad,match",
    [
        ("cost", lambda t: t[:, :, :4], r"n <= m"),
        ("cost", lambda t: t.half(), "cost must be torch.float32 or torch.float64"),
        ("prices", lambda t: t[:, :-1], r"prices must have shape \(2, 7\)"),
        ("epsilon_final", lambda t: t.double(), "epsilon_final must have cost's dtype"),
        ("max_bids", lambda value: 0, "max_bids must be >= 1"),
    ],
)
def test_malformed_arguments_are_refused_before_the_kernel(argument, bad, match):
    # Eager and fake alike: a wrong shape or dtype is an error naming the argument, never a
    # kernel reading past a buffer or with the wrong element type.
    from torch._subclasses.fake_tensor import FakeTensorMode

    from eotfast.ops.triton_backend import auction_triton

    args = {
        "cost": torch.rand(2, 5, 7, device=DEVICE),
        "prices": torch.zeros(2, 7, device=DEVICE),
        "epsilon_start": torch.ones(2, device=DEVICE),
        "epsilon_final": torch.full((2,), 1e-3, device=DEVICE),
        "scaling": 0.2,
        "max_bids": 1000,
    }
    args[argument] = bad(args[argument])
    with pytest.raises((ValueError, TypeError), match=match):
        auction_triton(*args.values())
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fake = [mode.from_tensor(v) if isinstance(v, torch.Tensor) else v for v in args.values()]
        with pytest.raises((ValueError, TypeError), match=match):
            auction_triton(*fake)


# ----------------------------------------------------------------------------- GPU only
def _image_like_costs(batch, n, m, dtype, seed=0):
    """Squared distances of clustered points (the pairing workload), shifted to start at 0."""
    generator = torch.Generator().manual_seed(seed)
    centres = torch.rand(8, 64, generator=generator) * 2 - 1
    x = centres[torch.randint(8, (batch, n), generator=generator)]
    y = centres[torch.randint(8, (batch, m), generator=generator)]
    x = x + 0.3 * torch.randn(x.shape, generator=generator)
    y = y + 0.3 * torch.randn(y.shape, generator=generator)
    cost = torch.cdist(x.double(), y.double()).pow(2)
    return (cost - cost.amin((1, 2), keepdim=True)).to(dtype)


@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch,n,m", [(4, 256, 256), (2, 300, 517), (1, 1000, 1000)])
def test_matches_scipy_and_repeats_bitwise_on_cuda(dtype, batch, n, m):
    # The sizes where tiles, warps and atomics all take part. A missing barrier shows as a
    # wrong answer or as results that move from run to run.
    cost = _image_like_costs(batch, n, m, dtype)
    scale = float(cost.abs().max())
    # float32: about 30 ulps of the largest price (the caller's rule keeps 16).
    epsilon_final = (1e-6 if dtype == torch.float64 else 1e-3) * scale / m
    first = solve(cost, epsilon_final=epsilon_final)
    assert (first[2].cpu() == torch.tensor(epsilon_final, dtype=dtype)).all()
    assert_within_bound(cost, first)
    for _ in range(5):
        again = solve(cost, epsilon_final=epsilon_final)
        for one, other in zip(first, again, strict=True):
            assert torch.equal(one, other), "results move between runs"


@requires_cuda
def test_auction_triton_has_no_host_sync():
    cost = _image_like_costs(2, 128, 160, torch.float32).cuda()
    prices = torch.zeros(2, 160, device="cuda")
    start = torch.full((2,), float(cost.max()), device="cuda")
    final = torch.full((2,), 1e-3, device="cuda")
    solve(cost, prices, epsilon_final=final, epsilon_start=start)  # compiles the kernel
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        columns, _, epsilon, _ = solve(cost, prices, epsilon_final=final, epsilon_start=start)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert_injection(columns, 160)
    assert np.isfinite(epsilon.cpu().numpy()).all()


@requires_cuda
def test_auction_triton_inside_torch_compile_fullgraph():
    # A pairing step: the op is a triton_op, so torch.compile traces it into its graph (no
    # graph break), and the compiled step pairs as the eager one does.
    from eotfast.ops.triton_backend import auction_triton

    def step(x, y):
        cost = torch.cdist(x, y).pow(2)
        start = cost.amax((1, 2))
        final = torch.full_like(start, 1e-3)
        result = auction_triton(cost, cost.new_zeros(cost.shape[0], cost.shape[2]), start, final,
                                0.2, 10**7)  # fmt: skip
        partners = torch.gather(y, 1, result[0][..., None].expand(-1, -1, y.shape[-1]))
        return result, (x - partners).square().mean()

    torch._dynamo.reset()
    x, y = torch.randn(2, 64, 16, device="cuda"), torch.randn(2, 80, 16, device="cuda")
    compiled = torch.compile(step, fullgraph=True)  # raises on any graph break
    result, loss = compiled(x, y)
    eager, eager_loss = step(x, y)
    for got, expected in zip(result, eager, strict=True):
        assert torch.equal(got, expected)
    torch.testing.assert_close(loss, eager_loss)
    assert (result[2].cpu() == torch.tensor(1e-3)).all()
    assert_within_bound(torch.cdist(x, y).pow(2).cpu(), tuple(t.cpu() for t in result))
