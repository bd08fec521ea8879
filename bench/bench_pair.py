"""pair: the end-to-end pairing call of a training step, with the quality of its pairs.

Input: two image-like batches x, y (d features in [-1, 1]); output: a partner for every
source sample. Time covers everything the call does (cost matrix, solve, drawing the
partners). Quality beside time, since a fast pairing is only worth having if its pairs are
good: the fraction of the random-to-exact transport-cost gap the pairs close, and the
fraction of distinct targets (_bench_utils.pairing_quality).

Providers:
- eotfast.pair (method "sinkhorn", epsilon = 0.05 * std(cost), backend auto), the same with
  sampling="permutation" (Sinkhorn, then one auction phase at its epsilon from the prices
  -g: distinct targets), "exact" (the auction: one-to-one optimal, within 1e-5 of the
  optimum), and "random" (the baseline);
- torchcfm's OTPlanSampler as its users call it: method "exact" (POT's emd, pairs drawn from
  the plan with replacement) and "sinkhorn" (its default reg = 0.05, absolute);
- POT: ot.dist + ot.bregman.sinkhorn_log (torch, the same epsilon and tol) + row sampling.
"""

import warnings

import numpy as np
import ot
import pytest
import torch
from _bench_utils import (
    RELATIVE_REG,
    TOL,
    image_batches,
    pairing_quality,
    record,
    size_params,
    sync,
)

import eotfast

SIZES = [(64, 3072), (256, 3072), (1024, 3072), (256, 12288)]
HEAVY = [(4096, 3072), (1024, 12288)]
PROVIDERS = ["eotfast_sinkhorn", "eotfast_sinkhorn_permutation", "eotfast_exact",
             "eotfast_random", "torchcfm_exact", "torchcfm_sinkhorn",
             "pot_sinkhorn_log"]  # fmt: skip


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("n,d", size_params(SIZES, HEAVY, keys=("n", "d")))
def test_pair(benchmark, provider, n, d):
    x, y = (t[0] for t in image_batches(n, d))
    device = x.device
    cost = eotfast.cost_matrix(x, y)
    sources = torch.arange(n)

    if provider.startswith("eotfast"):
        method, _, sampling = provider.removeprefix("eotfast_").partition("_")

        def solve():
            return sources, eotfast.pair(x, y, method, reg=RELATIVE_REG, tol=TOL,
                                         sampling=sampling or "sample")  # fmt: skip
    elif provider.startswith("torchcfm"):
        from torchcfm.optimal_transport import OTPlanSampler

        sampler = OTPlanSampler(method=provider.removeprefix("torchcfm_"))
        np.random.seed(0)

        def solve():
            # sample_plan(x, y) without its final gather: the same work, and the indices.
            i, j = sampler.sample_map(sampler.get_map(x, y), n)
            return torch.as_tensor(i), torch.as_tensor(j)
    else:
        epsilon = float(RELATIVE_REG * cost.double().std(correction=0))
        uniform = torch.full((n,), 1 / n)

        def solve():
            plan = ot.bregman.sinkhorn_log(uniform, uniform, ot.dist(x, y), epsilon,
                                           stopThr=TOL, numItermax=10_000, warn=False)  # fmt: skip
            return sources, torch.multinomial(plan, 1).squeeze(1)

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
    record(benchmark, "pair", provider, n, d, 1, **quality)
    if provider in ("eotfast_sinkhorn", "eotfast_sinkhorn_permutation", "eotfast_exact"):
        assert quality["gap_closed"] > 0.9, quality
    if provider in ("eotfast_sinkhorn_permutation", "eotfast_exact"):
        assert quality["distinct_targets"] == 1.0, quality
