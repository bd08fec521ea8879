"""cost_matrix: squared Euclidean distances between two batches, side by side.

Providers: eotfast (torch's GEMM form on the CPU; the Triton and CUDA kernels on a GPU),
torch.cdist squared, POT's ot.dist (numpy, float32 inputs). Same float32 inputs for all.
"""

import ot
import pytest
import torch
from _bench_utils import image_batches, record, size_params, sync

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
            return eotfast.cost_matrix(x, y, backend=backend)
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
    record(benchmark, "cost_matrix", f"{provider} ({device.type})", n, d, batch)
