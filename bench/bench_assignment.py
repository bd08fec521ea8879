"""assignment: exact one-to-one pairing of two equal-size batches (the optimal permutation).

Providers: eotfast.assignment (the auction, batched: `eotfast_cpu` the C++ kernel,
`eotfast_torch` the PyTorch reference, at n <= 256 only, its Jacobi rounds being slow on a
CPU; on a GPU (`-m gpu`) `eotfast_triton`, the Triton kernel on the CUDA cost), scipy's
linear_sum_assignment called directly, and POT's exact plan (ot.emd) turned into a
permutation by row argmax. The cost matrix is computed once, outside the timing. Every
provider must reach the optimal total cost (scipy's): exactly for scipy and POT, within the
auction's certified bound (m * epsilon, ~1e-5 of it by default in float32) for eotfast.

test_assignment_warm_start: the auction after a Sinkhorn solve on the same (shifted) cost, one
phase at the Sinkhorn epsilon, from the prices -g (`warm`, what pair(sampling="permutation")
does) or from zero prices scaled down from range / 8 (`cold`); the bids are recorded.
"""

import numpy as np
import ot
import pytest
import torch
from _bench_utils import RELATIVE_REG, TOL, image_batches, record, size_params, sync
from scipy.optimize import linear_sum_assignment

import eotfast
from eotfast.lap import warm_started_assignment
from eotfast.ops import solve as ops_solve

D = 3072
CPU, CUDA = torch.device("cpu"), torch.device("cuda")
SIZES = [(64, 1), (256, 1), (1024, 1), (256, 8)]
HEAVY = [(4096, 1)]


PROVIDERS = [pytest.param(p, CPU, id=p) for p in ("eotfast_cpu", "eotfast_torch", "scipy_lsa",
             "pot_emd")] + [pytest.param("eotfast_triton", CUDA, id="eotfast_triton-cuda",
                                         marks=pytest.mark.gpu)]  # fmt: skip


@pytest.mark.parametrize("provider,device", PROVIDERS)
@pytest.mark.parametrize("n,batch", size_params(SIZES, HEAVY, keys=("n", "b")))
def test_assignment(benchmark, provider, device, n, batch):
    if provider == "eotfast_torch" and n * batch > 256:
        pytest.skip("the torch reference's Jacobi rounds: n <= 256 on a CPU")
    x, y = image_batches(n, D, batch)
    cost = eotfast.cost_matrix(x, y, batch_dims=1)  # [batch, n, n] float32
    cost64 = cost.double().numpy()
    solver_cost = cost.to(device)
    uniform = np.full(n, 1 / n)
    bound, n_bids = [0.0] * batch, None

    if provider.startswith("eotfast"):
        backend = provider.removeprefix("eotfast_")

        def solve():
            out = eotfast.auction(solver_cost, backend=backend)
            sync(device)
            return out
    elif provider == "scipy_lsa":

        def solve():
            return np.stack([linear_sum_assignment(cost64[k])[1] for k in range(batch)])
    else:

        def solve():
            plans = [ot.emd(uniform, uniform, cost64[k], numItermax=10_000_000)
                     for k in range(batch)]  # fmt: skip
            return np.stack([p.argmax(1) for p in plans])

    columns = benchmark.pedantic(solve, rounds=1 if n >= 4096 else 3, iterations=1)
    if provider.startswith("eotfast"):
        bound, n_bids = columns.bound.tolist(), columns.n_bids.tolist()
        columns = columns.assignment.cpu().numpy()
    totals = [cost64[k][np.arange(n), columns[k]].sum() for k in range(batch)]
    optimal = [cost64[k][linear_sum_assignment(cost64[k])].sum() for k in range(batch)]
    gap = [(t - o) / o for t, o in zip(totals, optimal, strict=True)]
    assert all(t <= o * (1 + 1e-9) + b for t, o, b in zip(totals, optimal, bound, strict=True))
    assert all(len(set(c.tolist())) == n for c in columns), f"{provider} is not a permutation"
    record(benchmark, "assignment", provider, n, D, batch, gap_closed=1.0, distinct_targets=1.0,
           relative_excess=max(gap), n_bids=n_bids)  # fmt: skip


@pytest.mark.parametrize("start", ["warm", "cold"])
@pytest.mark.parametrize(
    "backend,device",
    [pytest.param("cpu", CPU, id="cpu"),
     pytest.param("triton", CUDA, id="triton-cuda", marks=pytest.mark.gpu)],
)  # fmt: skip
@pytest.mark.parametrize("n,batch", size_params([(256, 1), (1024, 1)], [(4096, 1)], ("n", "b")))
def test_assignment_warm_start(benchmark, start, backend, device, n, batch):
    x, y = image_batches(n, D, batch)
    cost = eotfast.cost_matrix(x.to(device), y.to(device), batch_dims=1)
    result, shifted, _ = ops_solve.sinkhorn(
        cost, None, None, epsilon=eotfast.epsilon_from_reg(cost, RELATIVE_REG, True),
        backend=backend, max_iter=10_000, tol=TOL, scaling=0.5, relaxation=None,
    )  # fmt: skip
    zeros = torch.zeros(batch, n, device=device)

    def solve():
        if start == "warm":
            out = warm_started_assignment(shifted, result, backend=backend)
        else:
            span = shifted.amax(dim=(-2, -1))
            out = ops_solve.auction(
                shifted, zeros, epsilon_start=span / 8, epsilon_final=result.epsilon,
                scaling=0.2, max_bids=10**9, backend=backend,
            )  # fmt: skip
        sync(device)
        return out

    out = benchmark.pedantic(solve, rounds=5, iterations=1, warmup_rounds=1)
    cost64 = cost.double().cpu()
    rows = torch.arange(n)
    totals = [float(cost64[k][rows, out.assignment[k].cpu()].sum()) for k in range(batch)]
    optimal = [float(cost64[k].numpy()[linear_sum_assignment(cost64[k].numpy())].sum())
               for k in range(batch)]  # fmt: skip
    random = [float(cost64[k].mean(1).sum()) for k in range(batch)]
    gap_closed = min((r - t) / (r - o) for r, t, o in zip(random, totals, optimal, strict=True))
    record(benchmark, "assignment_after_sinkhorn", f"eotfast_{backend}_{start}", n, D, batch,
           gap_closed=gap_closed, distinct_targets=1.0, n_bids=out.n_bids.tolist(),
           sinkhorn_epsilon=result.epsilon.tolist())  # fmt: skip


@pytest.mark.parametrize("backend", ["cpu", "torch"])
@pytest.mark.parametrize("d", [2, D], ids=["points2d", "images"])
@pytest.mark.parametrize("n", [128, 1024], ids=["n128", "n1024"])
def test_pair_exact_backend_torch_vs_cpu(benchmark, backend, d, n):
    """pair(x, y, method="exact") with backend "torch" (the Jacobi auction of
    eotfast/ops/torch_backend.py, what "auto" runs on MPS) against "cpu" (the C++ kernel), on
    the CPU, cost matrix included: uniform 2-D points in [0, 1]^2 (near-degenerate costs, long
    price wars) and image-like batches (d = 3072). Both must reach scipy's optimum within the
    auction's default bound (~1e-5 of it in float32)."""
    if d == 2:
        generator = torch.Generator().manual_seed(0)
        x, y = (torch.rand(1, n, 2, generator=generator) for _ in range(2))
    else:
        x, y = image_batches(n, d, 1)

    def solve():
        return eotfast.pair(x, y, method="exact", backend=backend, batch_dims=1)

    slow = backend == "torch" and n >= 1024
    columns = benchmark.pedantic(solve, rounds=1 if slow else 3, iterations=1)[0].numpy()
    cost64 = eotfast.cost_matrix(x, y, batch_dims=1)[0].double().numpy()
    total = cost64[np.arange(n), columns].sum()
    optimal = cost64[linear_sum_assignment(cost64)].sum()
    assert len(set(columns.tolist())) == n, f"{backend} is not a permutation"
    assert total <= optimal * (1 + 1e-4), (total, optimal)
    record(benchmark, "pair_exact", f"eotfast_{backend}", n, d, 1, distinct_targets=1.0,
           relative_excess=(total - optimal) / optimal)  # fmt: skip
