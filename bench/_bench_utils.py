"""Inputs and bookkeeping shared by the benchmark files.

Every case records, in pytest-benchmark's ``extra_info``: the op, the provider, the sizes,
the quality it reached (marginal error, gap closed, distinct targets) and, where the work is
countable, a throughput (cost matrix: GFLOP/s; Sinkhorn: ns per cost entry and iteration).
make_results.py turns those into bench/RESULTS.md.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment

RELATIVE_REG = 0.05  # epsilon = 0.05 * std(cost), given to every provider as an absolute value
TOL = 1e-4  # stop once ||P^T 1 - b||_2 < TOL
MAX_ITER = 10_000

# (n, d, batch) of the default CPU run, and the heavy ones behind --bench-heavy.
SIZES = [(64, 3072, 1), (256, 3072, 1), (1024, 3072, 1), (256, 3072, 8), (256, 12288, 1)]
HEAVY_SIZES = [(4096, 3072, 1), (1024, 12288, 1), (1024, 3072, 8), (4096, 12288, 1)]


def size_params(sizes=SIZES, heavy=HEAVY_SIZES, keys=("n", "d", "b")):
    """pytest parameters from size tuples, the `heavy` ones marked heavy (run with
    --bench-heavy). `keys` prefixes each value in the case id: the default (n, d, batch)
    tuples give ids like "n64-d3072-b1"; keys=("n", "b") on (n, batch) gives "n64-b1"."""

    def param(size, marks=()):
        assert len(size) == len(keys), (size, keys)
        case_id = "-".join(f"{key}{value}" for key, value in zip(keys, size, strict=True))
        return pytest.param(*size, id=case_id, marks=marks)

    return [param(s) for s in sizes] + [param(s, pytest.mark.heavy) for s in heavy]


def image_batches(n: int, d: int, batch: int = 1, clusters: int = 8, seed: int = 0):
    """Two image-like domains ([-1, 1], d features) around shared cluster centres, as the
    unpaired source and target batches of a translation task: x, y of shape [batch, n, d]."""
    generator = torch.Generator().manual_seed(seed)
    centres = torch.rand(clusters, d, generator=generator) * 2 - 1

    def domain():
        labels = torch.randint(clusters, (batch, n), generator=generator)
        noise = 0.3 * torch.randn(batch, n, d, generator=generator)
        return (centres[labels] + noise).clamp(-1, 1)

    return domain(), domain()


def record(benchmark, op: str, provider: str, n: int, d: int, batch: int, **quality) -> None:
    benchmark.group = f"{op} n={n} d={d} batch={batch}"
    benchmark.extra_info.update(op=op, provider=provider, n=n, d=d, batch=batch, **quality)


def median_s(benchmark) -> float:
    """Median seconds of the timed rounds; known only once benchmark.pedantic has returned."""
    return benchmark.stats.stats.median


def column_error(plan, b: np.ndarray) -> float:
    """||P^T 1 - b||_2 of a plan (float64), the stopping quantity of every provider."""
    return float(np.linalg.norm(np.asarray(plan, dtype=np.float64).sum(-2) - b))


def pairing_quality(cost: torch.Tensor, rows: torch.Tensor, partners: torch.Tensor) -> dict:
    """Quality of the pairs (rows[k], partners[k]) drawn on one [n, n] problem.

    gap_closed: the share of the gap between uniformly random partners and the optimal
    one-to-one assignment that the pairs' mean cost closes (1: optimal, 0: no better than
    random); the mean per pair, so a sampler that draws several pairs per source (or skips
    some sources) is scored on the pairs it drew. distinct_targets: the share of distinct
    partners among the drawn pairs (1: a permutation; low: the pairs collapse on a few
    targets)."""
    cost64 = cost.double()
    pair_mean = float(cost64[rows, partners].mean())
    exact_mean = float(cost64[linear_sum_assignment(cost64.cpu().numpy())].mean())
    random_mean = float(cost64.mean())  # expected cost of a uniformly random partner
    return {
        "gap_closed": (random_mean - pair_mean) / (random_mean - exact_mean),
        "distinct_targets": partners.unique().numel() / partners.numel(),
    }


def geomloss_blur(epsilon: float) -> float:
    """GeomLoss's ``blur`` for our epsilon. For p = 2 its cost is |x - y|^2 / 2 = C / 2 and
    its temperature blur**2; its plan a_i b_j exp((F_i + G_j - C_ij / 2) / blur**2) is ours,
    exp((f_i + g_j - C_ij) / epsilon) with f = 2 F + epsilon log a, g = 2 G + epsilon log b,
    when blur**2 = epsilon / 2."""
    return (epsilon / 2) ** 0.5


def geomloss_plan(cost: torch.Tensor, f: torch.Tensor, g: torch.Tensor, blur: float):
    """The plan of GeomLoss's potentials f [..., n], g [..., m] (uniform weights) on our
    cost C = |x - y|^2 [..., n, m], in float64."""
    n, m = cost.shape[-2:]
    f, g = f.double().reshape(*cost.shape[:-2], n, 1), g.double().reshape(*cost.shape[:-2], 1, m)
    return torch.exp((f + g - cost.double() / 2) / blur**2) / (n * m)


def geomloss_diameter(x: torch.Tensor, y: torch.Tensor) -> float:
    """GeomLoss's default diameter: the bounding-box diagonal of all the points of x and y."""
    points = torch.cat([x.reshape(-1, x.shape[-1]), y.reshape(-1, y.shape[-1])])
    return float((points.max(0).values - points.min(0).values).norm())


def geomloss_iterations(diameter: float, blur: float, scaling: float) -> int:
    """Sinkhorn iterations (two sweeps of the cost each) that GeomLoss runs for p = 2: one at
    epsilon = diameter**2 to start, one per temperature of its schedule (diameter**2, then
    multiplied by scaling**2 at every step while above blur**2, then blur**2), and a last
    one at blur**2."""
    steps = np.arange(2 * np.log(diameter), 2 * np.log(blur), 2 * np.log(scaling))
    return 1 + (1 + len(steps) + 1) + 1


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
