"""The auction ops (eotfast::auction_<backend>) against scipy's linear_sum_assignment, on every
backend that has one: torch (the reference), cpu (the C++ kernel) and triton (kernels/auction.py,
under the interpreter or on a GPU).

Every backend implements one contract: an injection of the rows into the columns whose total
cost is within m * epsilon of the optimum (exactly optimal for integer costs when
m * epsilon < 1), or epsilon = inf when max_bids stopped it. The oracle is scipy, never
another backend.

Without a GPU the Triton kernel runs through Triton's interpreter on CPU tensors (conftest.py
sets TRITON_INTERPRET=1 and marks those cases `interpreter`), about 0.1 s per round of bids:
there the tests take their small problems and short epsilon schedules. The interpreter runs a
program's warps in lockstep, so it cannot show a missing barrier: tests/test_triton_compile.py
checks the compiled kernel for that, and the GPU tests at the end repeat a solve to catch
results that move between runs.
"""

import math

import numpy as np
import pytest
import torch
from oracles import (
    assert_injection,
    assert_refused_eagerly_and_faked,
    backend_device,
    optimum,
    total,
)

import eotfast
from eotfast.ops.registry import BACKENDS as REGISTRY
from eotfast.ops.registry import triton_runs_on

DTYPES = [torch.float32, torch.float64]
# (n, m): one row, one column, n < m, n = m, and sizes that are no multiple of a vector width;
# the interpreter runs the few of INTERPRETER_SHAPES (up to a few dozen entries) only.
SHAPES = [(1, 1), (1, 9), (3, 6), (4, 4), (4, 6), (5, 7), (5, 9), (9, 9), (7, 13), (64, 64),
          (200, 257)]  # fmt: skip
INTERPRETER_SHAPES = [(1, 1), (3, 6), (4, 4), (4, 6), (5, 7)]
MAX_BIDS = 10**8  # never reached by these tests unless they say so
requires_cuda = pytest.mark.skipif(
    not (torch.cuda.is_available() and triton_runs_on(torch.device("cuda"))),
    reason="needs a CUDA GPU that Triton runs on",
)

pytestmark = pytest.mark.usefixtures("one_thread_for_the_torch_reference")


@pytest.fixture
def backend(backend):
    """conftest's backends (its skips and its `interpreter` mark included) less cuda, which
    has no auction kernel of its own: its record runs auction_triton or auction_torch."""
    if backend == "cuda":
        pytest.skip("no eotfast::auction_cuda: backend='cuda' runs auction_triton or _torch")
    return backend


@pytest.fixture
def small(request):
    """Whether this case runs under the Triton interpreter (conftest's `interpreter` mark):
    there a test takes its small problem."""
    return "interpreter" in request.keywords


def skip_large_on_the_interpreter(small, n, m):
    if small and (n, m) not in INTERPRETER_SHAPES:
        pytest.skip(f"Triton interpreter: {n} x {m} is too slow there (a GPU runs it)")


def auction_op(backend: str):
    REGISTRY[backend].load()  # registers the backend's ops
    return getattr(torch.ops.eotfast, f"auction_{backend}")


def solve(
    cost,
    prices=None,
    *,
    epsilon_final,
    backend,
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
    start = torch.maximum(start, final).contiguous()
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
def test_random_costs_within_the_bound(backend, device, small, dtype, n, m):
    skip_large_on_the_interpreter(small, n, m)
    cost = torch.rand(3, n, m, dtype=dtype).to(device)
    result = solve(cost, epsilon_final=1e-3, backend=backend)
    columns, prices, epsilon, n_bids = result
    assert columns.shape == (3, n) and prices.shape == (3, m) and epsilon.shape == (3,)
    assert prices.dtype == epsilon.dtype == dtype and n_bids.dtype == torch.int64
    assert (epsilon.cpu() == torch.tensor(1e-3, dtype=dtype)).all()
    assert (n_bids.cpu() >= n).all()  # every row bids at least once
    assert_within_bound(cost, result)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,m", SHAPES)
def test_integer_costs_are_solved_exactly(backend, device, small, dtype, n, m):
    # m * epsilon < 1: an epsilon-optimal assignment of integer costs is optimal.
    skip_large_on_the_interpreter(small, n, m)
    cost = torch.randint(0, 100, (3, n, m)).to(dtype).to(device)
    columns, _, epsilon, _ = solve(cost, epsilon_final=0.9 / m, backend=backend)
    assert (m * epsilon.cpu() < 1).all()
    assert_optimal(cost, columns)


@pytest.mark.parametrize("dtype", DTYPES)
def test_fewer_rows_than_columns_take_the_cheap_columns(backend, device, small, dtype):
    # The first columns are dear for every row: an injection must skip them, which the
    # padding rows (zero cost) make possible without leaving a cheap column unclaimed.
    batch, n, m, dear = (1, 3, 6, 3) if small else (2, 6, 15, 9)
    cost = torch.randint(0, 10, (batch, n, m)).to(dtype)
    cost[:, :, :dear] += 1000
    cost = cost.to(device)
    columns, _, _, _ = solve(cost, epsilon_final=0.9 / m, backend=backend)
    assert_optimal(cost, columns)
    assert (columns.cpu() >= dear).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_one_row_takes_its_cheapest_column(backend, device, small, dtype):
    # Distinct integer costs: one cheapest column, ahead of the next by 1 > m * epsilon.
    batch, m, epsilon_final = (2, 5, 0.9 / 5) if small else (4, 33, 1e-9)
    cost = torch.stack([torch.randperm(m) for _ in range(batch)])[:, None, :].to(dtype)
    columns, _, _, _ = solve(cost.to(device), epsilon_final=epsilon_final, backend=backend)
    assert torch.equal(columns.cpu()[:, 0], cost[:, 0].argmin(-1))


@pytest.mark.parametrize("dtype", DTYPES)
def test_one_column(backend, device, dtype):
    cost = torch.tensor([[[3.0]], [[-2.0]]], dtype=dtype).to(device)
    columns, prices, epsilon, n_bids = solve(cost, epsilon_final=1e-3, backend=backend)
    assert columns.cpu().tolist() == [[0], [0]]
    assert (epsilon.cpu() == torch.tensor(1e-3, dtype=dtype)).all()
    # One bid per phase: epsilon 1, 0.2, 0.04, 0.008, 0.0016, 0.001 (no second column: each
    # bid raises the price by epsilon).
    assert n_bids.cpu().tolist() == [6, 6]
    expected = torch.tensor(1 + 0.2 + 0.04 + 0.008 + 0.0016 + 0.001, dtype=dtype)
    torch.testing.assert_close(prices.cpu(), expected.expand(2, 1))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,m", [(1, 1), (4, 6), (5, 9), (64, 64)])
def test_all_equal_costs(backend, device, small, dtype, n, m):
    skip_large_on_the_interpreter(small, n, m)
    cost = torch.full((2, n, m), 3.5, dtype=dtype).to(device)
    columns, _, epsilon, _ = solve(cost, epsilon_final=1e-3, backend=backend)
    assert_optimal(cost, columns)
    assert (epsilon.cpu() == torch.tensor(1e-3, dtype=dtype)).all()


# The problems whose rows (dim 1) or columns (dim 2) are repeated: [B, n, m] before, full size
# and the interpreter's.
DUPLICATED = {
    ("rows", False): (2, 10, 24),
    ("columns", False): (2, 20, 12),
    ("rows", True): (1, 3, 7),
    ("columns", True): (1, 5, 4),
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("repeated", ["rows", "columns"])
def test_duplicated_rows_or_columns(backend, device, small, dtype, repeated):
    # Rows (columns) in identical pairs: each pair needs two distinct columns (makes two
    # equally good choices) however ties are broken.
    shape = DUPLICATED[repeated, small]
    base = torch.randint(0, 10 if small else 50, shape).to(dtype)
    cost = base.repeat_interleave(2, dim=1 if repeated == "rows" else 2).to(device)
    m = cost.shape[-1]
    columns, _, _, _ = solve(cost, epsilon_final=0.9 / m, backend=backend)
    assert_optimal(cost, columns)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scale", [1e-6, 1e6])
def test_cost_scales(backend, device, small, dtype, scale):
    # The bound scales with the costs when epsilon does.
    shape, relative, high = ((1, 4, 5), 1e-2, 20) if small else ((2, 40, 50), 1e-4, 100)
    m = shape[-1]
    cost = (scale * torch.rand(shape, dtype=torch.float64)).to(dtype).to(device)
    result = solve(cost, epsilon_final=relative * scale, backend=backend)
    assert_within_bound(cost, result)
    integer = (scale * torch.randint(0, high, shape)).to(dtype).to(device)
    columns, _, _, _ = solve(integer, epsilon_final=0.9 * scale / m, backend=backend)
    assert_optimal(integer, columns)


# ----------------------------------------------------------------------------- batches
@pytest.mark.parametrize("dtype", DTYPES)
def test_each_problem_of_a_batch_stops_on_its_own(backend, device, small, dtype):
    # An easy problem (each row's own column is far the cheapest: one bid per row per phase)
    # beside a hard one: each is solved, and counts, as if it were alone. Epsilon 1, 0.2,
    # 0.04 and 0.9 / 48 (1, 0.2 and 0.9 / 5): the phases of the easy problem.
    n, phases, high = (5, 3, 100) if small else (48, 4, 1000)
    easy = 1 - torch.eye(n, dtype=dtype)
    hard = torch.randint(0, high, (n, n)).to(dtype)
    cost = torch.stack([easy, hard]).to(device)
    batch = solve(cost, epsilon_final=0.9 / n, backend=backend)
    assert_optimal(cost, batch[0])
    assert torch.equal(batch[0].cpu()[0], torch.arange(n))
    for k in range(2):
        alone = solve(cost[k : k + 1], epsilon_final=0.9 / n, backend=backend)
        for got, expected in zip(batch, alone, strict=True):
            assert torch.equal(got[k].cpu(), expected[0].cpu()), k
    n_bids = batch[3].cpu().tolist()
    assert n_bids[0] == phases * n < n_bids[1], n_bids


@pytest.mark.parametrize("dtype", DTYPES)
def test_warm_start_with_good_prices_takes_fewer_bids(backend, device, small, dtype):
    shape, epsilon_final = ((1, 5, 7), 1e-3) if small else ((2, 100, 120), 1e-4)
    cost = torch.rand(shape, dtype=dtype).to(device)
    cold = solve(cost, epsilon_final=epsilon_final, backend=backend)
    prices = cold[1].clone()
    warm = solve(
        cost, prices, epsilon_final=epsilon_final, epsilon_start=epsilon_final, backend=backend
    )
    assert torch.equal(prices, cold[1]), "the input prices were modified in place"
    assert_within_bound(cost, warm)
    assert (warm[3].cpu() < cold[3].cpu()).all(), (warm[3], cold[3])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,m,max_bids", [(n, m, 1) for n, m in SHAPES] + [(4, 6, 7)])
def test_max_bids_reached_still_gives_an_injection(backend, device, small, dtype, n, m, max_bids):
    # One bid: the first queued row's; seven: some rows hold columns, the others take the
    # columns no real row holds. Either way an injection, and no bound claimed.
    skip_large_on_the_interpreter(small, n, m)
    cost = torch.rand(2, n, m, dtype=dtype).to(device)
    columns, _, epsilon, n_bids = solve(
        cost, epsilon_final=1e-3, max_bids=max_bids, backend=backend
    )
    assert_injection(columns, m)
    assert n_bids.cpu().tolist() == [max_bids, max_bids]
    assert torch.isinf(epsilon.cpu()).all(), "a stopped problem must not claim a bound"


# ----------------------------------------------------------------------------- robustness
@pytest.mark.parametrize("dtype", DTYPES)
def test_terminates_when_epsilon_is_below_the_prices_resolution(backend, device, small, dtype):
    # epsilon_final far below the ulp of C + p (about 1e-3 in float32 at 1e4): every bid must
    # still raise a price, or the phase would never end.
    n = 4 if small else 30
    cost = (1e4 + torch.randint(0, 3, (2, n, n))).to(dtype).to(device)
    columns, _, epsilon, _ = solve(cost, epsilon_final=1e-12, backend=backend)
    assert_injection(columns, n)
    assert (epsilon.cpu() == torch.tensor(1e-12, dtype=dtype)).all()
    assert_optimal(cost, columns)


@pytest.mark.parametrize("dtype", DTYPES)
def test_terminates_when_increments_are_below_the_prices_ulp(backend, device, dtype):
    # Prices of 2^24 (float32) or 2^53 (float64): one ulp is 2, and every increment (at most
    # the cost range 2 plus epsilon) rounds away; each bid must still raise its price (to the
    # next float), or the phase would never end.
    big = 2.0**24 if dtype == torch.float32 else 2.0**53
    cost = torch.randint(0, 3, (1, 4, 5)).to(dtype).to(device)
    prices = torch.full((1, 5), big, dtype=dtype, device=device)
    columns, final_prices, epsilon, n_bids = solve(
        cost, prices, epsilon_final=1e-3, epsilon_start=1e-3, backend=backend
    )
    assert_injection(columns, 5)
    assert (epsilon.cpu() == torch.tensor(1e-3, dtype=dtype)).all()
    raised = final_prices.cpu() > prices.cpu()
    assert 5 <= int(n_bids) < 1000 and raised.sum() >= 4, (n_bids, final_prices)


def test_noncontiguous_inputs(backend, device, small):
    shape, epsilon_final = ((1, 6, 4), 1e-2) if small else ((2, 30, 20), 1e-6)
    cost = torch.rand(shape, dtype=torch.float64).to(device).mT  # [B, m, n] viewed as [B, n, m]
    expected = solve(cost.contiguous(), epsilon_final=epsilon_final, backend=backend)
    got = solve(cost, epsilon_final=epsilon_final, backend=backend)
    for a, b in zip(got, expected, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_nonfinite_cost_is_refused_naming_cost(backend, device, bad):
    if device.type != "cpu":
        pytest.skip("values are checked on CPU tensors only (reading GPU values would sync)")
    cost = torch.rand(2, 5, 6, dtype=torch.float64)
    cost[1, 2, 3] = bad
    with pytest.raises(ValueError, match="cost contains"):
        solve(cost.to(device), epsilon_final=1e-3, backend=backend)


@pytest.mark.parametrize(
    "start,final", [(1.0, 0.0), (1.0, -1.0), (1e-3, 1e-2), (math.inf, 1e-3), (1.0, math.nan)]
)
def test_epsilons_out_of_order_are_refused_on_cpu_tensors(backend, device, start, final):
    # One value check per schema in every backend's op: the torch reference accepted
    # epsilon_final 0 (then claimed bound 0), NaN and -1, which the C++ op refused.
    if device.type != "cpu":
        pytest.skip("values are checked on CPU tensors only (reading GPU values would sync)")
    cost = torch.rand(2, 5, 7, dtype=torch.float64)
    start = torch.tensor([1.0, start], dtype=torch.float64)
    final = torch.tensor([1e-3, final], dtype=torch.float64)
    with pytest.raises(ValueError, match="problem 1 needs finite epsilons"):
        auction_op(backend)(cost, torch.zeros(2, 7, dtype=torch.float64), start, final, 0.2,
                            1000)  # fmt: skip


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
        ("epsilon_final", lambda t: t.double(), "epsilon_final must have cost's dtype"),
        ("scaling", lambda value: 1.0, r"scaling must be a number in \(0, 1\)"),
        ("scaling", lambda value: 0.0, r"scaling must be a number in \(0, 1\)"),
        ("max_bids", lambda value: 0, "max_bids must be >= 1"),
    ],
)
def test_malformed_arguments_are_refused_before_any_kernel(backend, device, argument, bad, match):
    # The ops are public and hand data pointers to kernels: a wrong shape or dtype must be an
    # error naming the argument, never a kernel reading past a buffer or with the wrong
    # element type; the fakes check the same.
    args = {
        "cost": torch.rand(2, 5, 7, device=device),
        "prices": torch.zeros(2, 7, device=device),
        "epsilon_start": torch.ones(2, device=device),
        "epsilon_final": torch.full((2,), 1e-3, device=device),
        "scaling": 0.2,
        "max_bids": 1000,
    }
    args[argument] = bad(args[argument])
    assert_refused_eagerly_and_faked(auction_op(backend).default, args.values(), match)


def test_cpu_threads_give_the_same_results():
    # Problems are spread over threads; each is solved as if alone, whatever thread takes it.
    cost = torch.rand(6, 100, 128)  # enough entries for the kernel to start a second thread
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = solve(cost, epsilon_final=1e-4, backend="cpu")
        torch.set_num_threads(2)
        two = solve(cost, epsilon_final=1e-4, backend="cpu")
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(one, two, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("op", ["auction_cpu", "auction_torch", "auction_triton"])
def test_auction_op_signature_matches_the_schema(op):
    """torch 2.11 infers a triton_op's schema from the implementation's annotations even when
    one is given: every auction op must be registered with AUCTION_SCHEMA itself (auction_op
    refuses annotations that differ from it, tests/test_ops.py)."""
    from eotfast.ops import triton_backend  # noqa: F401  (registers auction_triton)
    from eotfast.ops.common import AUCTION_SCHEMA

    if not hasattr(torch.ops.eotfast, op):
        pytest.skip(f"{op} is not registered in this process")
    registered = str(getattr(torch.ops.eotfast, op).default._schema)
    assert registered == f"eotfast::{op}{AUCTION_SCHEMA}"


def test_matches_scipy_on_image_like_costs(backend, device, small):
    # Squared distances of clustered points, the pairing workload: far from uniform noise.
    if small:
        pytest.skip("Triton interpreter: 96 x 96 is too slow there (a GPU runs it)")
    generator = torch.Generator().manual_seed(0)
    centres = torch.rand(4, 48, generator=generator) * 2 - 1
    labels = torch.randint(4, (2, 96, 2), generator=generator)
    points = centres[labels] + 0.3 * torch.randn(2, 96, 2, 48, generator=generator)
    cost = torch.cdist(points[:, :, 0], points[:, :, 1]).pow(2).double()
    scale = np.mean([optimum(c) for c in cost])
    result = solve(cost.to(device), epsilon_final=1e-9 * scale / 96, backend=backend)
    assert_within_bound(cost, result)


# ----------------------------------------------------------------------------- Triton only
# The Triton kernel's own knobs (tiles, launch grid, the epsilon steps its float schedule
# takes), and the GPU: results that repeat bitwise, no host sync, torch.compile.
TRITON_DEVICE = backend_device("triton")
requires_triton = pytest.mark.skipif(
    "triton" not in eotfast.available_backends(TRITON_DEVICE),
    reason="Triton cannot run here (no GPU and no interpreter)",
)


def triton_only(test):
    """Skipped where Triton cannot run, marked `interpreter` where it runs on CPU tensors (as
    conftest marks the triton backend)."""
    test = requires_triton(test)
    return pytest.mark.interpreter(test) if TRITON_DEVICE.type == "cpu" else test


@triton_only
def test_scaling_within_an_ulp_of_one_still_lowers_epsilon():
    # In float32, 1 - 1e-12 is 1: epsilon * scaling would stay epsilon, phase after phase. It
    # steps to the next float down instead: three ulps above epsilon_final, four phases (one
    # bid each on a 1 x 1 problem). (The C++ op refuses such a scaling.)
    final = torch.tensor(0.5)
    start = final
    for _ in range(3):
        start = torch.nextafter(start, torch.tensor(1.0))
    cost = torch.zeros(1, 1, 1, device=TRITON_DEVICE)
    _, _, epsilon, n_bids = solve(cost, epsilon_final=final, epsilon_start=start,
                                  scaling=1 - 1e-12, backend="triton")  # fmt: skip
    assert n_bids.cpu().tolist() == [4] and float(epsilon) == 0.5


@triton_only
@pytest.mark.slow
def test_bid_tiles_do_not_change_the_result():
    # Small tiles make every pass loop over several (slots, columns, bids): a round's bids
    # and winners do not depend on how they are split.
    from eotfast.kernels.auction import launch_auction

    cost = torch.randint(0, 30, (1, 5, 9)).double().to(TRITON_DEVICE)
    prices = torch.zeros(1, 9, dtype=torch.float64, device=TRITON_DEVICE)
    start = torch.full((1,), 30.0, dtype=torch.float64, device=TRITON_DEVICE)
    final = torch.full((1,), 0.9 / 9, dtype=torch.float64, device=TRITON_DEVICE)
    tiled = launch_auction(cost, prices, start, final, 0.2, MAX_BIDS, block_n=2, block_m=4,
                           block_s=4)  # fmt: skip
    assert_optimal(cost, tiled[0])
    whole = launch_auction(cost, prices, start, final, 0.2, MAX_BIDS)
    for got, expected in zip(tiled, whole, strict=True):
        assert torch.equal(got, expected)


@triton_only
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
    cost = _image_like_costs(batch, n, m, dtype).cuda()
    scale = float(cost.abs().max())
    # float32: about 30 ulps of the largest price (the caller's rule keeps 16).
    epsilon_final = (1e-6 if dtype == torch.float64 else 1e-3) * scale / m
    first = solve(cost, epsilon_final=epsilon_final, backend="triton")
    assert (first[2].cpu() == torch.tensor(epsilon_final, dtype=dtype)).all()
    assert_within_bound(cost, first)
    for _ in range(5):
        again = solve(cost, epsilon_final=epsilon_final, backend="triton")
        for one, other in zip(first, again, strict=True):
            assert torch.equal(one, other), "results move between runs"


@requires_cuda
def test_auction_triton_has_no_host_sync():
    cost = _image_like_costs(2, 128, 160, torch.float32).cuda()
    prices = torch.zeros(2, 160, device="cuda")
    start = torch.full((2,), float(cost.max()), device="cuda")
    final = torch.full((2,), 1e-3, device="cuda")
    options = {"epsilon_final": final, "epsilon_start": start, "backend": "triton"}
    solve(cost, prices, **options)  # compiles the kernel
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        columns, _, epsilon, _ = solve(cost, prices, **options)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert_injection(columns, 160)
    assert np.isfinite(epsilon.cpu().numpy()).all()


@requires_cuda
def test_auction_triton_inside_torch_compile_fullgraph():
    # A pairing step: the op is a triton_op, so torch.compile traces it into its graph (no
    # graph break), and the compiled step pairs as the eager one does.
    auction_triton = auction_op("triton")

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


# ----------------------------------------------------------------------------- torch only
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,m,max_bids", [(9, 9, MAX_BIDS), (5, 8, MAX_BIDS), (7, 9, 20)])
def test_torch_reference_scans_the_same_with_and_without_compaction(dtype, n, m, max_bids):
    # On CPU tensors the reference gathers the bidders' rows (their indices read by the host);
    # off the CPU it scans every row with a mask. Both must give the same results: here both
    # run on the CPU, with a problem that overflows (stopped, epsilon inf) beside two others.
    from eotfast.ops.torch_backend import auction_reference

    big = torch.finfo(dtype).max
    cost = torch.rand(3, n, m, dtype=dtype)
    cost[1] = (0.5 + 0.5 * cost[1]) * big  # C + p overflows from the first bid
    prices = torch.zeros(3, m, dtype=dtype)
    prices[1] = 0.6 * big
    start, final = torch.ones(3, dtype=dtype), torch.full((3,), 1e-3, dtype=dtype)
    compact = auction_reference(cost, prices, start, final, 0.5, max_bids, compact=True)
    masked = auction_reference(cost, prices, start, final, 0.5, max_bids, compact=False)
    for a, b in zip(compact, masked, strict=True):
        assert torch.equal(a, b)
    assert_injection(compact[0], m)
    assert math.isinf(float(compact[2][1]))
