"""torchcfm's OTPlanSampler against eotfast's drop-in (eotfast.integrations.torchcfm).

Input: two image-like batches x0, x1 (bench/_bench_utils.image_batches, d = 3072); the call is
``sampler.sample_plan(x0, x1)``, the pairing step of torchcfm's OT flow matchers, everything
included (cost matrix, plan, draw, gathering the pairs).

Providers (method "exact"):
- torchcfm: ``torchcfm.optimal_transport.OTPlanSampler("exact")``: torch.cdist ** 2, POT's
  ``ot.emd`` on the host in float64, pairs drawn from the plan with numpy's global generator;
- eotfast: the drop-in's default mode, the same pairs (the same plan, the same draws for the
  same np.random.seed): eotfast's cost matrix, the auction on the host in float64 down to its
  precision floor, the draw over the plan's nonzero entries;
- eotfast_on_device: the drop-in with ``on_device=True``: ``eotfast.pair(x0, x1, "exact")``,
  every source once with its own target, no host round trip (no numpy).

Both eotfast providers record their speedup over torchcfm two ways: the ratio of the medians
of the two cases (the torchcfm case of the same size runs first), and the ratio of medians of
calls alternated with torchcfm's (11 each, outside pytest-benchmark), which a load that drifts
between cases (a shared CPU) moves less. And the time of the cost matrix alone
(``eotfast.cost_matrix``: the distance GEMM every provider computes, ~ torch.cdist ** 2), the
floor under all three. Quality as in bench_pair.py: the share of the random-to-optimal gap the
pairs close and the share of distinct targets.

    pytest bench/bench_torchcfm_sampler.py
    OMP_NUM_THREADS=1 pytest bench/bench_torchcfm_sampler.py   # on a CPU shared with other jobs

On a 2-core CPU that other jobs keep busy, torch's two threads wait for each other at every
parallel op (an op then takes a scheduler tick, 4 ms: n = 128 took ~100 ms in every provider);
one thread gives comparable numbers there.
"""

import time

import numpy as np
import pytest
import torch
from _bench_utils import image_batches, median_s, pairing_quality, record, size_params, sync

import eotfast
from eotfast.integrations.torchcfm import OTPlanSampler

SIZES = [(128, 3072), (256, 3072), (1024, 3072)]
HEAVY = [(4096, 3072)]
PROVIDERS = ["torchcfm", "eotfast", "eotfast_on_device"]  # torchcfm first: the speedup's base
_TORCHCFM_MEDIANS = {}  # (n, d) -> torchcfm's median seconds, for the speedups


def _interleaved_speedup(ours, theirs, rounds=11) -> float:
    """median(theirs) / median(ours) over calls alternated one by one."""
    times = {ours: [], theirs: []}
    for _ in range(rounds):
        for solve in (theirs, ours):
            start = time.perf_counter()
            solve()
            times[solve].append(time.perf_counter() - start)
    return float(np.median(times[theirs]) / np.median(times[ours]))


def _cost_matrix_median(x, y, rounds=5) -> float:
    times = []
    for _ in range(rounds + 1):  # the first is a warm-up
        start = time.perf_counter()
        eotfast.cost_matrix(x, y)
        sync(x.device)
        times.append(time.perf_counter() - start)
    return float(np.median(times[1:]))


@pytest.mark.parametrize("n,d", size_params(SIZES, HEAVY, keys=("n", "d")))
@pytest.mark.parametrize("provider", PROVIDERS)
def test_sample_plan(benchmark, provider, n, d):
    x, y = (t[0] for t in image_batches(n, d))
    if provider == "torchcfm":
        from torchcfm.optimal_transport import OTPlanSampler as TorchcfmSampler

        sampler = TorchcfmSampler(method="exact")

        def solve():
            return sampler.sample_plan(x, y)
    else:
        sampler = OTPlanSampler(method="exact", on_device=provider == "eotfast_on_device")

        def solve():
            return sampler.sample_plan(x, y)

    def timed():
        out = solve()
        sync(x.device)
        return out

    np.random.seed(0)
    benchmark.pedantic(timed, rounds=5 if n <= 1024 else 1, iterations=1, warmup_rounds=1)
    # The pairs' indices once more, outside the timing, for their quality.
    np.random.seed(0)
    if provider == "torchcfm":
        rows, columns = (torch.as_tensor(k) for k in sampler.sample_map(sampler.get_map(x, y), n))
    else:
        rows, columns = sampler.sample_plan(x, y, return_indices=True)
    quality = pairing_quality(eotfast.cost_matrix(x, y), rows, columns)
    info = {"method": "exact", **quality}
    if provider == "torchcfm":
        _TORCHCFM_MEDIANS[n, d] = median_s(benchmark)
    else:
        info["cost_matrix_s"] = _cost_matrix_median(x, y)
        if (n, d) in _TORCHCFM_MEDIANS:
            info["speedup_vs_torchcfm"] = _TORCHCFM_MEDIANS[n, d] / median_s(benchmark)
        if n <= 1024:
            from torchcfm.optimal_transport import OTPlanSampler as TorchcfmSampler

            reference = TorchcfmSampler(method="exact")
            info["speedup_interleaved"] = _interleaved_speedup(
                timed, lambda: reference.sample_plan(x, y)
            )
    record(benchmark, "torchcfm_sample_plan", provider, n, d, 1, **info)
    if provider == "eotfast_on_device":
        assert quality["distinct_targets"] == 1.0, quality
        assert quality["gap_closed"] > 0.99, quality
