"""pair: the end-to-end pairing call of a training step, with the quality of its pairs.

Input: two image-like batches x, y (d features in [-1, 1]); output: a partner for every
source sample. Time covers everything the call does (cost matrix, solve, drawing the
partners). Quality beside time, since a fast pairing is only worth having if its pairs are
good: the fraction of the random-to-exact transport-cost gap the pairs close, and the
fraction of distinct targets (_bench_utils.pairing_quality). The Sinkhorn providers also
record the iterations and the marginal error ||P^T 1 - b||_2 of the plan they drew from
(eotfast's: from eotfast.sinkhorn on the same cost and settings, outside the timing).

Providers:
- eotfast.pair (method "sinkhorn", epsilon = 0.05 * std(cost), backend auto), the same with
  sampling="permutation" (Sinkhorn, then one auction phase at its epsilon from the prices
  -g: distinct targets), "exact" (the auction: one-to-one optimal, within 1e-5 of the
  optimum), "random" (the baseline), and "auto" (``pair(x, y)`` with every default: the
  auction on the CPU, Sinkhorn + permutation on CUDA);
- torchcfm's OTPlanSampler as its users call it: method "exact" (POT's emd, pairs drawn from
  the plan with replacement) and "sinkhorn" (its default reg = 0.05, absolute);
- POT: ot.dist + ot.bregman.sinkhorn_log (torch, the same epsilon and tol) + row sampling;
- GeomLoss: SamplesLoss("sinkhorn", p=2, blur=sqrt(epsilon / 2), scaling=0.5,
  debias=False, potentials=True, backend="tensorized") on x, y, then the plan's rows from
  its potentials (its cost |x - y|^2 / 2 computed once more: GeomLoss does not return it)
  and row sampling as for POT. Same epsilon, not the same stopping rule: GeomLoss anneals
  epsilon from diameter**2 (the bounding-box diagonal of x and y) by scaling**2 per
  iteration down to blur**2, runs one iteration at each value plus a last one at blur**2,
  and stops there, with no tolerance (9 iterations on these batches). Its marginal error
  is what that schedule bought.

test_pair_tolerance: eotfast.pair's Sinkhorn at n = 1024 over the stopping tolerance, with
both samplings, to choose the default tol by measurement (make_results.py: "pair vs tol").
"""

import warnings

import numpy as np
import ot
import pytest
import torch
from _bench_utils import (
    RELATIVE_REG,
    TOL,
    column_error,
    geomloss_blur,
    geomloss_diameter,
    geomloss_iterations,
    geomloss_plan,
    image_batches,
    pairing_quality,
    record,
    size_params,
    sync,
)

import eotfast
from eotfast.lap import warm_started_assignment
from eotfast.ops import solve as ops_solve

SIZES = [(64, 3072), (256, 3072), (1024, 3072), (256, 12288)]
HEAVY = [(4096, 3072), (1024, 12288)]
PROVIDERS = ["eotfast_sinkhorn", "eotfast_sinkhorn_permutation", "eotfast_exact",
             "eotfast_auto", "eotfast_random", "torchcfm_exact", "torchcfm_sinkhorn",
             "pot_sinkhorn_log", "geomloss_sinkhorn"]  # fmt: skip
GEOMLOSS_SCALING = 0.5
TOLERANCES = [1e-2, 3e-3, 1e-3, 3e-4, 1e-4]


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("n,d", size_params(SIZES, HEAVY, keys=("n", "d")))
def test_pair(benchmark, provider, n, d):
    x, y = (t[0] for t in image_batches(n, d))
    device = x.device
    cost = eotfast.cost_matrix(x, y)
    sources = torch.arange(n)
    epsilon = float(RELATIVE_REG * cost.double().std(correction=0))
    uniform = torch.full((n,), 1 / n)
    solver = {}  # what a Sinkhorn provider's last call solved: its plan and iterations

    if provider == "eotfast_auto":

        def solve():
            return sources, eotfast.pair(x, y)  # every default: what the default measures
    elif provider.startswith("eotfast"):
        method, _, sampling = provider.removeprefix("eotfast_").partition("_")

        def solve():  # a fixed seed: the quality check below sees the same draws every run
            generator = torch.Generator(device).manual_seed(0)
            return sources, eotfast.pair(x, y, method, reg=RELATIVE_REG, tol=TOL,
                                         sampling=sampling or None,
                                         generator=generator)  # fmt: skip
    elif provider.startswith("torchcfm"):
        from torchcfm.optimal_transport import OTPlanSampler

        sampler = OTPlanSampler(method=provider.removeprefix("torchcfm_"))
        np.random.seed(0)

        def solve():
            # sample_plan(x, y) without its final gather: the same work, and the indices.
            i, j = sampler.sample_map(sampler.get_map(x, y), n)
            return torch.as_tensor(i), torch.as_tensor(j)
    elif provider == "pot_sinkhorn_log":

        def solve():
            plan, log = ot.bregman.sinkhorn_log(uniform, uniform, ot.dist(x, y), epsilon,
                                                stopThr=TOL, numItermax=10_000, warn=False,
                                                log=True)  # fmt: skip
            solver.update(plan=plan, n_iter=log["niter"])
            return sources, torch.multinomial(plan, 1).squeeze(1)
    else:
        from geomloss import SamplesLoss

        blur = geomloss_blur(epsilon)
        loss = SamplesLoss("sinkhorn", p=2, blur=blur, scaling=GEOMLOSS_SCALING, debias=False,
                           potentials=True, backend="tensorized")  # fmt: skip

        def solve():
            f, g = loss(x, y)  # [1, n] each
            half_cost = (x.square().sum(1)[:, None] + y.square().sum(1) - 2 * x @ y.T) / 2
            # Row i of the plan a_i b_j exp((f_i + g_j - C_ij / 2) / blur^2), up to its factor.
            rows = torch.softmax((g.reshape(1, n) - half_cost) / blur**2, dim=1)
            solver.update(f=f, g=g)
            return sources, torch.multinomial(rows, 1).squeeze(1)

    def timed():
        out = solve()
        sync(device)
        return out

    with warnings.catch_warnings():  # torchcfm's sinkhorn warns when it degrades to uniform
        warnings.simplefilter("ignore")
        rows, partners = benchmark.pedantic(timed, rounds=3 if n <= 1024 else 1, iterations=1,
                                            warmup_rounds=1)  # fmt: skip
    # torchcfm draws (source, target) pairs, possibly several per source: score the pairs drawn.
    quality = pairing_quality(cost, rows, partners)
    if provider.startswith("eotfast_sinkhorn"):
        result = eotfast.sinkhorn(cost, reg=RELATIVE_REG, tol=TOL)  # pair's solve
        solver.update(plan=result.plan(cost.double()), n_iter=result.n_iter)
    elif provider == "geomloss_sinkhorn":
        n_iter = geomloss_iterations(geomloss_diameter(x, y), blur, GEOMLOSS_SCALING)
        solver.update(plan=geomloss_plan(cost, solver["f"], solver["g"], blur), n_iter=n_iter)
    if "plan" in solver:
        error = column_error(solver["plan"], np.full(n, 1 / n))
        quality.update(n_iter=int(solver["n_iter"]), marginal_error=error)
    record(benchmark, "pair", provider, n, d, 1, **quality)
    if provider in ("eotfast_sinkhorn", "eotfast_sinkhorn_permutation"):
        assert quality["gap_closed"] > 0.9, quality
    if provider in ("eotfast_exact", "eotfast_auto"):
        assert quality["gap_closed"] > 0.99, quality
    if provider in ("eotfast_sinkhorn_permutation", "eotfast_exact", "eotfast_auto"):
        assert quality["distinct_targets"] == 1.0, quality


@pytest.mark.parametrize("sampling", ["sample", "permutation"])
@pytest.mark.parametrize("tol", TOLERANCES, ids=[f"tol{tol:g}" for tol in TOLERANCES])
def test_pair_tolerance(benchmark, tol, sampling):
    n, d = 1024, 3072
    x, y = (t[0] for t in image_batches(n, d))
    cost = eotfast.cost_matrix(x, y)

    def timed():
        partners = eotfast.pair(x, y, "sinkhorn", reg=RELATIVE_REG, tol=tol, sampling=sampling)
        sync(x.device)
        return partners

    partners = benchmark.pedantic(timed, rounds=3, iterations=1, warmup_rounds=1)
    # pair's solve again, outside the timing, for its counts: Sinkhorn iterations, and the
    # bids of the warm-started auction (from the prices -g) that the permutation adds.
    result, shifted, _ = ops_solve.sinkhorn(
        cost, None, None, epsilon=eotfast.epsilon_from_reg(cost, RELATIVE_REG, True),
        backend="cpu", max_iter=1000, tol=tol, scaling=0.5, relaxation=None,
    )  # fmt: skip
    n_bids = -1
    if sampling == "permutation":
        n_bids = int(warm_started_assignment(shifted, result, backend="cpu").n_bids)
    quality = pairing_quality(cost, torch.arange(n), partners)
    suffix = "_permutation" if sampling == "permutation" else ""
    plan = result.plan(shifted.double())  # the shift moves g and the cost alike
    record(benchmark, "pair_tol", f"eotfast_sinkhorn{suffix} tol={tol:g}", n, d, 1, tol=tol,
           sampling=sampling, n_iter=int(result.n_iter), n_bids=n_bids,
           marginal_error=column_error(plan, np.full(n, 1 / n)), **quality)  # fmt: skip
    if sampling == "permutation":
        assert quality["distinct_targets"] == 1.0, quality
