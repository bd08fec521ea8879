"""sinkhorn: log-domain Sinkhorn to a fixed marginal error, eotfast beside its peers.

Same work for every provider: the costs of two image-like batches, uniform marginals,
epsilon = 0.05 * std(cost) given to everyone as one absolute value, and the stopping rule
||P^T 1 - b||_2 < 1e-4 (POT's stopThr; POT tests it every 10 iterations, eotfast every
iteration). Each case records the iterations and the marginal error of its own plan,
measured here in float64.

Providers: eotfast's backends (cpu, torch = the eager reference; triton and cuda on a GPU),
the reference's iteration compiled with torch.compile (compilation timed separately, as
compile_s), POT's ot.bregman.sinkhorn_log on numpy (float64) and torch, and POT's batched
ot.batch.solve_batch (method log_sinkhorn, its own stopping test: it gets tol = 1e-4 and its
reached error is recorded), and GeomLoss's Sinkhorn loop (SamplesLoss("sinkhorn", p=2,
blur=sqrt(epsilon / 2), scaling=0.5, debias=False, potentials=True, backend="tensorized"):
its cost |x - y|^2 / 2 is half of ours and its temperature blur**2, so its plan is ours at
epsilon). GeomLoss takes points, not a cost: it gets the same cost through its ``cost``
argument, with its default diameter (the bounding-box diagonal of the points) passed as
``diameter``. It has no tolerance: it anneals epsilon from diameter**2 by scaling**2 per
iteration down to blur**2, one iteration per value and a last one at blur**2, and stops;
its iterations are counted from that schedule and the error it reached is recorded.

Throughput: ns_per_entry_iteration = median seconds * 1e9 / (batch * n * n * n_iter), the
time per cost entry and iteration. An iteration sweeps the n x n cost twice (the column
log-sum-exp for g, then the row one for f; the stopping check reads it once more unless a
backend fuses it), so this is about twice the time per entry read. n_iter is the largest
count over the batch; POT's solve_batch reports none, so its cases have no throughput.
"""

import time

import numpy as np
import ot
import ot.batch
import pytest
import torch
from _bench_utils import (
    MAX_ITER,
    RELATIVE_REG,
    TOL,
    column_error,
    geomloss_blur,
    geomloss_diameter,
    geomloss_iterations,
    geomloss_plan,
    image_batches,
    median_s,
    record,
    size_params,
    sync,
)

import eotfast

CPU, CUDA = torch.device("cpu"), torch.device("cuda")
SIZES = [(64, 1), (256, 1), (1024, 1), (256, 8)]
HEAVY = [(4096, 1), (1024, 8)]
D = 3072  # Sinkhorn sees only the cost; d changes its scale, which epsilon follows.
SIZE_PARAMS = size_params(SIZES, HEAVY, keys=("n", "b"))  # ids like "n64-b1"


def problem(n, batch, device):
    x, y = image_batches(n, D, batch)
    cost = eotfast.cost_matrix(x, y, batch_dims=1).to(device)  # float32 [batch, n, n]
    return cost, float(RELATIVE_REG * cost.double().std(correction=0))


def finish(benchmark, provider, n, batch, plans, n_iter, check=True):
    """Records a case once benchmark.pedantic has returned (the median is known then)."""
    n_iter = int(n_iter)
    error = max(column_error(plans[k], np.full(n, 1 / n)) for k in range(batch))
    throughput = {}
    if n_iter > 0:  # -1: the provider does not report its iterations
        throughput["ns_per_entry_iteration"] = median_s(benchmark) * 1e9 / (batch * n * n * n_iter)
    record(benchmark, "sinkhorn", provider, n, D, batch, n_iter=n_iter, marginal_error=error,
           **throughput)  # fmt: skip
    if check:
        assert error < 1.05 * TOL, f"{provider} stopped before the common tolerance"


@pytest.mark.parametrize(
    "backend,device",
    [pytest.param("cpu", CPU, id="cpu"), pytest.param("torch", CPU, id="torch-cpu"),
     pytest.param("triton", CUDA, id="triton", marks=pytest.mark.gpu),
     pytest.param("cuda", CUDA, id="cuda", marks=pytest.mark.gpu),
     pytest.param("torch", CUDA, id="torch-cuda", marks=pytest.mark.gpu)],
)  # fmt: skip
@pytest.mark.parametrize("n,batch", SIZE_PARAMS)
@pytest.mark.parametrize("variant", ["accelerated", "plain"])
def test_sinkhorn_eotfast(benchmark, backend, device, n, batch, variant):
    # accelerated: the defaults (epsilon scaling, then over-relaxation at the target epsilon);
    # plain: scaling=None, POT's iteration from f = 0. Same fixed point, same stopping rule.
    if backend not in eotfast.available_backends(device):
        pytest.skip(f"backend {backend} is not available here")
    if backend == "torch" and device.type == "cpu" and variant == "plain" and n > 256:
        pytest.skip("the plain torch reference at this size takes minutes per round")
    cost, epsilon = problem(n, batch, device)
    options = {"scaling": None} if variant == "plain" else {}

    def solve():
        result = eotfast.sinkhorn(cost, reg=epsilon, relative_reg=False, tol=TOL,
                                  max_iter=MAX_ITER, backend=backend, **options)  # fmt: skip
        sync(device)
        return result

    slow = backend == "torch" and device.type == "cpu"
    result = benchmark.pedantic(solve, rounds=2 if slow else 10, iterations=1, warmup_rounds=1)
    plans = result.plan(cost.double()).cpu().numpy()
    suffix = " plain" if variant == "plain" else ""
    finish(benchmark, f"eotfast {backend}{suffix} ({device.type})", n, batch, plans,
           result.n_iter.max())  # fmt: skip


def reference_iteration(cost, f, g, log_a, log_b, b, epsilon):
    """One iteration of eotfast's torch reference (g, then f, then the error)."""
    g = epsilon * (log_b - torch.logsumexp((f[:, :, None] - cost) / epsilon, dim=1))
    f = epsilon * (log_a - torch.logsumexp((g[:, None, :] - cost) / epsilon, dim=2))
    mass = torch.exp((f[:, :, None] + g[:, None, :] - cost) / epsilon).sum(dim=1)
    return f, g, torch.linalg.vector_norm(mass - b, dim=-1).max()


@pytest.mark.parametrize("n,batch", SIZE_PARAMS)
def test_sinkhorn_torch_compiled(benchmark, n, batch):
    cost, epsilon = problem(n, batch, CPU)
    uniform = torch.full((batch, n), 1 / n)
    log_uniform = uniform.log()
    compiled = torch.compile(reference_iteration, fullgraph=True, dynamic=False)

    def solve():
        f, g = torch.zeros(batch, n), torch.zeros(batch, n)
        for iteration in range(1, MAX_ITER + 1):
            f, g, error = compiled(cost, f, g, log_uniform, log_uniform, uniform, epsilon)
            if error < TOL:  # a host read each iteration: free on the CPU
                return f, g, iteration
        return f, g, MAX_ITER

    start = time.perf_counter()
    solve()  # compiles
    compile_s = time.perf_counter() - start
    f, g, n_iter = benchmark.pedantic(solve, rounds=3, iterations=1)
    plans = torch.exp((f[:, :, None] + g[:, None, :] - cost) / epsilon).double().numpy()
    finish(benchmark, "torch.compile reference (cpu)", n, batch, plans, n_iter)
    benchmark.extra_info["compile_s"] = compile_s


@pytest.mark.parametrize(
    "flavor,device",
    [pytest.param("numpy", CPU, id="numpy"), pytest.param("torch", CPU, id="torch-cpu"),
     pytest.param("torch", CUDA, id="torch-cuda", marks=pytest.mark.gpu)],
)  # fmt: skip
@pytest.mark.parametrize("n,batch", SIZE_PARAMS)
def test_sinkhorn_pot(benchmark, flavor, device, n, batch):
    cost, epsilon = problem(n, batch, device)
    if flavor == "numpy":
        costs = cost.double().numpy()  # POT's numpy backend works in float64
        uniform = np.full(n, 1 / n)
    else:
        costs, uniform = cost, torch.full((n,), 1 / n, device=device)

    def solve():
        out = [ot.bregman.sinkhorn_log(uniform, uniform, costs[k], epsilon, numItermax=MAX_ITER,
                                       stopThr=TOL, log=True, warn=False)
               for k in range(batch)]  # fmt: skip
        sync(device)
        return out

    rounds = 1 if flavor == "numpy" and n * batch >= 1024 else 3
    solutions = benchmark.pedantic(solve, rounds=rounds, iterations=1,
                                   warmup_rounds=0 if rounds == 1 else 1)  # fmt: skip
    plans = [np.asarray(torch.as_tensor(p).double().cpu()) for p, _ in solutions]
    finish(benchmark, f"POT sinkhorn_log {flavor} ({device.type})", n, batch, plans,
           max(log["niter"] for _, log in solutions))  # fmt: skip


@pytest.mark.parametrize(
    "device",
    [pytest.param(CPU, id="cpu"), pytest.param(CUDA, id="cuda", marks=pytest.mark.gpu)],
)
@pytest.mark.parametrize("n,batch", SIZE_PARAMS)
def test_sinkhorn_pot_solve_batch(benchmark, device, n, batch):
    cost, epsilon = problem(n, batch, device)

    def solve():
        result = ot.batch.solve_batch(cost, reg=epsilon, max_iter=MAX_ITER, tol=TOL,
                                      method="log_sinkhorn", grad="detach")  # fmt: skip
        sync(device)
        return result

    result = benchmark.pedantic(solve, rounds=3, iterations=1, warmup_rounds=1)
    plans = torch.as_tensor(result.plan).double().cpu().numpy()
    # Its own stopping test: record the error it reached instead of requiring ours.
    finish(benchmark, f"POT solve_batch ({device.type})", n, batch, plans, -1, check=False)


@pytest.mark.parametrize(
    "device",
    [pytest.param(CPU, id="cpu"), pytest.param(CUDA, id="cuda", marks=pytest.mark.gpu)],
)
@pytest.mark.parametrize("n,batch", SIZE_PARAMS)
def test_sinkhorn_geomloss(benchmark, device, n, batch):
    from geomloss import SamplesLoss

    cost, epsilon = problem(n, batch, device)
    diameter = geomloss_diameter(*image_batches(n, D, batch))  # the points of `cost`
    blur, scaling = geomloss_blur(epsilon), 0.5
    # GeomLoss asks cost(x, y) for C_xy and cost(y, x) for C_yx: dummy points select which.
    sources = torch.zeros(batch, n, 1, device=device)
    targets = torch.ones(batch, n, 1, device=device)
    half_costs = {"xy": cost / 2, "yx": (cost / 2).mT.contiguous()}
    loss = SamplesLoss("sinkhorn", p=2, blur=blur, diameter=diameter, scaling=scaling,
                       debias=False, potentials=True, backend="tensorized",
                       cost=lambda a, b: half_costs["xy" if a is sources else "yx"])  # fmt: skip

    def solve():
        out = loss(sources, targets)
        sync(device)
        return out

    f, g = benchmark.pedantic(solve, rounds=3, iterations=1, warmup_rounds=1)
    plans = geomloss_plan(cost, f, g, blur).cpu().numpy()
    finish(benchmark, f"GeomLoss tensorized ({device.type})", n, batch, plans,
           geomloss_iterations(diameter, blur, scaling), check=False)  # fmt: skip
