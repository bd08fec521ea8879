"""Oracles and data shared by the tests (imported by conftest.py and the test files): each
independent oracle is written here once (scipy's optimal assignment, POT's exact OT cost and
log-domain Sinkhorn), with random marginals, the checks the tests share, and where and in
which precision each backend runs."""

import numpy as np
import ot
import pytest
import torch
from scipy.optimize import linear_sum_assignment

GPU = torch.cuda.is_available()


def backend_device(name: str) -> torch.device:
    """Where a backend's tests put their tensors: the GPU for triton and cuda when there is
    one (the interpreter runs triton on CPU tensors otherwise), the CPU for cpu and torch."""
    return torch.device("cuda" if GPU and name in ("triton", "cuda") else "cpu")


def solve_dtype(name: str, dtype: torch.dtype) -> torch.dtype:
    """The dtype a backend's Sinkhorn solves in: the GPU kernels are float32-only."""
    return torch.float32 if name in ("triton", "cuda") else dtype


def pot_sinkhorn_log(cost, a, b, epsilon, **kwargs):
    """POT's log-domain Sinkhorn in float64 on one [n, m] problem: (plan, f, g, log), the
    potentials in cost units."""
    n, m = cost.shape
    a = np.full(n, 1 / n) if a is None else a.double().cpu().numpy()
    b = np.full(m, 1 / m) if b is None else b.double().cpu().numpy()
    plan, log = ot.bregman.sinkhorn_log(
        a, b, cost.double().cpu().numpy(), float(epsilon), log=True, warn=False, **kwargs
    )
    return plan, epsilon * log["log_u"], epsilon * log["log_v"], log


def marginals(batch_shape, n, m, dtype=torch.float64, generator=None):
    """Random positive marginals of equal (unit) mass, [*batch, n] and [*batch, m]."""
    a = torch.rand(*batch_shape, n, dtype=dtype, generator=generator) + 0.1
    b = torch.rand(*batch_shape, m, dtype=dtype, generator=generator) + 0.1
    return a / a.sum(-1, keepdim=True), b / b.sum(-1, keepdim=True)


def assert_partners_are_row_maxima(partners, x, y):
    """Each partner has the largest plan weight of its row, up to float32 rounding, in the
    torch reference's plan (float64, converged far below any backend's tolerance): ties may
    pick either column, so indices are not compared."""
    import eotfast

    cost = eotfast.cost_matrix(x.double(), y.double(), batch_dims=x.dim() - 2)
    result = eotfast.sinkhorn(cost, backend="torch", tol=1e-9, max_iter=5000)
    log_weights = (result.g[..., None, :] - cost) / result.epsilon[..., None, None]
    chosen = log_weights.gather(-1, partners[..., None]).squeeze(-1)
    best = log_weights.amax(-1)
    assert (best - chosen <= 1e-3 * best.abs().clamp_min(1)).all(), (best - chosen).max()


# ----------------------------------------------------------------------------- assignment
def _float64(array) -> np.ndarray:
    """A tensor (any device and dtype) or an array-like as a float64 numpy array."""
    if isinstance(array, torch.Tensor):
        array = array.detach().cpu().double().numpy()
    return np.asarray(array, dtype=np.float64)


def optimum(cost) -> float:
    """The oracle: scipy's optimal total cost of one [n, m] problem (a tensor or an array), in
    float64."""
    cost64 = _float64(cost)
    return float(cost64[linear_sum_assignment(cost64)].sum())


def total(cost, columns) -> float:
    """Total cost of one [n, m] problem's assignment (a column per row), in float64."""
    cost64 = _float64(cost)
    columns = columns.cpu().numpy() if isinstance(columns, torch.Tensor) else np.asarray(columns)
    return float(cost64[np.arange(cost64.shape[0]), columns].sum())


def assert_injection(columns: torch.Tensor, m: int) -> None:
    """[B, n] int64 columns in [0, m), distinct within each problem."""
    columns = columns.cpu()
    assert columns.dtype == torch.int64
    assert ((columns >= 0) & (columns < m)).all(), columns
    for row in columns:
        assert row.unique().numel() == row.numel(), f"a column is used twice: {row.tolist()}"


# ----------------------------------------------------------------------------- exact OT
def pot_emd2(cost, a=None, b=None) -> float:
    """The oracle: POT's exact OT cost (network simplex) of one [n, m] problem in float64,
    uniform marginals where a or b is None. POT calls a problem whose costs are all negative
    infeasible: it solves the cost shifted to a minimum of 0, which has the same plans (the
    marginals have one mass), and the shift is added back."""
    cost64 = _float64(cost)
    n, m = cost64.shape
    a = np.full(n, 1 / n) if a is None else _float64(a)
    b = np.full(m, 1 / m) if b is None else _float64(b)
    low = min(float(cost64.min()), 0.0)
    return float(ot.emd2(a, b, cost64 - low)) + low * float(a.sum())


# ----------------------------------------------------------------------------- refusals
def assert_refused_eagerly_and_faked(function, args, match: str) -> None:
    """An op refuses `args` with ValueError or TypeError matching `match`, called eagerly and
    on fake tensors (its fake, what torch.compile traces, must check the same)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    args = list(args)
    with pytest.raises((ValueError, TypeError), match=match):
        function(*args)
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fake = [mode.from_tensor(v) if isinstance(v, torch.Tensor) else v for v in args]
        with pytest.raises((ValueError, TypeError), match=match):
            function(*fake)
