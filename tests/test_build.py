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
    assert importlib.import_module("eotfast.kernels").__name__ == "eotfast.kernels"


def _nvcc_on_this_machine() -> bool:
    cudacxx = os.environ.get("CUDACXX")
    return bool(
        shutil.which("nvcc")
        or (cudacxx and Path(cudacxx).exists())
        or Path("/usr/local/cuda/bin/nvcc").exists()
    )


def test_cuda_module_is_built_when_a_toolkit_is_present():
    from eotfast import _build_config

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
        _cuda.sinkhorn_log_float32(0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 0.1, 0)
    with pytest.raises(ValueError, match="backend='cuda' runs on CUDA tensors.*backend='cpu'"):
        eotfast.sinkhorn(torch.rand(3, 3), backend="cuda")
    assert "cuda" not in eotfast.available_backends("cpu")
