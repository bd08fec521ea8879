"""The installed package has what the build promises."""

import importlib
import os
import shutil
from pathlib import Path

import pytest
import torch

import eotfast


def test_cpu_extension_is_built_and_auto_picks_it():
    assert eotfast.cpu_extension_available(), "eotfast._C did not import: run `pip install .`"
    assert eotfast.available_backends("cpu")[0] == "cpu"


def test_triton_kernels_ship_as_eotfast_kernels():
    # pyproject maps the top-level kernels/ folder to eotfast.kernels (a top-level package
    # "kernels" would clash with one on PyPI): the launchers import from there.
    from eotfast.kernels import cost_matrix, draw_partners, sinkhorn

    for module, launcher in (
        (cost_matrix, "launch_cost_matrix"),
        (draw_partners, "launch_draw_partners"),
        (sinkhorn, "launch_sinkhorn"),
    ):
        assert callable(getattr(module, launcher)), module
        assert Path(module.__file__).parent.name == "kernels", module.__file__


def _nvcc_on_this_machine() -> bool:
    cudacxx = os.environ.get("CUDACXX")
    return bool(
        shutil.which("nvcc")
        or (cudacxx and Path(cudacxx).exists())
        or Path("/usr/local/cuda/bin/nvcc").exists()
    )


def test_cuda_module_is_built_when_a_toolkit_is_present():
    from eotfast import _build_config

    if not (_nvcc_on_this_machine() or _build_config.CUDA_BUILT):
        pytest.skip("no CUDA toolkit here and no CUDA module built: nothing to check")
    if _build_config.CUDA_SWITCH != "OFF" and _nvcc_on_this_machine():
        assert _build_config.CUDA_BUILT, (
            "nvcc is present and EOTFAST_CUDA is not OFF, yet CMake did not build eotfast._cuda "
            f"(switch {_build_config.CUDA_SWITCH!r}, compiler {_build_config.CUDA_COMPILER!r})"
        )
    if _build_config.CUDA_BUILT:
        # Importing needs no GPU; a broken module (missing symbol, wrong ABI) fails here.
        module = importlib.import_module("eotfast._cuda")
        assert eotfast.cuda_extension_available()
        assert module.device_count() == torch.cuda.device_count()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without a GPU")
def test_cuda_module_without_gpu_raises_clear_errors():
    _cuda = pytest.importorskip("eotfast._cuda")
    with pytest.raises(RuntimeError, match="no CUDA device"):
        _cuda.sinkhorn_float32(0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 0.1, 0.5, 1.0, 0)
    with pytest.raises(ValueError, match="backend='cuda' runs on CUDA tensors.*backend='cpu'"):
        eotfast.sinkhorn(torch.rand(3, 3), backend="cuda")
    assert "cuda" not in eotfast.available_backends("cpu")


def test_readme_backend_table_and_op_list_follow_the_registry():
    from eotfast.ops import cuda_backend, triton_backend  # noqa: F401  (register their ops)
    from eotfast.ops.registry import backend_table

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert backend_table() in readme, "README's backend table: paste backend_table()"
    registered = [
        name for name in torch._C._dispatch_get_all_op_names() if name.startswith("eotfast::")
    ]
    missing = [name for name in registered if f"`{name}`" not in readme]
    assert not missing, f"registered ops the README does not list: {missing}"


def test_auto_falls_back_to_the_torch_reference_on_other_devices():
    # No kernel runs on MPS, XPU, ... tensors: "auto" must still find the reference.
    from eotfast.ops.registry import resolve_backend

    assert eotfast.available_backends("meta") == ["torch"]
    assert resolve_backend("auto", torch.device("meta")) == "torch"


def test_auto_on_devices_without_a_kernel_is_the_host_auction_then_the_torch_reference():
    # MPS, XPU, ...: "host" (torch ops on the device, the C++ auction on the host) when the
    # C++ kernels are built, which this build test requires; it never serves CPU, CUDA or meta
    # tensors, and asked for there, it says where it runs.
    from eotfast.ops.registry import resolve_backend

    for device in ("mps", "xpu"):
        assert eotfast.available_backends(device) == ["host", "torch"]
        assert resolve_backend("auto", torch.device(device)) == "host"
        assert eotfast.available_backends(device, unbalanced=True) == ["host", "torch"]
    for device in ("cpu", "cuda", "meta"):
        assert "host" not in eotfast.available_backends(device)
    x = torch.rand(5, 2)
    with pytest.raises(ValueError, match="backend='host' is for tensors on devices without.*'cpu'"):
        eotfast.pair(x, x, method="exact", backend="host")


def test_without_the_cpp_build_other_devices_get_the_torch_reference(monkeypatch):
    from eotfast.ops import registry

    monkeypatch.setattr(registry, "cpu_extension_available", lambda: False)
    assert eotfast.available_backends("mps") == ["torch"]
    with pytest.raises(ValueError, match="backend='host' runs the C.. auction of eotfast._C"):
        registry.resolve_backend("host", torch.device("mps"))
