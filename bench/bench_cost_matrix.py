"""cost_matrix: squared Euclidean distances between two batches, side by side.

Providers: eotfast (torch's GEMM form on the CPU; the Triton and CUDA kernels on a GPU),
torch.cdist squared, POT's ot.dist (numpy, float32 inputs). Same float32 inputs for all.

Throughput: gflops = 2 * batch * n * m * d / median seconds / 1e9, the multiply-adds of the
GEMM form ||x||^2 + ||y||^2 - 2 x y^T (its x y^T product; the norms are lower order),
counted the same for every provider whatever it actually computes.
"""

import ot
import pytest
import torch
from _bench_utils import image_batches, median_s, record, size_params, sync

import eotfast

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


def providers():
    cases = [("eotfast", "auto", CPU), ("torch_cdist", None, CPU), ("pot_dist", None, CPU)]
    gpu = [("eotfast_triton", "triton", CUDA), ("eotfast_cuda", "cuda", CUDA),
           ("torch_cdist", None, CUDA)]  # fmt: skip
    return [pytest.param(*c, id=f"{c[0]}-{c[2].type}") for c in cases] + [
        pytest.param(*c, id=f"{c[0]}-cuda", marks=pytest.mark.gpu) for c in gpu
    ]


@pytest.mark.parametrize("provider,backend,device", providers())
@pytest.mark.parametrize("n,d,batch", size_params())
def test_cost_matrix(benchmark, provider, backend, device, n, d, batch):
    x, y = (t.to(device) for t in image_batches(n, d, batch))
    if provider.startswith("eotfast"):
        if backend in ("triton", "cuda") and backend not in eotfast.available_backends(device):
            pytest.skip(f"backend {backend} is not available here")

        def compute():
            return eotfast.cost_matrix(x, y, batch_dims=1, backend=backend)
    elif provider == "torch_cdist":

        def compute():
            return torch.cdist(x, y).square()
    else:
        x_np, y_np = x.numpy(), y.numpy()

        def compute():
            return [ot.dist(x_np[k], y_np[k]) for k in range(batch)]

    def timed():
        out = compute()
        sync(device)
        return out

    benchmark.pedantic(timed, rounds=5 if n <= 1024 else 2, iterations=1, warmup_rounds=1)
    gflops = 2 * batch * n * n * d / median_s(benchmark) / 1e9  # m = n here
    record(benchmark, "cost_matrix", f"{provider} ({device.type})", n, d, batch, gflops=gflops)
