import os

import pytest
import torch

# Without a GPU, Triton kernels run through Triton's interpreter on CPU tensors; the variable
# must be set before triton is first imported (eotfast imports it only when asked for).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import eotfast

# Every backend the test machine can run on CPU tensors; the C++ one must be built (see
# test_build.py), so a missing extension fails loudly instead of shrinking this list.
CPU_BACKENDS = ["torch", "cpu"]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def random_problem():
    """A random OT problem: cost [*batch, n, m] and marginals (uniform when uniform=True)."""

    def make(batch=(), n=7, m=5, dtype=torch.float64, uniform=True, scale=1.0):
        cost = scale * torch.rand(*batch, n, m, dtype=dtype)
        if uniform:
            return cost, None, None
        a = torch.rand(*batch, n, dtype=dtype) + 0.1
        b = torch.rand(*batch, m, dtype=dtype) + 0.1
        return cost, a / a.sum(-1, keepdim=True), b / b.sum(-1, keepdim=True)

    return make


@pytest.fixture
def clustered_domains():
    """Two image-like domains (d = 3072, values in [-1, 1]) drawn around shared cluster
    centres, as unpaired source and target batches of a translation task."""

    def make(n=256, d=3072, clusters=8, spread=0.3, seed=0):
        gen = torch.Generator().manual_seed(seed)
        centres = torch.rand(clusters, d, generator=gen) * 2 - 1

        def domain():
            labels = torch.randint(clusters, (n,), generator=gen)
            return (centres[labels] + spread * torch.randn(n, d, generator=gen)).clamp(-1, 1)

        return domain(), domain()

    return make


@pytest.fixture(params=CPU_BACKENDS)
def backend(request):
    return request.param


assert eotfast  # imported for its op registrations
