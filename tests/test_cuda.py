"""What is specific to the CUDA backend (csrc/cuda): the caller's stream and no host sync.
Needs a GPU: skipped without one. Its ops are tested against POT with the other backends in
test_cost_matrix.py and test_sinkhorn.py; that the module builds and imports is tested in
test_build.py, and its register use in test_cuda_compile.py."""

import pytest
import torch

import eotfast

pytestmark = pytest.mark.skipif(
    not (torch.cuda.is_available() and eotfast.cuda_extension_available()),
    reason="needs a CUDA GPU and the eotfast._cuda module",
)


def test_pair_cuda_has_no_host_sync():
    x, y = torch.randn(256, 3072, device="cuda"), torch.randn(256, 3072, device="cuda")
    eotfast.pair(x, y, backend="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        j = eotfast.pair(x, y, backend="cuda")
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert j.shape == (256,)


def test_cuda_kernels_run_on_the_callers_stream():
    x, y = torch.randn(2, 128, 768, device="cuda"), torch.randn(2, 128, 768, device="cuda")
    plain = {"scaling": None}  # the same iterates, so f can be compared
    expected = eotfast.sinkhorn(
        eotfast.cost_matrix(x, y, batch_dims=1, backend="torch"), backend="torch", **plain
    )
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        # Slow the stream down first: a kernel on the default stream would read x, y (or
        # write results) before this stream's producer ran, and the results would differ.
        torch.cuda._sleep(50_000_000)
        x2, y2 = x * 1.0, y * 1.0
        cost = eotfast.cost_matrix(x2, y2, batch_dims=1, backend="cuda")
        result = eotfast.sinkhorn(cost, backend="cuda", **plain)
    torch.cuda.current_stream().wait_stream(stream)
    assert torch.allclose(result.f, expected.f, atol=1e-3 * float(cost.max()))
    assert (result.n_iter - expected.n_iter).abs().max() <= 2
