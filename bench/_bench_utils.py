"""Inputs and bookkeeping shared by the benchmark files.

Every case records, in pytest-benchmark's ``extra_info``: the op, the provider, the sizes,
and the quality it reached (marginal error, gap closed, distinct targets). make_results.py
turns those into bench/RESULTS.md.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

RELATIVE_REG = 0.05  # epsilon = 0.05 * std(cost), given to every provider as an absolute value
TOL = 1e-4  # stop once ||P^T 1 - b||_2 < TOL
MAX_ITER = 10_000

# (n, d, batch) of the default CPU run, and the heavy ones behind --bench-heavy.
SIZES = [(64, 3072, 1), (256, 3072, 1), (1024, 3072, 1), (256, 3072, 8), (256, 12288, 1)]
HEAVY_SIZES = [(4096, 3072, 1), (1024, 12288, 1), (1024, 3072, 8), (4096, 12288, 1)]


def size_params(sizes=SIZES, heavy=HEAVY_SIZES):
    """pytest parameters (n, d, batch), heavy ones marked."""
    return [pytest.param(*s, id=f"n{s[0]}-d{s[1]}-b{s[2]}") for s in sizes] + [
        pytest.param(*s, id=f"n{s[0]}-d{s[1]}-b{s[2]}", marks=pytest.mark.heavy) for s in heavy
    ]


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


def column_error(plan, b: np.ndarray) -> float:
    """||P^T 1 - b||_2 of a plan (float64), the stopping quantity of every provider."""
    return float(np.linalg.norm(np.asarray(plan, dtype=np.float64).sum(-2) - b))


def pairing_quality(
    cost: torch.Tensor, partners: torch.Tensor, exact_total: float, random_total: float
) -> dict:
    """Fraction of the random-to-exact transport-cost gap that the pairs close, and the
    fraction of distinct targets (DESIGN.md section 6); one [n, m] problem."""
    total = float(cost.double().gather(1, partners[:, None]).sum())
    return {
        "gap_closed": (random_total - total) / (random_total - exact_total),
        "distinct_targets": partners.unique().numel() / partners.numel(),
    }  # fmt: skip


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
