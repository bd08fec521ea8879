"""eotfast.linear_sum_assignment against scipy.optimize.linear_sum_assignment, the oracle: the
same contract (min(n, m) index pairs with ascending rows, rectangular both ways, numpy in and
numpy out, +inf for a forbidden pair, the same errors) and scipy's optimal total, exactly on
integer costs and within the documented bound on the others."""

import numpy as np
import pytest
import scipy.optimize
import torch

import eotfast
from eotfast import lap
from eotfast.ops import solve

INF = np.inf
# (n, m): one entry, one row, one column, square, and both rectangular orientations.
SHAPES = [(1, 1), (1, 6), (6, 1), (5, 9), (9, 5), (30, 30), (40, 70), (70, 40)]
# The Triton interpreter takes seconds per auction even at a few rows: tiny problems there.
INTERPRETER_SHAPES = [(3, 4), (4, 3)]


pytestmark = pytest.mark.usefixtures("one_thread_for_the_torch_reference")


def shapes_for(backend, device, shapes=SHAPES):
    """The shapes a backend's test runs: all of them, or the interpreter's few."""
    if backend == "triton" and device.type == "cpu":
        return INTERPRETER_SHAPES
    return shapes


def to_numpy(value) -> np.ndarray:
    return value.cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)


def float_bound(cost: np.ndarray, maximize: bool = False) -> float:
    """The documented guarantee on non-integer costs: 1e-9 * min(n, m) * F, F the largest
    allowed entry of the (negated when maximizing) cost minus each row's minimum (each
    column's when n > m), plus the float64 rounding of the sums (a few ulps of the largest
    |cost| per pair)."""
    n, m = cost.shape
    solved = -cost if maximize else cost
    solved = solved if n <= m else solved.T
    allowed = np.isfinite(solved)
    row_min = np.where(allowed, solved, INF).min(axis=1, keepdims=True)
    largest = np.where(allowed, solved - row_min, 0).max()
    rounding = 8 * min(n, m) * np.finfo(np.float64).eps * np.abs(solved[allowed]).max()
    return 1e-9 * min(n, m) * largest + rounding


def assert_matches_scipy(cost, rows, cols, *, maximize=False, exact_total=None) -> None:
    """(rows, cols) is a valid answer for one 2-D `cost`: scipy's form (int64, min(n, m)
    pairs, rows ascending, no row or column twice) and scipy's optimal total: equal when the
    cost is integer-valued (or `exact_total`), else within :func:`float_bound`."""
    cost = np.asarray(cost, dtype=np.float64)
    rows, cols = to_numpy(rows), to_numpy(cols)
    n, m = cost.shape
    k = min(n, m)
    assert rows.dtype == cols.dtype == np.int64
    assert rows.shape == cols.shape == (k,)
    assert (np.diff(rows) > 0).all(), rows  # ascending, hence distinct
    assert len(np.unique(cols)) == k, cols
    assert ((rows >= 0) & (rows < n)).all() and ((cols >= 0) & (cols < m)).all()
    total = cost[rows, cols].sum()
    expected_rows, expected_cols = scipy.optimize.linear_sum_assignment(cost, maximize=maximize)
    expected = cost[expected_rows, expected_cols].sum()
    assert np.isfinite(total), "a forbidden pair was used"
    finite = cost[np.isfinite(cost)]
    if exact_total or (exact_total is None and (finite == np.round(finite)).all()):
        assert total == expected
    else:
        excess = (expected - total) if maximize else (total - expected)
        bound = float_bound(cost, maximize)
        assert -bound <= excess <= bound, (excess, bound)


def solve_each(cost, rows, cols, **kwargs) -> None:
    """assert_matches_scipy on every problem of a batch [..., n, m]."""
    cost = to_numpy(cost)
    rows, cols = to_numpy(rows), to_numpy(cols)
    k = min(cost.shape[-2:])
    assert rows.shape == cols.shape == (*cost.shape[:-2], k)
    for index in np.ndindex(cost.shape[:-2]):
        assert_matches_scipy(cost[index], rows[index], cols[index], **kwargs)


# ----------------------------------------------------------------------------- optimality
def test_random_costs_on_every_backend(backend, device):
    for n, m in shapes_for(backend, device):
        cost = torch.rand(n, m, dtype=torch.float64, device=device)
        rows, cols = eotfast.linear_sum_assignment(cost, backend=backend)
        assert isinstance(rows, torch.Tensor) and rows.device == cols.device == cost.device
        assert_matches_scipy(cost.cpu().numpy(), rows, cols)


@pytest.mark.parametrize(
    "low,high,offset",
    [(0, 3, 0), (0, 100, 0), (0, 10**6, 0), (-(10**6), 10**6, 0), (0, 100, 10**9),
     (0, 10**9, 0)],
    ids=["0..2", "0..99", "0..1e6", "-1e6..1e6", "1e9+0..99", "0..1e9"],
)  # fmt: skip
def test_integer_costs_reach_scipys_total_exactly(backend, device, low, high, offset):
    # Equal totals, from mostly ties (0..2) to the widest range here (0..1e9, m * 1e9 far
    # below the 2**47 that float64 exactness needs), and offsets that the row shift removes.
    generator = torch.Generator().manual_seed(high)
    for n, m in shapes_for(backend, device, [(20, 35), (35, 20), (64, 64)]):
        cost = torch.randint(low, high, (n, m), generator=generator, dtype=torch.int64) + offset
        rows, cols = eotfast.linear_sum_assignment(cost.to(device), backend=backend)
        assert_matches_scipy(cost.numpy(), rows, cols, exact_total=True)


def test_a_common_offset_costs_no_precision():
    # 1e6 + U(0, 1): the spread is 1, the magnitude 1e6. eotfast.auction's default epsilon
    # follows the magnitude (1e-6 of the row minima, bound 64 at 64 x 64): its assignment
    # was 2.05 above the optimum on the first problem here, where this one allows 2e-7.
    rng = np.random.default_rng(1)
    for n, m in [(64, 64), (40, 90), (90, 40)]:
        cost = 1e6 + rng.random((n, m))
        assert_matches_scipy(cost, *eotfast.linear_sum_assignment(cost))


def test_row_and_column_offsets_cost_no_precision():
    # Offsets up to 1e6 that differ per row (n <= m) or per column (n > m) move every total
    # by the same amount; the entries spread over 1e-6 beyond them. The bound must follow
    # that spread: one relative to the offsets' range (1e-9 * n * 1e6) would not tell the
    # optimum from assignments 1e-6 dearer.
    rng = np.random.default_rng(2)
    for n, m in [(50, 80), (80, 50)]:
        offsets = 1e6 * rng.random((n, 1) if n <= m else (1, m))
        cost = offsets + 1e-6 * rng.random((n, m))
        assert_matches_scipy(cost, *eotfast.linear_sum_assignment(cost))


def test_the_certified_bound_is_the_documented_one(monkeypatch):
    # The comparisons with scipy rarely see a looser epsilon: the auction is mostly optimal
    # far beyond its bound (a bound of 2 instead of 0.5 on integer costs passed 75 of 75
    # comparisons on 64 x 64 to 200 x 200 costs). So the bound that the guarantee rests on
    # is read off the auction's own result: below 1 on integer costs (hence optimal), at most
    # 1e-9 * min(n, m) * F on the others, F computed here from the cost.
    bounds, auction = [], solve.auction

    def recording(*args, **kwargs):
        result = auction(*args, **kwargs)
        bounds.append(result.bound)
        return result

    monkeypatch.setattr(solve, "auction", recording)
    rng = np.random.default_rng(12)
    integral = [
        rng.integers(0, 100, (20, 35)), rng.integers(0, 100, (35, 20)),
        rng.integers(0, 10**6, (64, 64)) + 10**9, rng.random((9, 9)) > 0.5,
        np.where(rng.random((8, 8)) < 0.2, INF, rng.integers(0, 9, (8, 8))),
        np.eye(5) + 0.5,  # integral once each row's minimum is subtracted
    ]  # fmt: skip
    for cost in integral:
        eotfast.linear_sum_assignment(cost)
        assert float(bounds.pop()) < 1, cost
    for cost in [rng.random((20, 35)), rng.random((35, 20)), 1e6 + rng.random((30, 30))]:
        eotfast.linear_sum_assignment(cost)
        n, m = cost.shape
        solved = cost if n <= m else cost.T
        largest = (solved - solved.min(axis=1, keepdims=True)).max()
        assert 0 < float(bounds.pop()) <= 1e-9 * min(n, m) * largest * (1 + 1e-12)


@pytest.mark.parametrize("n,m", [(1, 1), (7, 7), (5, 12), (12, 5), (40, 40)])
def test_ties(n, m):
    # Many equal entries, and all-equal costs: any injection among the ties, scipy's total.
    rng = np.random.default_rng(n * m)
    for cost in (rng.integers(0, 3, (n, m)), np.full((n, m), 3.5), np.zeros((n, m))):
        assert_matches_scipy(cost, *eotfast.linear_sum_assignment(cost))
    cost = rng.integers(0, 2, (n, m)).astype(bool)
    assert_matches_scipy(cost, *eotfast.linear_sum_assignment(cost))


@pytest.mark.parametrize("integer", [False, True], ids=["float", "int"])
def test_batched_tensors_solve_each_problem(backend, device, integer):
    for n, m in shapes_for(backend, device, [(6, 9), (9, 6)]):
        batch = (2,) if backend == "triton" and device.type == "cpu" else (2, 3)
        cost = torch.rand(*batch, n, m, dtype=torch.float64)
        if integer:
            cost = (cost * 10).floor()
        rows, cols = eotfast.linear_sum_assignment(cost.to(device), backend=backend)
        assert rows.device == cost.to(device).device and rows.dtype == torch.int64
        solve_each(cost, rows, cols)


def test_batched_numpy_arrays_solve_each_problem():
    rng = np.random.default_rng(3)
    for shape in [(4, 8, 8), (2, 3, 5, 7), (3, 7, 5)]:
        cost = rng.random(shape)
        rows, cols = eotfast.linear_sum_assignment(cost)
        assert isinstance(rows, np.ndarray) and isinstance(cols, np.ndarray)
        solve_each(cost, rows, cols)


@pytest.mark.parametrize("n,m", [(8, 8), (6, 11), (11, 6)])
def test_maximize(n, m):
    rng = np.random.default_rng(4)
    for cost in (rng.random((n, m)), rng.integers(-50, 50, (n, m))):
        rows, cols = eotfast.linear_sum_assignment(cost, maximize=True)
        assert_matches_scipy(cost, rows, cols, maximize=True)
    tensor = torch.from_numpy(rng.random((2, n, m)))
    rows, cols = eotfast.linear_sum_assignment(tensor, True)
    solve_each(tensor, rows, cols, maximize=True)


# ----------------------------------------------------------------------------- types
def test_numpy_in_numpy_out():
    rng = np.random.default_rng(5)
    for cost in (rng.random((6, 9)), rng.random((9, 6)), np.asfortranarray(rng.random((7, 7)))):
        rows, cols = eotfast.linear_sum_assignment(cost)
        assert type(rows) is np.ndarray and type(cols) is np.ndarray
        assert_matches_scipy(cost, rows, cols)
    cost = rng.random((9, 6))
    before = cost.copy()
    eotfast.linear_sum_assignment(cost, maximize=True)
    assert np.array_equal(cost, before), "the input was modified"


@pytest.mark.parametrize(
    "make",
    [
        lambda c: c.tolist(),  # nested lists of floats
        lambda c: np.round(10 * c).astype(int).tolist(),  # nested lists of ints
        lambda c: np.round(10 * c).astype(np.int32),
        lambda c: np.round(10 * c).astype(np.uint8),
        lambda c: c > 0.5,  # bool
        lambda c: c.astype(np.float32),
        lambda c: c.T,  # a transposed view
        lambda c: c[:, ::2],  # a strided view
    ],
    ids=["list-float", "list-int", "int32", "uint8", "bool", "float32", "view-T", "view-strided"],
)
def test_array_likes(make):
    cost = make(np.random.default_rng(6).random((7, 10)))
    rows, cols = eotfast.linear_sum_assignment(cost)
    assert type(rows) is np.ndarray and rows.dtype == np.int64
    assert_matches_scipy(np.asarray(cost, dtype=np.float64), rows, cols)


@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.float64, torch.bfloat16, torch.int64, torch.int16, torch.bool]
)
def test_tensor_in_tensor_out(backend, device, dtype):
    n, m = shapes_for(backend, device, [(8, 5)])[0]
    cost = (torch.rand(n, m) * 10).to(dtype).to(device)
    rows, cols = eotfast.linear_sum_assignment(cost, backend=backend)
    assert isinstance(rows, torch.Tensor) and isinstance(cols, torch.Tensor)
    assert rows.dtype == cols.dtype == torch.int64
    assert rows.device == cols.device == cost.device
    # scipy on the same values in float64 (bfloat16 and float32 convert exactly).
    assert_matches_scipy(cost.double().cpu().numpy(), rows, cols)


def test_tensors_requiring_grad_and_views():
    cost = torch.rand(2, 9, 6, dtype=torch.float64, requires_grad=True)
    rows, cols = eotfast.linear_sum_assignment(cost)
    solve_each(cost.detach(), rows, cols)
    view = cost.detach().mT  # [2, 6, 9], not contiguous
    solve_each(view, *eotfast.linear_sum_assignment(view))


@pytest.mark.parametrize("shape", [(0, 0), (0, 4), (4, 0), (2, 0, 3), (0, 3, 3)])
def test_empty(shape):
    k = min(shape[-2:])
    if len(shape) == 2:
        expected = scipy.optimize.linear_sum_assignment(np.zeros(shape))
        assert all(e.shape == (0,) and e.dtype == np.int64 for e in expected)
    for cost in (np.zeros(shape), torch.zeros(shape)):
        rows, cols = eotfast.linear_sum_assignment(cost)
        assert type(rows) is type(cost) and tuple(rows.shape) == tuple(cols.shape)
        assert tuple(rows.shape) == (*shape[:-2], k)
        assert to_numpy(rows).dtype == to_numpy(cols).dtype == np.int64


# ----------------------------------------------------------------------------- inf and NaN
@pytest.mark.parametrize(
    "bad,maximize", [(np.nan, False), (-INF, False), (np.nan, True), (INF, True)]
)
def test_invalid_entries_are_refused_like_scipy(bad, maximize):
    cost = np.random.default_rng(7).random((4, 5))
    cost[2, 3] = bad
    with pytest.raises(ValueError, match="matrix contains invalid numeric entries"):
        scipy.optimize.linear_sum_assignment(cost, maximize=maximize)
    for value in (cost, torch.from_numpy(cost), cost.T):
        with pytest.raises(ValueError, match="cost matrix contains invalid numeric entries"):
            eotfast.linear_sum_assignment(value, maximize=maximize)


@pytest.mark.slow
@pytest.mark.parametrize(
    "bad,maximize", [(np.nan, False), (-INF, False), (np.nan, True), (INF, True)]
)
def test_invalid_entries_are_refused_when_compiled(bad, maximize):
    # Compiled, values are not read while tracing: NaN and -inf gave an arbitrary assignment.
    torch._dynamo.reset()
    cost = torch.from_numpy(np.random.default_rng(7).random((4, 5)))
    cost[2, 3] = bad
    compiled = torch.compile(eotfast.linear_sum_assignment, fullgraph=True, backend="aot_eager")
    with pytest.raises(RuntimeError, match="cost contains invalid numeric entries"):
        compiled(cost, maximize)
    valid = torch.where(cost.isfinite(), cost, 0.5)
    rows, cols = compiled(valid, maximize)  # and the same graph solves a valid cost
    assert_matches_scipy(valid.numpy(), rows, cols, maximize=maximize)


@pytest.mark.parametrize("n,m", [(6, 6), (5, 8), (8, 5), (20, 20)])
@pytest.mark.parametrize("integer", [False, True], ids=["float", "int"])
def test_forbidden_pairs_like_scipy(n, m, integer):
    # +inf (-inf when maximizing) forbids a pair: the same feasibility verdict as scipy on
    # problems near the edge of feasibility, and scipy's total on the feasible ones.
    rng = np.random.default_rng(n * m + integer)
    verdicts = set()
    for trial in range(40):
        cost = rng.integers(0, 20, (n, m)).astype(float) if integer else rng.random((n, m))
        cost[rng.random((n, m)) < rng.uniform(0.5, 0.9)] = INF  # both sides of feasibility
        maximize = trial % 2 == 1
        if maximize:
            cost = -cost
        try:
            scipy.optimize.linear_sum_assignment(cost, maximize=maximize)
        except ValueError as error:
            assert "infeasible" in str(error)
            with pytest.raises(ValueError, match="cost matrix is infeasible"):
                eotfast.linear_sum_assignment(cost, maximize=maximize)
            verdicts.add("infeasible")
            continue
        rows, cols = eotfast.linear_sum_assignment(cost, maximize=maximize)
        assert_matches_scipy(cost, rows, cols, maximize=maximize)
        verdicts.add("feasible")
    assert verdicts == {"feasible", "infeasible"}, "the trials must cover both verdicts"


def test_forbidden_pairs_in_batches_and_tensors():
    # A problem whose only feasible assignment is the anti-diagonal, its transpose and a
    # random one, batched; as numpy and as a CPU tensor.
    n = 7
    cost = np.full((3, n, n), INF)
    cost[0, np.arange(n), n - 1 - np.arange(n)] = 5.0
    cost[1] = cost[0].T + np.triu(np.ones((n, n)))  # +inf stays +inf
    cost[2] = np.random.default_rng(8).random((n, n))
    for value in (cost, torch.from_numpy(cost)):
        rows, cols = eotfast.linear_sum_assignment(value)
        solve_each(cost, rows, cols)
    cost[1, 3] = INF  # a row with no allowed pair: the whole call is refused
    with pytest.raises(ValueError, match="cost matrix is infeasible"):
        eotfast.linear_sum_assignment(cost)


# ----------------------------------------------------------------------------- the device path
@pytest.fixture
def values_not_read(monkeypatch):
    """The path of GPU tensors (and compiled code), run on CPU tensors: linear_sum_assignment
    reads no value back, every decision is a tensor op."""
    monkeypatch.setattr(lap, "values_checkable", lambda tensor: False)


@pytest.mark.usefixtures("values_not_read")
def test_device_path_matches_scipy(backend, device):
    rng = np.random.default_rng(9)
    shapes = shapes_for(backend, device, [(9, 9), (6, 11), (11, 6)])
    for n, m in shapes:
        for cost in (
            rng.random((2, n, m)),  # floats, batched
            rng.integers(0, 3, (n, m)).astype(float),  # ties
            rng.integers(0, 10**6, (n, m)).astype(float),  # a wide integer range
            1e6 + rng.random((n, m)),  # a common offset
            1e6 * rng.random((n, 1) if n <= m else (1, m)) + 1e-6 * rng.random((n, m)),
        ):
            tensor = torch.from_numpy(cost).to(device)
            rows, cols = eotfast.linear_sum_assignment(tensor, backend=backend)
            assert rows.device == tensor.device
            solve_each(cost, rows, cols)
        maximized = rng.random((n, m))
        rows, cols = eotfast.linear_sum_assignment(
            torch.from_numpy(maximized).to(device), True, backend=backend
        )
        assert_matches_scipy(maximized, rows, cols, maximize=True)


@pytest.mark.usefixtures("values_not_read")
def test_device_path_avoids_forbidden_pairs_when_it_can():
    rng = np.random.default_rng(10)
    solved = 0
    for n, m in [(8, 8), (6, 10), (10, 6)]:
        for _ in range(20):
            cost = rng.integers(0, 20, (n, m)).astype(float)
            cost[rng.random((n, m)) < 0.5] = INF
            try:
                scipy.optimize.linear_sum_assignment(cost)
            except ValueError:
                continue  # infeasible: not reported on this path (documented)
            assert_matches_scipy(cost, *eotfast.linear_sum_assignment(torch.from_numpy(cost)))
            solved += 1
    assert solved >= 10, solved


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_no_host_sync_on_a_gpu():
    # Every decision (integral costs, forbidden pairs, the transpose's order) is a tensor op:
    # CUDA's sync check raises on any host read. Each case runs once first, so that kernel
    # compilation (which may synchronize) is done before the check.
    generator = torch.Generator().manual_seed(11)
    forbidden = torch.rand(40, 40, generator=generator) < 0.3
    cases = [
        (torch.rand(2, 40, 60, dtype=torch.float64, generator=generator), False),
        (torch.randint(0, 100, (60, 40), generator=generator).float(), False),
        (torch.rand(40, 40, generator=generator).masked_fill(forbidden, INF), False),
        (torch.rand(40, 60, generator=generator), True),
    ]
    on_gpu = [cost.cuda() for cost, _ in cases]  # the copies to the GPU synchronize
    for cost, (_, maximize) in zip(on_gpu, cases, strict=True):
        eotfast.linear_sum_assignment(cost, maximize)
    torch.cuda.synchronize()
    results = []
    torch.cuda.set_sync_debug_mode("error")
    try:
        for cost, (_, maximize) in zip(on_gpu, cases, strict=True):
            results.append(eotfast.linear_sum_assignment(cost, maximize))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for (cost, maximize), (rows, cols) in zip(cases, results, strict=True):
        assert rows.is_cuda and cols.is_cuda
        solve_each(cost, rows, cols, maximize=maximize)


# ----------------------------------------------------------------------------- bad arguments
@pytest.mark.parametrize(
    "cost,error,match",
    [
        (np.zeros(3), ValueError, r"cost must be a matrix of shape \(n, m\).*got shape \(3,\)"),
        (5.0, ValueError, r"cost must be a matrix of shape \(n, m\).*got shape \(\)"),
        (torch.zeros(4), ValueError, r"cost must be a matrix.*got shape \(4,\)"),
        ([[1, 2], [3]], ValueError, "cost must be a rectangular array of numbers"),
        ([["a", "b"]], TypeError, "cost must hold real numbers.*got dtype <U1"),
        (np.ones((2, 2), dtype=complex), TypeError, "cost must hold real numbers"),
        (torch.ones(2, 2, dtype=torch.complex64), TypeError, "cost must hold real numbers"),
        (np.array([[None, 1]]), TypeError, "cost must hold real numbers.*object"),
    ],
    ids=["1-D", "0-D", "1-D-tensor", "ragged", "strings", "complex", "complex-tensor", "object"],
)
def test_bad_costs_are_refused_naming_cost(cost, error, match):
    with pytest.raises(error, match=match):
        eotfast.linear_sum_assignment(cost)


def test_a_range_beyond_float64_is_refused():
    # scipy solves it; the auction's shifted cost would hold inf (1e308 - (-1e308)).
    with pytest.raises(ValueError, match="cost's entries span more than float64 holds"):
        eotfast.linear_sum_assignment([[1e308, -1e308], [0.0, 1.0]])
    with pytest.raises(ValueError, match="cost's entries span more than float64 holds"):
        eotfast.linear_sum_assignment([[0.0, 1e308, INF], [0.0, 1.0, 2.0]])  # the forbidden price


def test_maximize_must_be_a_bool():
    with pytest.raises(TypeError, match="maximize must be a bool, got str"):
        eotfast.linear_sum_assignment(np.eye(3), maximize="yes")
    rows, cols = eotfast.linear_sum_assignment(np.eye(3), maximize=np.True_)
    assert_matches_scipy(np.eye(3), rows, cols, maximize=True)


def test_backend_is_checked():
    with pytest.raises(ValueError, match="backend must be one of"):
        eotfast.linear_sum_assignment(np.eye(3), backend="gpu")
