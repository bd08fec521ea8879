"""The Sinkhorn divergence as a loss, value and gradient, beside GeomLoss and POT.

The call: the debiased Sinkhorn divergence S(x, y) of GeomLoss's ``SamplesLoss("sinkhorn",
p=2, blur)`` (cost |x - y|^2 / 2, epsilon = blur^2), its value and its gradient in x
(``backward``), everything included (the three cost matrices, the solves, the gradient).

Inputs: point clouds (n = 1024, 4096; d = 3: N(0, I) against 0.7 N(0, I) + 0.5, GeomLoss's
default blur 0.05) and image batches (n = 256, 1024; d = 3072, bench/_bench_utils.image_batches;
blur from epsilon = 0.05 std(C), as the other benchmarks).

Providers:
- geomloss: ``geomloss.SamplesLoss`` (tensorized backend, its default annealing ``scaling``
  0.5: ~10 symmetric iterations, no tolerance);
- geomloss_accurate: the same with the annealing ``scaling`` at which GeomLoss's value comes
  within ~3e-3 of the converged one (0.9 on the clouds, 0.995 on the images: swept over 0.5,
  0.7, 0.9, 0.95, 0.99, 0.995; at 0.5 on the images it is 27% off);
- eotfast: ``eotfast.integrations.geomloss.SamplesLoss``, the same call, solved to its default
  ``tol`` 1e-3 (the largest marginal error of the three solves);
- eotfast_tol1e-2: the same at ``tol=1e-2``;
- pot: three ``ot.solve_sample(..., reg, grad="envelope")`` solves
  (S = OT(x, y) - OT(x, x) / 2 - OT(y, y) / 2), its log-domain Sinkhorn to its tolerance 1e-3.

Every case records its accuracy against a converged float64 reference (eotfast to tol 1e-6):
the value's relative error and the gradient's (||g - g_ref|| / ||g_ref||), and the call's peak
memory above what the process held before it (a fresh subprocess's VmHWM, MiB), besides the
time; cost_matrices_mib is the size of the three float32 cost matrices, for scale.

    pytest bench/bench_sinkhorn_divergence.py                  # --bench-heavy: n = 4096 clouds
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _bench_utils import RELATIVE_REG, geomloss_blur, image_batches, median_s, record

import eotfast
from eotfast.integrations.geomloss import SamplesLoss

CASES = [
    pytest.param("clouds", 1024, 3, id="clouds-n1024-d3"),
    pytest.param("clouds", 4096, 3, id="clouds-n4096-d3", marks=pytest.mark.heavy),
    pytest.param("images", 256, 3072, id="images-n256-d3072"),
    pytest.param("images", 1024, 3072, id="images-n1024-d3072"),
]
PROVIDERS = ["geomloss", "geomloss_accurate", "eotfast", "eotfast_tol1e-2", "pot"]
GEOMLOSS_ACCURATE_SCALING = {"clouds": 0.9, "images": 0.995}
GEOMLOSS_DEFAULT_BLUR = 0.05
_REFERENCES = {}  # (kind, n, d) -> (value, gradient) converged, float64


def inputs(kind: str, n: int, d: int):
    """(x, y, blur) of a case, float32."""
    if kind == "clouds":
        generator = torch.Generator().manual_seed(0)
        x = torch.randn(n, d, generator=generator)
        y = 0.7 * torch.randn(n, d, generator=generator) + 0.5
        return x, y, GEOMLOSS_DEFAULT_BLUR
    x, y = (t[0] for t in image_batches(n, d))
    epsilon = RELATIVE_REG * float(eotfast.cost_matrix(x, y).std())
    return x, y, geomloss_blur(epsilon)


def loss_of(provider: str, kind: str, blur: float):
    """A function (x, y) -> S(x, y) in GeomLoss's units, differentiable in x."""
    if provider.startswith("geomloss"):
        from geomloss import SamplesLoss as GeomLossSamplesLoss

        scaling = GEOMLOSS_ACCURATE_SCALING[kind] if provider == "geomloss_accurate" else 0.5
        return GeomLossSamplesLoss(
            "sinkhorn", p=2, blur=blur, scaling=scaling, backend="tensorized"
        )
    if provider == "eotfast":
        return SamplesLoss("sinkhorn", p=2, blur=blur)
    if provider == "eotfast_tol1e-2":
        return SamplesLoss("sinkhorn", p=2, blur=blur, tol=1e-2)
    import ot

    epsilon = 2 * blur**2  # POT's cost |x - y|^2: twice GeomLoss's, and its epsilon too

    def pot_divergence(x, y):
        def solve(p, q):
            return ot.solve_sample(
                p, q, metric="sqeuclidean", reg=epsilon,
                grad="envelope", tol=1e-3,
            ).value  # fmt: skip

        return (solve(x, y) - solve(x, x.detach()) / 2 - solve(y, y) / 2) / 2

    return pot_divergence


def value_and_gradient(loss, x, y):
    xs = x.detach().clone().requires_grad_()
    value = loss(xs, y)
    value.backward()
    return value.detach(), xs.grad


def reference(kind: str, n: int, d: int):
    key = (kind, n, d)
    if key not in _REFERENCES:
        x, y, blur = inputs(kind, n, d)
        loss = SamplesLoss("sinkhorn", p=2, blur=blur, tol=1e-6, max_iter=20_000)
        _REFERENCES[key] = value_and_gradient(loss, x.double(), y.double())
    return _REFERENCES[key]


def peak_memory_mib(provider: str, kind: str, n: int, d: int) -> float:
    """Peak resident memory of one call above the memory held before it, in a fresh process
    after a small warm-up call (MiB): Linux's high-water mark VmHWM, reset by writing 5 to
    /proc/self/clear_refs. NaN where that is not available."""
    script = (
        "import sys, json\n"
        f"sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
        "import bench_sinkhorn_divergence as b\n"
        f"x, y, blur = b.inputs({kind!r}, {n}, {d})\n"
        f"loss = b.loss_of({provider!r}, {kind!r}, blur)\n"
        "b.value_and_gradient(loss, x[:8], y[:8])\n"  # imports and first-call set-up
        "import gc; gc.collect()\n"
        "before = b.memory_mib('VmRSS')\n"
        "open('/proc/self/clear_refs', 'w').write('5')\n"
        "b.value_and_gradient(loss, x, y)\n"
        "print(json.dumps(b.memory_mib('VmHWM') - before))\n"
    )
    # Large blocks mmapped, so that a freed tensor leaves the resident set (glibc would keep
    # it and reuse it unseen).
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env)
    if out.returncode != 0:
        return float("nan")
    return json.loads(out.stdout.strip().splitlines()[-1])


def memory_mib(field: str) -> float:
    """A memory figure of this process from /proc/self/status (VmRSS, VmHWM), in MiB."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise KeyError(field)


@pytest.mark.parametrize("kind,n,d", CASES)
@pytest.mark.parametrize("provider", PROVIDERS)
def test_sinkhorn_divergence(benchmark, provider, kind, n, d):
    if provider.startswith("geomloss"):
        pytest.importorskip("geomloss")
    x, y, blur = inputs(kind, n, d)
    loss = loss_of(provider, kind, blur)
    value, gradient = benchmark.pedantic(
        value_and_gradient, args=(loss, x, y), rounds=3, warmup_rounds=1
    )
    reference_value, reference_gradient = reference(kind, n, d)
    value_error = abs(float(value) - float(reference_value)) / abs(float(reference_value))
    gradient_error = float(
        (gradient.double() - reference_gradient).norm() / reference_gradient.norm()
    )
    record(
        benchmark, "sinkhorn_divergence", provider, n, d, 1,
        inputs=kind, blur=blur, value_error=value_error, gradient_error=gradient_error,
        peak_memory_mib=peak_memory_mib(provider, kind, n, d),
        cost_matrices_mib=3 * n * n * 4 / 2**20, seconds=median_s(benchmark),
    )  # fmt: skip
    if provider == "eotfast":  # the default tol; the others' errors are recorded, not asserted
        assert value_error < 1e-2 and gradient_error < 0.2, (value_error, gradient_error)
